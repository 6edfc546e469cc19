"""`python -m pruning runs list | stop ID | resume ID | delete ID | export ID --out DIR [--onnx]`:
manage the training runs of the run store (`pruning.runs`).

    python -m pruning runs resume 3 --background
    python -m pruning runs export 3 --out pruned-cofi/ --onnx
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from core.cli import run_with_bar
from core.folders import check_target
from core.pruned import load_pruned
from pruning.cli.train import run_and_report
from pruning.config import TrainConfig
from pruning.export import WRITER
from pruning.launch import LOG, launch
from pruning.loop import MODEL_FILE
from pruning.runs import RunStore
from pruning.standard_export import HEADLAB, Exported, export


def _target_text(config: dict) -> str:
    target = TrainConfig.target_of(config)
    return "-" if target is None else f"{target:.2f}"


def _list(store: RunStore, as_json: bool) -> int:
    runs = store.list()
    if as_json:
        print(json.dumps([{"id": r.id, "status": r.status, "step": r.step, "total": r.total, "config": r.config,
                           "run_dir": str(r.run_dir), "error": r.error, "result": r.result} for r in runs],
                         indent=1))
        return 0
    if not runs:
        print("no runs")
        return 0
    rows = [("id", "status", "method", "target", "step", "accuracy", "speedup b32", "created", "error")]
    for r in runs:
        f = r.final
        rows.append((str(r.id), r.status, r.config.get("method", "?"), _target_text(r.config),
                     f"{r.step}/{r.total}", f"{f.accuracy:.4f}" if f and f.accuracy is not None else "-",
                     f"{f.speedup_b32:.2f}x" if f and f.speedup_b32 else "-",
                     time.strftime("%Y-%m-%d %H:%M", time.localtime(r.created)), (r.error or "")[:60]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print("\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows))
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    """`runs list | stop ID | resume ID | delete ID | export ID --out DIR [--onnx]`."""
    store = RunStore()
    if args.action == "list":
        return _list(store, args.json)
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
        print(f"resuming run {run.id} in the background (pid {proc.pid}); log {run.run_dir / LOG}")
        return 0
    return run_and_report(store, run.id, args.job, parallel=args.parallel, as_json=args.json)


def _export_run(store: RunStore, args: argparse.Namespace) -> int:
    """Copy a finished run's pruned, fine-tuned model to --out (a folder HeadLab loads back), with --onnx
    also model.onnx checked against torch."""
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
        bar(0, 1, "saving" + (" and exporting to ONNX" if args.onnx or args.int8 else ""))
        done = _clustered(run, loaded, args) or export(loaded, args.out, overwrite=args.overwrite, onnx=args.onnx,
                                                        int8=args.int8)
        return done, _int8_report(run, loaded, done.path, bar) if args.int8 else None

    done, quantised = run_with_bar(args.job, work)
    print(f"saved {done.path}" + (" (with model.onnx, checked against torch)" if args.onnx or args.int8 else "")
          + (" and model.int8.onnx" if args.int8 else "") + f": {done.kind} export, {done.reason}")
    if quantised:
        print(f"\nthe run's model in fp32 and int8:\n{quantised.table()}")
    return 0


def _clustered(run, loaded, args) -> Exported | None:
    """A `cluster` run with weight sharing: HeadLab's layout with the shared tensors as codebook + indices
    (`pruning.kmeans_share.save_clustered`; loads with `load_clustered`), else None."""
    options = run.config.get("options", {})
    if run.config.get("method") != "cluster" or not options.get("bits"):
        return None
    from pruning.kmeans_share import folder_bytes, save_clustered, shareable_names

    names = shareable_names(loaded, options.get("share_ffn", False))
    out = save_clustered(loaded, args.out, options["bits"], names, overwrite=args.overwrite, onnx=args.onnx,
                         int8=args.int8)
    return Exported(out, HEADLAB, f"HeadLab's layout with {len(names)} tensor(s) as a {2 ** options['bits']}-value "
                                  f"codebook + indices (pruning.kmeans_share.load_clustered), "
                                  f"{folder_bytes(out) / 1e6:.2f} MB on disk")


INT8_ROWS = 500  # runs export --int8 measures on a seeded subset of this many dev rows of the run's data


def _int8_report(run, loaded, folder: Path, bar):
    """fp32 vs int8 of the exported run model (`pruning.int8.compare`) on a seeded subset of the run's dev split."""
    from core.data import load_data
    from pruning.int8 import compare

    bar(0, 1, "measuring int8 against fp32")
    data = load_data(TrainConfig.from_dict(run.config).data_spec, "dev", loaded.label_names)
    return compare(loaded, data.subset(INT8_ROWS, seed=0), folder)


def add_commands(sub) -> None:
    """The `runs` subcommand."""
    ru = sub.add_parser("runs", help="list, stop, resume or delete training runs")
    ru.add_argument("action", choices=["list", "stop", "resume", "delete", "export"])
    ru.add_argument("id", type=int, nargs="?", default=None, help="run ID (stop, resume, delete, export)")
    ru.add_argument("--out", type=Path, default=None, metavar="DIR", help="export: new folder for the final model")
    ru.add_argument("--onnx", action="store_true", help="export: also write model.onnx (checked against torch)")
    ru.add_argument("--int8", action="store_true", help="export: also write model.int8.onnx (dynamic int8, with "
                    f"model.onnx) and measure int8 next to fp32 on up to {INT8_ROWS} dev rows of the run's data")
    ru.add_argument("--overwrite", action="store_true", help="export: replace --out if it is an export HeadLab wrote")
    ru.add_argument("--background", action="store_true", help="resume: run in a detached process")
    ru.add_argument("--parallel", action="store_true", help="resume: do not wait for other running jobs")
    ru.add_argument("--json", action="store_true", help="print JSON")
    ru.add_argument("--job", help=argparse.SUPPRESS)
    ru.set_defaults(func=cmd_runs)
