"""`python -m pruning train` learns the pruning (CoFi, L0 heads) or prunes one-shot (baselines), then
fine-tunes, reporting to the run store (`pruning.runs`); `python -m pruning methods` lists the methods.
Every setting of `TrainConfig` and of each registered method's options is a flag.

    python -m pruning train --model default --method cofi --target-sparsity 0.6 --steps 400

`train` also runs in several processes under PyTorch's launcher (data-parallel, see `pruning.loop`);
`--run-id ID` (the spelling of `--run ID` that torchrun leaves alone) trains or resumes a run of the
store the same way:

    torchrun --standalone --nproc_per_node=2 -m pruning train --method cofi --device cpu
    torchrun --standalone --nproc_per_node=2 -m pruning train --run-id 3
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import MISSING, fields
from pathlib import Path

from core.cli import load_or_prepare, run_with_bar
from core.data import DataSpec, load_splits, load_text
from core.folders import check_target
from pruning import distributed
from pruning.config import TrainConfig
from pruning.loop import run_job
from pruning.methods import methods
from pruning.runs import WRITER as RUN_WRITER
from pruning.runs import Run, RunStore


def config_flag(name: str) -> str:
    """The flag of setting `name`: target_sparsity -> --target-sparsity."""
    return "--" + name.replace("_", "-")


def _train_fields() -> dict[str, tuple[object, str]]:
    """Every setting `train` takes: TrainConfig's fields and each registered method's options, as
    name -> (field, help); an option several methods share is listed once, naming them."""
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


def add_train_options(parser: argparse.ArgumentParser) -> None:
    """One option per training setting (default None = the config's or the method's default)."""
    for name, (f, text) in _train_fields().items():
        default = f.default if f.default is not MISSING else None
        kwargs: dict = {"help": f"{text} (default: {default})".replace("%", "%%"), "default": None}  # argparse
        if name == "method":
            kwargs["choices"] = list(methods())
        elif "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = str if "parse" in f.metadata else type(default)  # parsed by TrainConfig.build
            kwargs["metavar"] = name.split("_")[-1].upper()
        parser.add_argument(config_flag(name), dest=f"cfg_{name}", **kwargs)


def cmd_methods(args: argparse.Namespace) -> int:
    """The registered methods, each with its options, defaults and help."""
    for name, cls in methods().items():
        print(f"{name}: {cls.summary}")
        for f in fields(cls.Options):
            print(f"    {config_flag(f.name)} (default {f.default}): {f.metadata.get('help', '')}")
    return 0


def given_config(args: argparse.Namespace) -> dict:
    """The TrainConfig fields set on the command line."""
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}


def summary(run: Run) -> str:
    """One line about a finished (or stopped) run."""
    f = run.final
    if run.status != "done" or f is None:
        return f"run {run.id} {run.status} at step {run.step}/{run.total}" + (f": {run.error}" if run.error else "")
    return (f"run {run.id} done: accuracy {f.accuracy:.4f} (dense {f.dense_accuracy:.4f}) on {f.examples} "
            f"dev examples, sparsity {f.sparsity:.3f}, batch-32 speedup {f.speedup_b32:.2f}x, "
            f"batch-1 {f.speedup_b1:.2f}x; saved {f.export}")


def check_data(spec: DataSpec, label_names: list[str]) -> None:
    """Read the run's data once so that bad data fails before a run is recorded: documents for a
    language-modelling task, labelled rows (in the model's `label_names`) otherwise."""
    if spec.is_text:
        load_text(spec, "train")
    else:
        load_splits(spec, label_names)


def run_and_report(store: RunStore, run_id: int, job: str | None, *, parallel: bool, as_json: bool, teacher=None,
                   dist=None) -> int:
    """Train run `run_id` of `store` in this process, then print its record (JSON) or `summary` line.
    (`run_job` takes the machine's CPU turn, as `BACKGROUND` work, once the run store gives the run its turn.)"""
    run_with_bar(job, lambda bar: run_job(store, run_id, bar, exclusive=not parallel, teacher=teacher, dist=dist),
                 None)
    run = store.get(run_id)
    if as_json:
        print(json.dumps({"id": run.id, "status": run.status, "step": run.step, "total": run.total,
                          "run_dir": str(run.run_dir), "error": run.error, "result": run.result}, indent=1))
    else:
        print(summary(run))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Create a run from the options (or take run --run ID from the store) and train it here.

    Under torchrun every process runs this: rank 0 does all of the above and reports; the other ranks
    only follow it (`pruning.loop.run_job`) and print nothing."""
    dist = distributed.init()
    try:
        if not dist.main:
            run_job(None, None, dist=dist)
            return 0
        return _train_main(args, dist)
    finally:
        distributed.close()


def _train_main(args: argparse.Namespace, dist) -> int:
    store = RunStore()
    given = given_config(args)
    if args.run is not None:
        if given or args.run_dir is not None:
            names = ", ".join([config_flag(k) for k in given] + (["--run-dir"] if args.run_dir else []))
            raise ValueError(f"--run ID takes its configuration from the run store; drop {names}.")
        return run_and_report(store, args.run, args.job, parallel=args.parallel, as_json=args.json, dist=dist)
    config = TrainConfig.build(**given).check()
    if args.run_dir is not None:
        check_target(args.run_dir, written_by=RUN_WRITER)  # fail before loading models
    loaded = load_or_prepare(config.model)
    teacher = loaded if config.teacher_spec == config.model else load_or_prepare(config.teacher_spec)
    check_data(config.data_spec, teacher.label_names)
    run_id = store.create(config.to_dict(), args.run_dir)
    print(f"run {run_id} in {store.get(run_id).run_dir}", file=sys.stderr)
    return run_and_report(store, run_id, args.job, parallel=args.parallel, as_json=args.json, teacher=teacher,
                          dist=dist)


def add_commands(sub) -> None:
    """The `train` and `methods` subcommands."""
    tr = sub.add_parser("train", help="learn which heads / sublayers / units / dims to drop (cofi, l0) or prune "
                        "one-shot (baselines), then fine-tune; progress goes to the run store")
    add_train_options(tr)
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
