"""`python -m pruning sweep` runs one method at several targets: one run per target in the run store,
queued in the background (one trains at a time; the Prune page and `runs list` show them), or trained
here one after another with `--wait`. The Pareto chart then draws the method's frontier.

    python -m pruning sweep --method wanda-sp --targets 0.2,0.35,0.5 --finetune-steps 0
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from core.cli import load_or_prepare
from pruning.cli.train import add_train_options, check_data, given_config, run_and_report
from pruning.config import TrainConfig
from pruning.launch import launch
from pruning.methods import get
from pruning.runs import RunStore

TARGET_OPTIONS = ("target_sparsity", "target_speedup")  # what a sweep's targets set, the first the method has


def target_option(method: str) -> str:
    """The option of `method` a sweep sets (ValueError for a method without a target)."""
    cls = get(method)
    names = {f.name for f in fields(cls.Options)}
    for name in TARGET_OPTIONS:
        if name in names:
            return name
    raise ValueError(f"Method {method} has no target to sweep (none of {', '.join(TARGET_OPTIONS)}); "
                     "run it with `python -m pruning train` instead.")


def parse_targets(text: str) -> list[float]:
    """"0.2,0.35,0.5" -> [0.2, 0.35, 0.5] (ValueError for anything else, or a repeat)."""
    try:
        targets = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--targets takes numbers separated by commas, e.g. 0.2,0.35,0.5; got {text!r}.") from None
    if not targets or len(set(targets)) != len(targets):
        raise ValueError(f"--targets needs one or more different numbers; got {text!r}.")
    return targets


def sweep_configs(given: dict, targets: list[float]) -> list[TrainConfig]:
    """One checked config per target: the options `given` with the method's target set to it."""
    option = target_option(given.get("method", TrainConfig.method))
    if option in given:
        raise ValueError(f"--{option.replace('_', '-')} is what --targets sets; drop it.")
    return [TrainConfig.build(**given, **{option: t}).check() for t in targets]


def cmd_sweep(args: argparse.Namespace) -> int:
    configs = sweep_configs(given_config(args), parse_targets(args.targets))
    loaded = load_or_prepare(configs[0].model)  # bad models and data fail before a run is recorded
    check_data(configs[0].data_spec, loaded.label_names)
    store = RunStore()
    ids = [store.create(config.to_dict()) for config in configs]
    option = target_option(configs[0].method)
    for run_id, config in zip(ids, configs):
        print(f"run {run_id}: {config.method} {option} {config.setting(option)}", file=sys.stderr)
    if args.wait:
        for run_id in ids:
            teacher = loaded if configs[0].teacher_spec == configs[0].model else None
            run_and_report(store, run_id, None, parallel=False, as_json=False, teacher=teacher)
        return 0
    for run_id in ids:
        launch(store, run_id)
    print(f"queued runs {', '.join(map(str, ids))} (one trains at a time): `python -m pruning runs list`")
    return 0


def add_commands(sub) -> None:
    """The `sweep` subcommand."""
    sw = sub.add_parser("sweep", help="one method at several targets: one run per target, queued in the background "
                        "(or trained here with --wait)")
    sw.add_argument("--targets", required=True, metavar="T1,T2,...",
                    help="the method's target at each run (target sparsity, or ZipLM's target speedup)")
    add_train_options(sw)
    sw.add_argument("--wait", action="store_true", help="train the runs here, one after another, and print each")
    sw.set_defaults(func=cmd_sweep)
