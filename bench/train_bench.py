"""Prune-and-finetune benchmark: accuracy retention, measured speedup and wall time of training runs.

Runs, one after the other in this process, on the default model and task (each a real run in the run
store, so they also appear on the Prune page):

    cofi-0.6        CoFi at 60% target sparsity
    cofi-0.9        CoFi at 90%
    l0              Voita's L0 head gates (lambda from --l0-lambda)
    random-0.6      the random one-shot baseline at 60%, then a fine-tune
    relevance-0.6, importance-0.6, cofi-<t>, random-<t> ...   likewise
    random-l0       the random baseline at the exact sparsity the l0 run above reached
    small-dense     the fine-tuned 3-layer MiniLM (`minilm-l3`, prepared once by `python -m core prepare
                    minilm-l3`) fine-tuned further with distillation from the dense default, timed
                    against it: the small-dense side of Zhu & Gupta (2017)

Budget: every run gets the same number of optimizer steps (batch 32) after the dense fine-tune both
models had: the learned methods spend `steps` on gates and weights then `finetune_steps` on the sliced
model; the baselines and small-dense spend all of them fine-tuning (`--budget own` gives them only
`finetune_steps`).

For each it prints dev accuracy on the full dev split and its ratio to the dense teacher (retention),
heads alive, exact sparsity, the batch-32 and batch-1 speedup measured interleaved with the dense
model at the final evaluation, and the wall time (setup, training, live metrics, checkpoints). With
`--small-dense` it adds the fine-tuned 3-layer MiniLM (`minilm-l3`, prepared once by
`python -m core prepare minilm-l3`) timed against the dense default in the same process: the
large-sparse vs small-dense comparison (Zhu & Gupta 2017).

Quality bar (issue 5): CoFi 0.6 keeps >= 97% of dense accuracy at >= 1.8x batch-32 speedup; CoFi 0.9
keeps >= 90% at >= 4x; each <= 20 minutes on 2 cores; L0 closes >= 50% of heads within 1 point.

Run: .venv/bin/python -m bench.train_bench [--configs cofi-0.6,l0,random-l0,small-dense] [--threads 2]
     [--steps N] [--finetune-steps N] [--budget matched|own] [--parallel] [--quick]
"dense" in the table is the teacher each run was timed against (the default model for every row).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import time

import torch

from pruning.config import TrainConfig
from pruning.loop import run_job
from pruning.methods import methods
from pruning.record import StepRecord
from pruning.runs import RunStore

DEFAULT_CONFIGS = "cofi-0.6,cofi-0.9,l0,random-l0,relevance-0.6,importance-0.6,random-0.6,random-0.9,small-dense"


def for_method(settings: dict, method: str) -> TrainConfig:
    """A config of `method` from bench-wide `settings`: the common fields, plus those of the method's own
    options it has (a gate-phase length means nothing to a one-shot method, for example)."""
    names = set(TrainConfig.common_fields()) | {f.name for f in dataclasses.fields(methods()[method].Options)}
    return TrainConfig.build(**{k: v for k, v in {**settings, "method": method}.items() if k in names})


def parse_config(name: str, base: dict, budget: str, done: dict[str, StepRecord | None]) -> TrainConfig:
    """"cofi-0.6" -> base with method cofi, target 0.6; "l0" -> method l0; "small-dense", "random-l0" (see
    the module docstring). `done`: final records of the runs so far, by name."""
    if name == "small-dense":
        changes: dict = {"method": "dense", "model": "minilm-l3", "teacher": base["model"]}
    else:
        method, _, target = name.partition("-")
        if method not in methods():
            raise SystemExit(f"error: unknown configuration {name!r}; methods are {', '.join(methods())}")
        changes = {"method": method}
        if target == "l0":
            if done.get("l0") is None:
                raise SystemExit(f"error: {name} needs a finished l0 run before it in --configs")
            changes["target_sparsity"] = round(done["l0"].sparsity, 4)
        elif target:
            changes["target_sparsity"] = float(target)
    if not methods()[changes["method"]].learned and budget == "matched":
        changes["finetune_steps"] = base["steps"] + base["finetune_steps"]
    return for_method({**base, **changes}, changes["method"]).check()


class Printer:
    """Progress callback printing one line every 30 s."""

    def __init__(self, name: str, start: float):
        self.name, self.start, self.last = name, start, 0.0

    def __call__(self, done: int, total: int, message: str) -> None:
        now = time.perf_counter()
        if now - self.last > 30 or done == total:
            self.last = now
            print(f"  [{self.name}] {message} ({now - self.start:.0f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"comma-separated (default {DEFAULT_CONFIGS})")
    parser.add_argument("--model", default="default")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for training and timing")
    parser.add_argument("--steps", type=int, default=None, help="gate-phase steps (default: TrainConfig's)")
    parser.add_argument("--finetune-steps", type=int, default=None)
    parser.add_argument("--l0-lambda", type=float, default=None)
    parser.add_argument("--quick", action="store_true", help="a short smoke configuration (60 + 20 steps)")
    parser.add_argument("--budget", choices=("matched", "own"), default="matched",
                        help="matched: baselines and small-dense fine-tune for as many steps as cofi/l0 train")
    parser.add_argument("--parallel", action="store_true",
                        help="do not wait for runs of other processes (e.g. a second bench with other configs)")
    args = parser.parse_args()

    cofi = methods()["cofi"].Options()
    base = {**dataclasses.asdict(TrainConfig(model=args.model, threads=args.threads)), **dataclasses.asdict(cofi)}
    del base["options"]
    changes = {k: v for k, v in (("steps", args.steps), ("finetune_steps", args.finetune_steps),
                                 ("l0_lambda", args.l0_lambda)) if v is not None}
    if args.quick:
        changes = {"steps": 60, "prefinetune_steps": 5, "warmup_steps": 30, "finetune_steps": 20, **changes}
    elif "steps" in changes:  # keep the schedule's proportions
        changes.setdefault("prefinetune_steps", min(cofi.prefinetune_steps, changes["steps"] // 10))
        changes.setdefault("warmup_steps", changes["steps"] // 2)
    base = {**base, **changes}
    torch.set_num_threads(args.threads)
    store = RunStore()
    rows, done = [], {}
    for name in args.configs.split(","):
        name = name.strip()
        config = parse_config(name, base, args.budget, done)
        run_id = store.create(config.to_dict())
        start = time.perf_counter()
        status = run_job(store, run_id, Printer(name, start), exclusive=not args.parallel)
        run = store.get(run_id)
        r = done[name] = run.final
        rows.append({"name": f"{name} (run {run_id})", "status": status, "final": r, "steps": run.total,
                     "seconds": time.perf_counter() - start})
        print(f"{name}: {status} in {rows[-1]['seconds']:.0f} s", flush=True)

    def fmt(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    header = ("run", "dev acc", "dense", "retention", "sparsity", "heads", "b32 speedup", "b1 speedup", "steps",
              "time", "live metrics")
    table = [header]
    for r in rows:
        f: StepRecord | None = r["final"]
        if f is None:  # failed or stopped: no final evaluation
            table.append((r["name"], *["-"] * 7, str(r["steps"]), f"{r['seconds'] / 60:.1f} min", "-"))
            continue
        table.append((r["name"], fmt(f.accuracy, ".4f"), fmt(f.dense_accuracy, ".4f"),
                      fmt(f.accuracy / f.dense_accuracy, ".1%"), fmt(f.sparsity, ".3f"),
                      f"{sum(f.heads_alive)}/{len(f.heads_alive) * f.heads_total}", fmt(f.speedup_b32, ".2f") + "x",
                      fmt(f.speedup_b1, ".2f") + "x", str(r["steps"]), f"{r['seconds'] / 60:.1f} min",
                      fmt(f.eval_fraction, ".0%")))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    print()
    print("\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in table))
    load = os.getloadavg()
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.threads} threads; settings {base}; load average at the end "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
