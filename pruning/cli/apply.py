"""`python -m pruning apply` prunes a model by hand and saves the smaller one; `python -m pruning evaluate`
compares dense and pruned (by a gates file) on a whole dataset. Both measure through
`pruning.live.measure_pruned`, as the Gates page and every training eval step do.

    python -m pruning apply --model default --prune-heads 0:1,0:5,3:2 --ffn-keep 0.5 --out pruned/
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

import torch

from core.adapter import Adapter
from core.cli import add_data_options, data_spec, load_or_prepare, run_with_bar
from core.data import load_data
from core.folders import check_target, write_text_atomically
from core.messages import quote
from pruning.export import WRITER
from pruning.gate_state import CRITERIA, GateState
from pruning.live import compare_state, measure_pruned
from pruning.standard_export import (
    STANDARD,
    Exported,
    drop_layers,
    export,
    parse_layers,
    round_to_standard,
    save_standard,
    without_layers,
)
from pruning.surgery import prune

FULL_ROUNDS = {1: (5, 5), 32: (5, 2)}  # core.latency.compare (rounds, repeats) per batch size: a careful look
DECODER_FULL_ROUNDS = {1: (5, 2), 8: (3, 1)}  # a decoder's larger batch is 8 (see pruning.live)


def full_rounds(loaded) -> dict[int, tuple[int, int]]:
    return DECODER_FULL_ROUNDS if loaded.is_decoder else FULL_ROUNDS
_PAIR = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_LABELS = {"encoder_parameters": "encoder parameters", "encoder_mflops_per_example": "encoder MFLOPs/example",
           "attention_mflops": "  attention MFLOPs", "ffn_mflops": "  FFN MFLOPs",
           "latency_b1_ms": "latency batch 1 (ms)", "latency_b32_ms": "latency batch 32 (ms)"}


def parse_heads(text: str) -> list[tuple[int, int]]:
    """"0:1,3:2" -> [(0, 1), (3, 2)]; empty text -> []. ValueError names the bad item."""
    if not text or not text.strip():
        return []
    pairs = []
    for item in text.split(","):
        match = _PAIR.match(item)
        if not match:
            raise ValueError(f"--prune-heads takes comma-separated LAYER:HEAD pairs (0-based), e.g. 0:1,3:2. "
                             f"Got '{quote(item.strip())}' in '{quote(text)}'.")
        pairs.append((int(match[1]), int(match[2])))
    return pairs


def _fraction(name: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a fraction in (0, 1]. Got {text!r}.") from None
        if not 0 < value <= 1:
            raise argparse.ArgumentTypeError(f"{name} must be a fraction in (0, 1]. Got {text}.")
        return value
    return parse


def _table(rows: list[tuple[str, str, str, str]]) -> str:
    head = ("", "dense", "pruned", "pruned/dense")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [head, *rows]]
    return "\n".join(lines)


def read_gates(path: Path, loaded) -> GateState:
    """A GateState saved as JSON (`GateState.to_json`, e.g. by the Gates page) that fits `loaded`."""
    try:
        state = GateState.from_json(path.read_text())
    except OSError as exc:
        raise ValueError(f"Cannot read the gates file {path} ({exc.strerror}).") from exc
    if state.shape != GateState.dense(loaded).shape:
        raise ValueError(f"The gates in {path} have sizes {state.shape}; the model has "
                         f"{GateState.dense(loaded).shape} (layers, heads, FFN units, hidden dims).")
    return state


def _state(args: argparse.Namespace, loaded, heads: list[tuple[int, int]]) -> GateState:
    """The gate state from --gates FILE, or from --prune-heads / --ffn-keep / --hidden-keep."""
    if args.gates is not None:
        if heads or args.ffn_keep is not None or args.hidden_keep is not None or args.prune_layers:
            raise ValueError("--gates FILE cannot be combined with --prune-heads, --prune-layers, --ffn-keep or "
                             "--hidden-keep.")
        return read_gates(args.gates, loaded)
    state = GateState.from_closed_heads(loaded, heads)
    if args.prune_layers and loaded.is_decoder:  # whole decoder layers as gates: exactly the layers deleted
        state = without_layers(state, parse_layers(args.prune_layers))
    if args.ffn_keep is not None:
        state = state.with_ffn_keep(loaded.adapter, args.ffn_keep, criterion=args.criterion)
    if args.hidden_keep is not None:
        state = state.with_hidden_keep(loaded.adapter, args.hidden_keep, criterion=args.criterion)
    return state


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Dense vs gated-and-pruned on a whole split, timed with more repeats: the Gates page's refinement."""
    loaded = load_or_prepare(args.model)
    data = load_data(data_spec(args), "dev", loaded.label_names)
    state = read_gates(args.gates, loaded)
    result = run_with_bar(args.job, lambda bar: compare_state(loaded, state, data, rounds=full_rounds(loaded),
                                                              progress=bar))
    record = json.dumps({"examples": len(data), "data": data.name, **result.as_dict()}, indent=1)
    if args.out is None:
        print(record)
    else:
        write_text_atomically(args.out, record)
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    heads = parse_heads(args.prune_heads)
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 1 (0 = torch's default). Got {args.threads}.")
    check_target(args.out, written_by=WRITER, overwrite=args.overwrite)  # fail before the slow part
    loaded = load_or_prepare(args.model)
    data = load_data(data_spec(args), "dev", loaded.label_names)
    if args.limit:
        data = data.subset(args.limit, seed=0)
    for note in loaded.notes + data.warnings:
        print(f"warning: {note}", file=sys.stderr)

    timed = full_rounds(loaded)
    if args.prune_layers and not loaded.is_decoder:
        if heads or args.ffn_keep is not None or args.hidden_keep is not None or args.gates or args.make_standard:
            raise ValueError("An encoder's --prune-layers deletes whole layers; it takes no other pruning option.")
        cmp, exported, quantised = run_with_bar(args.job, lambda bar: _drop_encoder_layers(args, loaded, data, timed,
                                                                                          bar))
        return _report(args, cmp, exported, data, timed, None, quantised)
    state = _state(args, loaded, heads)
    rounding = None
    if args.make_standard:
        rounded = round_to_standard(loaded, state)
        rounding = (state, rounded)
        state = rounded
    pruned = prune(loaded, state)

    def measure_and_save(bar):
        cmp = measure_pruned(loaded, pruned, data, rounds=timed, progress=bar)
        cost = None
        if rounding is not None:
            bar(0, 1, "measuring the structure before rounding")
            before = measure_pruned(loaded, prune(loaded, rounding[0]), data, rounds=timed, progress=bar)
            cost = _rounding_cost(before, cmp, timed)
        bar(0, 1, "saving" + (" and exporting to ONNX" if args.onnx or args.int8 else ""))
        exported = export(pruned, args.out, overwrite=args.overwrite, onnx=args.onnx, int8=args.int8)
        return cmp, exported, cost, _int8_report(args, pruned, data, exported, bar)

    cmp, exported, cost, quantised = run_with_bar(args.job, measure_and_save)
    return _report(args, cmp, exported, data, timed, cost, quantised)


def _int8_report(args, pruned, data, exported: Exported, bar):
    """With --int8: fp32 vs int8 of the exported model (torch and ONNX Runtime), else None."""
    if not args.int8:
        return None
    from pruning.int8 import compare

    bar(0, 1, "measuring int8 against fp32")
    return compare(pruned, data, exported.path)


def _drop_encoder_layers(args, loaded, data, timed, bar):
    """Delete an encoder's --prune-layers outright (a plain model), measure it, save it as a standard folder."""
    layers = parse_layers(args.prune_layers)
    plain = drop_layers(loaded, layers)
    kept = plain.config.num_hidden_layers
    note = f"Deleted layer(s) {', '.join(map(str, layers))}: {kept} of {kept + len(layers)} layers left."
    small = dataclasses.replace(loaded, model=plain, adapter=Adapter(plain), notes=[note],
                                fingerprint=f"{loaded.fingerprint}-drop-{'-'.join(map(str, layers))}")
    cmp = measure_pruned(loaded, small, data, rounds=timed, progress=bar)
    cmp = dataclasses.replace(cmp, sparsity=len(layers) / (kept + len(layers)))  # equal layers: their share
    bar(0, 1, "saving" + (" and exporting to ONNX" if args.onnx or args.int8 else ""))
    reason = f"a plain transformers folder (from_pretrained loads it): {note}"
    out = save_standard(small, plain, args.out, reason, overwrite=args.overwrite, onnx=args.onnx, int8=args.int8)
    exported = Exported(out, STANDARD, reason)
    return cmp, exported, _int8_report(args, small, data, exported, bar)


def _rounding_cost(before, after, timed) -> dict:
    """What rounding to the standard shape changed: accuracy, parameters and latency (ms) before -> after."""
    cost = {"accuracy": [before.pruned.accuracy, after.pruned.accuracy],
            "parameters": [before.pruned.parameters, after.pruned.parameters],
            "sparsity": [before.sparsity, after.sparsity]}
    for b in timed:
        cost[f"latency_b{b}_ms"] = [getattr(before.pruned, f"latency_b{b}_ms"), getattr(after.pruned,
                                                                                        f"latency_b{b}_ms")]
    return cost


def _report(args, cmp, exported: Exported, data, timed, cost: dict | None, quantised=None) -> int:
    """Print the dense / pruned table (or JSON), the export's kind and why, the cost of rounding and, with
    --int8, the pruned model's fp32 vs int8 figures (`pruning.int8.Int8Report`)."""
    sides = {"dense": cmp.dense, "pruned": cmp.pruned}
    figures = {
        "parameters": {k: f.parameters for k, f in sides.items()},
        "encoder_parameters": {k: f.encoder_parameters for k, f in sides.items()},
        "encoder_mflops_per_example": {k: f.flops / 1e6 for k, f in sides.items()},
        "attention_mflops": {k: f.flops_attention / 1e6 for k, f in sides.items()},
        "ffn_mflops": {k: f.flops_ffn / 1e6 for k, f in sides.items()},
        "accuracy": {k: f.accuracy for k, f in sides.items()},
        **{f"latency_b{b}_ms": {k: getattr(f, f"latency_b{b}_ms") for k, f in sides.items()} for b in timed},
    }
    threads, out = torch.get_num_threads(), exported.path
    if args.json:
        print(json.dumps({"out": str(out), "pruned": cmp.note, "median_tokens": cmp.seq_len,
                          "sparsity": cmp.sparsity, "threads": threads, "figures": figures,
                          "export": {"kind": exported.kind, "reason": exported.reason},
                          **({"standard_rounding": cost} if cost else {}),
                          **({"int8": quantised.as_dict()} if quantised else {})}, indent=2))
        return 0
    rows = []
    for name, values in figures.items():
        d, p = values["dense"], values["pruned"]
        if name == "accuracy":
            rows.append((f"accuracy (n={len(data)})", f"{d:.4f}", f"{p:.4f}", f"{p - d:+.4f}"))
            continue
        fmt = "{:,.0f}" if "parameters" in name else "{:,.2f}"
        label = _LABELS.get(name, name)
        ratio = f"{p / d:.3f}" if d else "-"
        if name.startswith("latency"):
            ratio += f" ({d / p:.2f}x faster)"
        rows.append((label, fmt.format(d), fmt.format(p), ratio))
    print(_table(rows))
    rounds, repeats = timed[1]
    print(f"\n{cmp.note} CoFi sparsity {cmp.sparsity:.3f}. Accuracy on {data.name}, no retraining after pruning; "
          f"FLOPs at the median length of {cmp.seq_len} tokens; latency median of {rounds * repeats} runs at batch 1 "
          f"interleaved with the dense model, {threads} threads.")
    if cost:
        (acc0, acc1), (ms0, ms1) = cost["accuracy"], cost["latency_b1_ms"]
        print(f"made standard: accuracy {acc0:.4f} -> {acc1:.4f} ({acc1 - acc0:+.4f}), batch-1 latency "
              f"{ms0:.2f} -> {ms1:.2f} ms, sparsity {cost['sparsity'][0]:.3f} -> {cost['sparsity'][1]:.3f}")
    files = " (with model.onnx and model.int8.onnx)" if args.int8 else " (with model.onnx)" if args.onnx else ""
    print(f"saved {out}{files}: {exported.kind} export, {exported.reason}")
    if quantised:
        print(f"\nthe pruned model in fp32 and int8:\n{quantised.table()}")
    return 0


def add_commands(sub) -> None:
    """The `apply` and `evaluate` subcommands."""
    ap = sub.add_parser("apply", help="prune heads / FFN units / hidden dims by hand and save the smaller model")
    ap.add_argument("--model", default="default", help="default | minilm-l3 | path to a HF model folder")
    ap.add_argument("--prune-heads", default="", metavar="L:H,...", help="heads to remove, 0-based, e.g. 0:1,3:2")
    ap.add_argument("--gates", type=Path, default=None, metavar="FILE",
                    help="a gate state as JSON (e.g. saved by the Gates page) instead of the three options here")
    ap.add_argument("--prune-layers", default="", metavar="L,...",
                    help="whole layers to remove, 0-based, e.g. 4,5: a plain transformers folder (a decoder's "
                    "layers as closed gates, exactly; an encoder's deleted outright, its LayerNorms with them)")
    ap.add_argument("--make-standard", action="store_true",
                    help="round the structure to the nearest one a plain config expresses (same heads / KV "
                    "groups / FFN width in every layer) and report what that costs in accuracy and speed")
    ap.add_argument("--ffn-keep", type=_fraction("--ffn-keep"), default=None, metavar="FRAC",
                    help="fraction of FFN units to keep in every layer, in (0, 1]")
    ap.add_argument("--hidden-keep", type=_fraction("--hidden-keep"), default=None, metavar="FRAC",
                    help="fraction of hidden dims to keep, in (0, 1]")
    ap.add_argument("--criterion", choices=CRITERIA, default="magnitude",
                    help="how FFN units / hidden dims are chosen (weight magnitude or seeded random)")
    add_data_options(ap)
    ap.add_argument("--limit", type=int, default=0, help="evaluate a seeded subset of this many examples")
    ap.add_argument("--out", type=Path, required=True, help="new folder for the pruned model")
    ap.add_argument("--onnx", action="store_true", help="also export model.onnx (checked against torch)")
    ap.add_argument("--int8", action="store_true", help="also export model.int8.onnx (dynamic int8 quantisation, "
                    "with model.onnx) and measure accuracy, speed and size of int8 next to fp32 (torch and ONNX)")
    ap.add_argument("--overwrite", action="store_true", help="replace --out if it is an export HeadLab wrote")
    ap.add_argument("--threads", type=int, default=0, help="torch threads for timing (default: torch's default)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.set_defaults(func=cmd_apply)
    ev = sub.add_parser("evaluate", help="dense vs pruned by a gates file on a whole dataset (JSON)")
    ev.add_argument("--model", default="default", help="default | minilm-l3 | path to a HF model folder")
    ev.add_argument("--gates", type=Path, required=True, metavar="FILE", help="a gate state as JSON")
    add_data_options(ev)
    ev.add_argument("--out", type=Path, default=None, help="write the JSON here (stdout if omitted)")
    ev.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's default)")
    ev.add_argument("--job", help=argparse.SUPPRESS)
    ev.set_defaults(func=cmd_evaluate)
