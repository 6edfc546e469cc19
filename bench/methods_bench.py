"""Every pruning method side by side on the same model, data and recovery budget, with measured speed.

For each method and target (a real run each, in the run store, so they also appear on the Prune page and
its Pareto chart):

- encoder (the built-in default on Rotten Tomatoes; targets: fractions of the encoder's weights, default
  0.5 and 0.75): full-dev accuracy and the dense one, batch-1 and batch-32 speedups measured interleaved with
  the dense model at the final evaluation, non-zero weights of the exported model's layers (masks count as
  zeros, so unstructured sparsity shows here and not in the speedups), size on disk (the fp32 file, the torch
  dynamic int8 copy, and with masks the CSR format), pruning time (the one-shot step, or the gate phase) and
  recovery time (the fine-tune);
- decoder (SmolLM2 on the `lm` text task; targets: fractions of its non-embedding weights, default 0.2 and
  0.35): dev perplexity and the dense one, next-token accuracy, zero-shot accuracy of the exported model on
  the Rotten Tomatoes dev prompts (`--zero-shot N` snippets), prefill speedups at batch 1 and 8 (the run's
  interleaved timing) and decode tokens/s of the exported model against the dense one, measured in this
  process one after another.

Every method gets the same recovery budget (`--finetune-steps`, LoRA on decoders); learned methods (CoFi,
L0) spend `--steps` on their gates on top, stated in the table. A method that does not apply to a family
refuses with its reason, printed in the table. Options of single methods: `--set name=value` (applied to
every method that has the option, e.g. `--set calibration_examples=32`).

Run: nice .venv/bin/python -m bench.methods_bench [--family encoder|decoder|both] [--methods a,b,...]
     [--targets 0.5,0.75] [--finetune-steps N] [--steps N] [--zero-shot N] [--threads 2] [--parallel] [--out F]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.train_bench import Printer, for_method
from core.data import TextDataset, load_default_task
from core.evaluate import evaluate
from core.folders import write_text_atomically
from core.latency import decode_speed
from core.lm_text import lee_splits
from core.models import load_model
from pruning.cli.sweep import target_option
from pruning.config import TrainConfig
from pruning.int8 import quantize_torch, torch_size_bytes
from pruning.loop import run_job
from pruning.methods import methods
from pruning.record import StepRecord
from pruning.runs import RunStore
from pruning.sparse_size import sparse_size, zero_masks

FAMILIES = {
    "encoder": {"model": "default", "data": "default", "targets": (0.5, 0.75), "speedups": (2.0, 4.0),
                "batch_size": 32, "max_length": 64},
    "decoder": {"model": "smollm2", "data": "lm", "targets": (0.2, 0.35), "speedups": (1.25, 1.5), "batch_size": 4,
                "max_length": 64, "lora": True, "lora_rank": 8, "lr": 2e-4},
}
MASKED = 0.01  # a model whose layer matrices hold at least this share of exact zeros has weight masks (a
# dequantised model, e.g. SmolLM2 from its GGUF, holds ~0.2 % and has none)
SKIP = ("dense",)  # the reference every row is timed against, not a row of its own


@dataclass
class Row:
    """One method at one target on one family."""

    family: str
    method: str
    target: float | None
    status: str
    final: StepRecord | None = None
    nonzero: float | None = None  # share of the layers' weights that are non-zero in the export
    sizes: tuple[float, float, float | None] | None = None  # MB on disk: fp32, torch dynamic int8, CSR (masks)
    zero_shot: float | None = None
    decode_speedup: float | None = None
    prune_s: float = 0.0
    recover_s: float = 0.0
    note: str = ""


def nonzero_share(model: torch.nn.Module) -> float:
    """Non-zero entries over all entries of `model`'s layer weight matrices (2-D, not embeddings or the head)."""
    total = nonzero = 0
    for name, p in model.named_parameters():
        if p.dim() == 2 and "embed" not in name and "classifier" not in name and "score" not in name:
            total += p.numel()
            nonzero += int(torch.count_nonzero(p))
    return nonzero / total


def disk_sizes(folder: str, model: torch.nn.Module, masked: bool) -> tuple[float, float, float | None]:
    """MB of the model exported to `folder` (`model`, loaded from it): its fp32 safetensors file, the torch
    dynamic int8 copy's serialised state (`pruning.int8`), and for a `masked` model the sparse format's (CSR
    masked matrices + the other parameters dense)."""
    fp32 = (Path(folder) / "model.safetensors").stat().st_size / 1e6
    int8 = torch_size_bytes(quantize_torch(model)) / 1e6
    if not masked:
        return fp32, int8, None
    size = sparse_size(model, zero_masks(model))
    return fp32, int8, (size.csr_bytes + size.other_bytes) / 1e6


def zero_shot_prompts(n: int) -> TextDataset:
    """The `n` Rotten Tomatoes dev snippets every decoder row is prompted with (the same for every row)."""
    return load_default_task().dev.subset(n, seed=0)


def zero_shot(loaded, prompts: int) -> float:
    """Accuracy of the prompted decoder `loaded` on the `zero_shot_prompts(prompts)`."""
    return evaluate(loaded.model, loaded.tokenizer, zero_shot_prompts(prompts)).accuracy


def decoder_extras(row: Row, dense, prompts: int) -> None:
    """Zero-shot accuracy and decode speed of the row's exported decoder against the `dense` one."""
    pruned = load_model(row.final.export)
    row.zero_shot = zero_shot(pruned, prompts)
    texts = list(lee_splits().dev.documents[:8])
    speeds = [decode_speed(m.lm, m.text_tokenizer, texts).tokens_per_s for m in (dense, pruned)]
    row.decode_speedup = speeds[1] / speeds[0]


def method_target(method: str) -> str | None:
    """The option a target sets for `method` (`pruning.cli.sweep.target_option`), None without one."""
    try:
        return target_option(method)
    except ValueError:
        return None


def run_row(store: RunStore, family: str, method: str, target: float | None, settings: dict, parallel: bool) -> Row:
    """Train (or prune) one row's run and read its record; `target` sets the method's target option."""
    option = method_target(method)
    changes = {"method": method, **({option: target} if option else {})}
    row = Row(family, method, target, "refused")
    try:
        config = for_method({**settings, **changes}, method).check()
    except ValueError as exc:
        row.note = str(exc)
        return row
    run_id = store.create(config.to_dict())
    start = time.perf_counter()
    try:
        status = run_job(store, run_id, Printer(f"{family} {method} {target}", start), exclusive=not parallel)
    except ValueError as exc:  # the method refuses this model (`check_model`): the reason is the row's note
        row.note = " ".join(str(exc).split())[:160]
        return row
    run = store.get(run_id)
    if run.final is None or not run.final.export:
        row.status, row.note = status, (run.error or "")[:160]
        return row
    return measured_row(family, run, store)


def measured_row(family: str, run, store: RunStore) -> Row:
    """The row of a finished run of the store: its final record, the export's non-zero share and sizes. Pruning
    time: the one-shot step (set-up), or a learned method's gate phase (training time at its last gate-phase
    eval); recovery: the fine-tune's training time."""
    config = TrainConfig.from_dict(run.config)
    option = method_target(config.method)  # target_sparsity, or ZipLM's target_speedup
    target = config.setting(option) if option else None
    row = Row(family, config.method, target, run.status, final=run.final, note=(run.error or "")[:160])
    clock = run.final.clock
    gates = [r for r in store.records(run.id) if r.phase == "gates"]
    gate_s = gates[-1].clock.get("train_s", 0.0) if gates else 0.0
    row.prune_s, row.recover_s = clock.get("setup_s", 0.0) + gate_s, clock.get("train_s", 0.0) - gate_s
    model = load_model(run.final.export).model
    row.nonzero = nonzero_share(model)
    row.sizes = disk_sizes(run.final.export, model, masked=row.nonzero <= 1 - MASKED)
    return row


def rows_from_store(store: RunStore) -> list[Row]:
    """Every finished run of the store as a row (decoder rows without the zero-shot and decode columns, which
    are measured after the run), oldest first: the table again without training anything."""
    rows = []
    for run in sorted(store.list(), key=lambda r: r.id):
        if run.status == "done" and run.final is not None and run.final.export:
            family = "decoder" if run.final.perplexity is not None else "encoder"
            rows.append(measured_row(family, run, store))
    return rows


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def times(speedup: float | None) -> str:
    return "-" if speedup is None else f"{speedup:.2f}x"


def table(rows: list[Row]) -> str:
    """The rows as one markdown table per family."""
    out = []
    for family in dict.fromkeys(r.family for r in rows):
        decoder = family == "decoder"
        quality = (("dev ppl (dense)", "next-token acc", "zero-shot acc") if decoder
                   else ("dev acc (dense)", "retention"))
        speed = ("prefill b1", "prefill b8", "decode") if decoder else ("b1 speedup", "b32 speedup")
        header = ("method", "target", "sparsity", "non-zero", *quality, *speed, "MB fp32 / int8 / sparse",
                  "drift: token ρ / head ρ / flipped", "prune s", "recover s", "note")
        out += [f"\n{family}:\n", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in (r for r in rows if r.family == family):
            f = r.final
            if f is None:
                cells = [r.method, fmt(r.target, "g"), *["-"] * (len(header) - 3), r.note or r.status]
            else:
                if decoder:
                    q = (f"{fmt(f.perplexity, '.2f')} ({fmt(f.dense_perplexity, '.2f')})", fmt(f.accuracy, ".3f"),
                         fmt(r.zero_shot, ".3f"))
                    s = (times(f.speedup_b1), times(f.speedup_b32), times(r.decode_speedup))
                else:
                    q = (f"{f.accuracy:.4f} ({f.dense_accuracy:.4f})", f"{f.accuracy / f.dense_accuracy:.1%}")
                    s = (times(f.speedup_b1), times(f.speedup_b32))
                mb = " / ".join(fmt(x, ".1f") for x in r.sizes) if r.sizes else "-"
                drift = (f"{fmt(f.drift_token_spearman, '.2f')} / {fmt(f.drift_head_spearman, '.2f')} / "
                         f"{fmt(f.drift_flipped, '.0%')}")
                cells = [r.method, fmt(r.target, "g"), f"{f.sparsity:.3f}", fmt(r.nonzero, ".1%"), *q, *s, mb,
                         drift, f"{r.prune_s:.0f}", f"{r.recover_s:.0f}", r.note]
            out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def parse_value(text: str) -> bool | int | float | str:
    """true / false, else an int, else a float, else the text."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_sets(items: list[str]) -> dict:
    """["calibration_examples=32"] -> {"calibration_examples": 32}."""
    return {name: parse_value(value) for name, _, value in (item.partition("=") for item in items)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=("encoder", "decoder", "both"), default="both")
    parser.add_argument("--methods", default=None, help="comma-separated (default: every registered method)")
    parser.add_argument("--targets", default=None, help="comma-separated (default: 0.5,0.75 encoder; 0.2,0.35 decoder)")
    parser.add_argument("--finetune-steps", type=int, default=100, help="every method's recovery budget")
    parser.add_argument("--steps", type=int, default=300, help="gate-phase steps of the learned methods")
    parser.add_argument("--zero-shot", type=int, default=200, help="Rotten Tomatoes dev prompts for the decoders")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a method option")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel", action="store_true", help="do not wait for runs of other processes")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here after every row")
    parser.add_argument("--from-store", action="store_true", help="print the table of the run store's finished "
                        "runs and train nothing")
    args = parser.parse_args()
    if args.from_store:
        print(table(rows_from_store(RunStore())))
        return
    torch.set_num_threads(args.threads)
    names = [m for m in (args.methods.split(",") if args.methods else methods()) if m not in SKIP]
    store, rows, footer = RunStore(), [], []
    for family in ("encoder", "decoder") if args.family == "both" else (args.family,):
        spec = FAMILIES[family]
        targets = [float(t) for t in args.targets.split(",")] if args.targets else spec["targets"]
        settings = {**{k: v for k, v in spec.items() if k != "targets"}, "threads": args.threads,
                    "finetune_steps": args.finetune_steps, "steps": args.steps, **parse_sets(args.set)}
        dense = load_model(spec["model"]) if family == "decoder" else None
        if dense is not None:
            prompts = zero_shot_prompts(args.zero_shot)
            shares = ", ".join(f"{prompts.labels.count(k) / len(prompts):.2f} {name}"
                               for k, name in enumerate(prompts.label_names))
            footer.append(f"dense {spec['model']}: zero-shot acc {zero_shot(dense, args.zero_shot):.3f} on "
                          f"{len(prompts)} prompts ({shares}: one of these is one answer for every prompt)")
        for method in names:
            option = method_target(method)
            levels = {None: [None], "target_speedup": spec["speedups"]}.get(option, targets)
            for target in levels:
                row = run_row(store, family, method, target, settings, args.parallel)
                if dense is not None and row.final is not None:
                    decoder_extras(row, dense, args.zero_shot)
                rows.append(row)
                print(f"{family} {method} {target}: {row.status} {row.note}", flush=True)
                if args.out is not None:
                    write_text_atomically(args.out, table(rows) + "\n")
    print(table(rows))
    load = os.getloadavg()
    speedups = ", ".join(f"{family} {spec['speedups']}" for family, spec in FAMILIES.items())
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.threads} threads; recovery {args.finetune_steps} steps, gates {args.steps} steps (learned methods); "
          f"load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; ZipLM's targets are speedups "
          f"({speedups})")
    print("\n".join(footer))


if __name__ == "__main__":
    main()
