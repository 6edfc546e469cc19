"""Command line: `python -m pruning apply ...` prunes a model by hand and saves the smaller one.

    python -m pruning apply --model default --prune-heads 0:1,0:5,3:2 --ffn-keep 0.5 --out pruned/

Prints parameters, encoder FLOPs per example (attention / FFN), accuracy and latency at batch 1 and
32 for the dense and the pruned model; both are timed interleaved in this process. Heads are
0-based LAYER:HEAD pairs. Bad input exits with status 2 and one line on stderr, never a traceback.

`python -m pruning train` learns the pruning (CoFi, L0 heads) or prunes one-shot (baselines), then
fine-tunes, reporting to the run store (`pruning.runs`); `python -m pruning runs list|stop|resume|delete|export`
manages the runs:

    python -m pruning train --model default --method cofi --target-sparsity 0.6 --steps 400
    python -m pruning runs resume 3 --background

`train` also runs in several processes under PyTorch's launcher (data-parallel, see `pruning.loop`);
`--run-id ID` (the spelling of `--run ID` that torchrun leaves alone) trains or resumes a run of the
store the same way:

    torchrun --standalone --nproc_per_node=2 -m pruning train --method cofi --device cpu
    torchrun --standalone --nproc_per_node=2 -m pruning train --run-id 3
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

from core.__main__ import run_command
from core.data import load_data
from core.evaluate import evaluate
from core.folders import check_target, write_text_atomically
from core.latency import compare, make_batch
from core.messages import quote
from core.size import encoder_flops
from core.summary import median_tokens
from pruning.gates import CRITERIA, GateState
from pruning.size import exact_sparsity

_PAIR = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


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


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line and exit status 2 (like every other bad input)."""

    def error(self, message: str):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


_LABELS = {"encoder_parameters": "encoder parameters", "encoder_mflops_per_example": "encoder MFLOPs/example",
           "attention_mflops": "  attention MFLOPs", "ffn_mflops": "  FFN MFLOPs",
           "latency_b1_ms": "latency batch 1 (ms)", "latency_b32_ms": "latency batch 32 (ms)"}


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
        if heads or args.ffn_keep is not None or args.hidden_keep is not None:
            raise ValueError("--gates FILE cannot be combined with --prune-heads, --ffn-keep or --hidden-keep.")
        return read_gates(args.gates, loaded)
    state = GateState.from_closed_heads(loaded, heads)
    if args.ffn_keep is not None:
        state = state.with_ffn_keep(loaded.adapter, args.ffn_keep, criterion=args.criterion)
    if args.hidden_keep is not None:
        state = state.with_hidden_keep(loaded.adapter, args.hidden_keep, criterion=args.criterion)
    return state


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Dense vs gated-and-pruned on a whole split, timed with more repeats: the Gates page's refinement."""
    from core.__main__ import load_or_prepare, run_with_bar
    from pruning.live import compare_state

    loaded = load_or_prepare(args.model)
    data = load_data(args.data, split="dev", label_names=loaded.label_names)
    state = read_gates(args.gates, loaded)
    result = run_with_bar(args.job, lambda bar: compare_state(loaded, state, data, progress=bar,
                                                              rounds={1: (5, 5), 32: (5, 2)}))
    record = json.dumps({"examples": len(data), "data": data.name, **result.as_dict()}, indent=1)
    if args.out is None:
        print(record)
    else:
        write_text_atomically(args.out, record)
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    from core.__main__ import load_or_prepare, run_with_bar
    from pruning.export import WRITER, save_pruned
    from pruning.surgery import prune

    heads = parse_heads(args.prune_heads)
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 1 (0 = torch's default). Got {args.threads}.")
    check_target(args.out, written_by=WRITER, overwrite=args.overwrite)  # fail before the slow part
    loaded = load_or_prepare(args.model)
    data = load_data(args.data, split="dev", label_names=loaded.label_names)
    if args.limit:
        data = data.subset(args.limit, seed=0)
    for note in loaded.notes + data.warnings:
        print(f"warning: {note}", file=sys.stderr)

    state = _state(args, loaded, heads)
    pruned = prune(loaded, state)
    models = {"dense": loaded, "pruned": pruned}

    def measure_all(bar):
        quality = {k: evaluate(m.model, m.tokenizer, data, max_length=m.max_length, progress=bar)
                   for k, m in models.items()}
        bar(0, 1, "timing batch 1 and 32")
        timing = {b: compare({k: m.model for k, m in models.items()},
                             make_batch(loaded.tokenizer, data.texts, b, loaded.max_length)) for b in (1, 32)}
        bar(0, 1, "saving" + (" and exporting to ONNX" if args.onnx else ""))
        return quality, timing, save_pruned(pruned, args.out, overwrite=args.overwrite, onnx=args.onnx)

    quality, timing, out = run_with_bar(args.job, measure_all)
    seq_len = median_tokens(loaded, data.texts)
    flops = {k: encoder_flops(m.adapter, seq_len) for k, m in models.items()}
    params = {k: sum(p.numel() for p in m.model.parameters()) for k, m in models.items()}
    encoder = {k: sum(p.numel() for p in m.adapter.layers.parameters()) for k, m in models.items()}

    figures = {
        "parameters": params, "encoder_parameters": encoder,
        "encoder_mflops_per_example": {k: f.total / 1e6 for k, f in flops.items()},
        "attention_mflops": {k: f.attention / 1e6 for k, f in flops.items()},
        "ffn_mflops": {k: f.ffn / 1e6 for k, f in flops.items()},
        "accuracy": {k: q.accuracy for k, q in quality.items()},
        **{f"latency_b{b}_ms": {k: lat.median_s * 1e3 for k, lat in t.items()} for b, t in timing.items()},
    }
    if args.json:
        print(json.dumps({"out": str(out), "pruned": pruned.notes[-1], "median_tokens": seq_len,
                          "sparsity": exact_sparsity(state), "threads": timing[1]["dense"].threads,
                          "figures": figures}, indent=2))
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
    print(f"\n{pruned.notes[-1]} CoFi sparsity {exact_sparsity(state):.3f}. Accuracy on {data.name}, "
          "no retraining after pruning; FLOPs at the median length "
          f"of {seq_len} tokens; latency median of {timing[1]['dense'].repeats} interleaved runs, "
          f"{timing[1]['dense'].threads} threads.")
    print(f"saved {out}{' (with model.onnx)' if args.onnx else ''}")
    return 0


def _config_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _train_fields() -> dict[str, tuple[object, str]]:
    """Every setting `train` takes: TrainConfig's fields and each registered method's options, as
    name -> (field, help); an option several methods share is listed once, naming them."""
    from dataclasses import fields

    from pruning.config import TrainConfig
    from pruning.methods import methods

    found: dict[str, tuple[object, str]] = {}
    for f in fields(TrainConfig):
        if f.name != "options":
            found[f.name] = (f, f.metadata.get("help", ""))
    owners: dict[str, list[str]] = {}
    for name, cls in methods().items():
        for f in fields(cls.Options):
            owners.setdefault(f.name, []).append(name)
            found.setdefault(f.name, (f, f.metadata.get("help", "")))
    for name, who in owners.items():
        f, text = found[name]
        found[name] = (f, f"{', '.join(who)}: {text}")
    return found


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    """One option per training setting (default None = the config's or the method's default)."""
    from dataclasses import MISSING

    from pruning.methods import methods

    for name, (f, text) in _train_fields().items():
        default = f.default if f.default is not MISSING else None
        kwargs: dict = {"help": f"{text} (default: {default})", "default": None}
        if name == "method":
            kwargs["choices"] = list(methods())
        elif "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = type(default)
            kwargs["metavar"] = name.split("_")[-1].upper()
        parser.add_argument(_config_flag(name), dest=f"cfg_{name}", **kwargs)


def cmd_methods(args: argparse.Namespace) -> int:
    """The registered methods, each with its options, defaults and help."""
    from dataclasses import fields

    from pruning.methods import methods

    for name, cls in methods().items():
        print(f"{name}: {cls.summary}")
        for f in fields(cls.Options):
            print(f"    {_config_flag(f.name)} (default {f.default}): {f.metadata.get('help', '')}")
    return 0


def _given_config(args: argparse.Namespace) -> dict:
    """The TrainConfig fields set on the command line."""
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}


def _target_text(config: dict) -> str:
    from pruning.config import TrainConfig

    target = TrainConfig.target_of(config)
    return "-" if target is None else f"{target:.2f}"


def _summary(run) -> str:
    """One line about a finished (or stopped) run."""
    r = run.result or {}
    if run.status != "done" or not r:
        return f"run {run.id} {run.status} at step {run.step}/{run.total}" + (f": {run.error}" if run.error else "")
    return (f"run {run.id} done: accuracy {r['accuracy']:.4f} (dense {r['dense_accuracy']:.4f}) on {r['examples']} "
            f"dev examples, sparsity {r['sparsity']:.3f}, batch-32 speedup {r['speedup_b32']:.2f}x, "
            f"batch-1 {r['speedup_b1']:.2f}x; saved {r.get('export')}")


def _run_and_report(store, run_id: int, job: str | None, *, parallel: bool, as_json: bool, teacher=None,
                    dist=None) -> int:
    from core.__main__ import run_with_bar
    from pruning.loop import run_job

    run_with_bar(job, lambda bar: run_job(store, run_id, bar, exclusive=not parallel, teacher=teacher, dist=dist))
    run = store.get(run_id)
    if as_json:
        print(json.dumps({"id": run.id, "status": run.status, "step": run.step, "total": run.total,
                          "run_dir": str(run.run_dir), "error": run.error, "result": run.result}, indent=1))
    else:
        print(_summary(run))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Create a run from the options (or take run --run ID from the store) and train it here.

    Under torchrun every process runs this: rank 0 does all of the above and reports; the other ranks
    only follow it (`pruning.loop.run_job`) and print nothing."""
    from pruning import distributed
    from pruning.loop import run_job

    dist = distributed.init()
    try:
        if not dist.main:
            run_job(None, None, dist=dist)
            return 0
        return _train_main(args, dist)
    finally:
        distributed.close()


def _train_main(args: argparse.Namespace, dist) -> int:
    from core.__main__ import load_or_prepare
    from pruning.config import TrainConfig
    from pruning.runs import WRITER, RunStore
    from pruning.session import load_splits

    store = RunStore()
    given = _given_config(args)
    if args.run is not None:
        if given or args.run_dir is not None:
            names = ", ".join([_config_flag(k) for k in given] + (["--run-dir"] if args.run_dir else []))
            raise ValueError(f"--run ID takes its configuration from the run store; drop {names}.")
        return _run_and_report(store, args.run, args.job, parallel=args.parallel, as_json=args.json, dist=dist)
    config = TrainConfig.build(**given).check()
    if args.run_dir is not None:
        check_target(args.run_dir, written_by=WRITER)  # fail before loading models
    loaded = load_or_prepare(config.model)
    teacher = loaded if config.teacher_spec == config.model else load_or_prepare(config.teacher_spec)
    load_splits(config.data, teacher.label_names, **config.columns)  # bad data fails here, before a run is recorded
    run_id = store.create(config.to_dict(), args.run_dir)
    print(f"run {run_id} in {store.get(run_id).run_dir}", file=sys.stderr)
    return _run_and_report(store, run_id, args.job, parallel=args.parallel, as_json=args.json, teacher=teacher,
                           dist=dist)


def cmd_runs(args: argparse.Namespace) -> int:
    """`runs list | stop ID | resume ID | delete ID | export ID --out DIR [--onnx]`."""
    from pruning.runs import RunStore, launch

    store = RunStore()
    if args.action == "list":
        runs = store.list()
        if args.json:
            print(json.dumps([{"id": r.id, "status": r.status, "step": r.step, "total": r.total, "config": r.config,
                               "run_dir": str(r.run_dir), "error": r.error, "result": r.result} for r in runs],
                             indent=1))
            return 0
        if not runs:
            print("no runs")
            return 0
        rows = [("id", "status", "method", "target", "step", "accuracy", "speedup b32", "created", "error")]
        for r in runs:
            res = r.result or {}
            rows.append((str(r.id), r.status, r.config.get("method", "?"), _target_text(r.config),
                         f"{r.step}/{r.total}", f"{res['accuracy']:.4f}" if "accuracy" in res else "-",
                         f"{res['speedup_b32']:.2f}x" if res.get("speedup_b32") else "-",
                         time.strftime("%Y-%m-%d %H:%M", time.localtime(r.created)), (r.error or "")[:60]))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        print("\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows))
        return 0
    if args.id is None:
        raise ValueError(f"runs {args.action} needs a run ID (see `python -m pruning runs list`).")
    if args.action == "stop":
        run = store.request_stop(args.id)
        print(f"stop requested for run {run.id} ({run.status}); it checkpoints and stops at its next step")
        return 0
    if args.action == "delete":
        store.delete(args.id)
        print(f"deleted run {args.id}")
        return 0
    if args.action == "export":
        return _export_run(store, args)
    run = store.get(args.id)  # resume
    if run.status == "done":
        raise ValueError(f"Run {run.id} is already done; start a new run instead.")
    if run.active:
        raise ValueError(f"Run {run.id} is already {run.status} (pid {run.pid}).")
    if args.background:
        proc = launch(store, run.id, parallel=args.parallel)
        print(f"resuming run {run.id} in the background (pid {proc.pid}); log {run.run_dir / 'train.log'}")
        return 0
    return _run_and_report(store, run.id, args.job, parallel=args.parallel, as_json=args.json)


def _export_run(store, args: argparse.Namespace) -> int:
    """Copy a finished run's pruned, fine-tuned model to --out (a folder HeadLab loads back), with --onnx
    also model.onnx checked against torch."""
    from core.__main__ import run_with_bar
    from core.pruned import load_pruned
    from pruning.export import WRITER, save_pruned
    from pruning.loop import MODEL_FILE

    run = store.get(args.id)
    if args.out is None:
        raise ValueError("runs export needs --out DIR (a new folder for the model).")
    check_target(args.out, written_by=WRITER, overwrite=args.overwrite)
    source = run.run_dir / MODEL_FILE
    if run.status != "done" or not source.exists():
        raise ValueError(f"Run {run.id} is {run.status}: only a finished run has a final model to export.")

    def work(bar):
        bar(0, 1, "loading the run's model")
        loaded = load_pruned(source)
        bar(0, 1, "saving" + (" and exporting to ONNX" if args.onnx else ""))
        return save_pruned(loaded, args.out, overwrite=args.overwrite, onnx=args.onnx)

    out = run_with_bar(args.job, work)
    print(f"saved {out}" + (" (with model.onnx, checked against torch)" if args.onnx else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m pruning", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    ap = sub.add_parser("apply", help="prune heads / FFN units / hidden dims by hand and save the smaller model")
    ap.add_argument("--model", default="default", help="default | minilm-l3 | path to a HF model folder")
    ap.add_argument("--prune-heads", default="", metavar="L:H,...", help="heads to remove, 0-based, e.g. 0:1,3:2")
    ap.add_argument("--gates", type=Path, default=None, metavar="FILE",
                    help="a gate state as JSON (e.g. saved by the Gates page) instead of the three options here")
    ap.add_argument("--ffn-keep", type=_fraction("--ffn-keep"), default=None, metavar="FRAC",
                    help="fraction of FFN units to keep in every layer, in (0, 1]")
    ap.add_argument("--hidden-keep", type=_fraction("--hidden-keep"), default=None, metavar="FRAC",
                    help="fraction of hidden dims to keep, in (0, 1]")
    ap.add_argument("--criterion", choices=CRITERIA, default="magnitude",
                    help="how FFN units / hidden dims are chosen (weight magnitude or seeded random)")
    ap.add_argument("--data", default="default", help="default (dev split of the Rotten Tomatoes task) | CSV/TSV/JSONL")
    ap.add_argument("--limit", type=int, default=0, help="evaluate a seeded subset of this many examples")
    ap.add_argument("--out", type=Path, required=True, help="new folder for the pruned model")
    ap.add_argument("--onnx", action="store_true", help="also export model.onnx (checked against torch)")
    ap.add_argument("--overwrite", action="store_true", help="replace --out if it is an export HeadLab wrote")
    ap.add_argument("--threads", type=int, default=0, help="torch threads for timing (default: torch's default)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.set_defaults(func=cmd_apply)
    ev = sub.add_parser("evaluate", help="dense vs pruned by a gates file on a whole dataset (JSON)")
    ev.add_argument("--model", default="default", help="default | minilm-l3 | path to a HF model folder")
    ev.add_argument("--gates", type=Path, required=True, metavar="FILE", help="a gate state as JSON")
    ev.add_argument("--data", default="default", help="default (dev split of the Rotten Tomatoes task) | CSV/TSV/JSONL")
    ev.add_argument("--out", type=Path, default=None, help="write the JSON here (stdout if omitted)")
    ev.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's default)")
    ev.add_argument("--job", help=argparse.SUPPRESS)
    ev.set_defaults(func=cmd_evaluate)
    tr = sub.add_parser("train", help="learn which heads / sublayers / units / dims to drop (cofi, l0) or prune "
                        "one-shot (baselines), then fine-tune; progress goes to the run store")
    _add_train_options(tr)
    tr.add_argument("--run-dir", type=Path, default=None, metavar="DIR",
                    help="new folder for checkpoints and the pruned model (default: under $HEADLAB_HOME/runs)")
    tr.add_argument("--run", "--run-id", type=int, default=None, metavar="ID", dest="run",
                    help="train the existing run ID from the store (queued by the app, or to resume it); "
                    "under torchrun spell it --run-id (torchrun takes --run for its own --run-path)")
    tr.add_argument("--parallel", action="store_true", help="do not wait for other running jobs")
    tr.add_argument("--json", action="store_true", help="print the run's record as JSON at the end")
    tr.add_argument("--job", help=argparse.SUPPRESS)
    tr.set_defaults(func=cmd_train)
    me = sub.add_parser("methods", help="the pruning methods `train` knows, with their options and defaults")
    me.set_defaults(func=cmd_methods)
    ru = sub.add_parser("runs", help="list, stop, resume or delete training runs")
    ru.add_argument("action", choices=["list", "stop", "resume", "delete", "export"])
    ru.add_argument("id", type=int, nargs="?", default=None, help="run ID (stop, resume, delete, export)")
    ru.add_argument("--out", type=Path, default=None, metavar="DIR", help="export: new folder for the final model")
    ru.add_argument("--onnx", action="store_true", help="export: also write model.onnx (checked against torch)")
    ru.add_argument("--overwrite", action="store_true", help="export: replace --out if it is an export HeadLab wrote")
    ru.add_argument("--background", action="store_true", help="resume: run in a detached process")
    ru.add_argument("--parallel", action="store_true", help="resume: do not wait for other running jobs")
    ru.add_argument("--json", action="store_true", help="print JSON")
    ru.add_argument("--job", help=argparse.SUPPRESS)
    ru.set_defaults(func=cmd_runs)
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    try:
        if getattr(args, "threads", 0) > 0:
            torch.set_num_threads(args.threads)
        return run_command(args)
    finally:
        torch.set_num_threads(threads)  # main() may run inside another process (tests, the app)


if __name__ == "__main__":
    sys.exit(main())
