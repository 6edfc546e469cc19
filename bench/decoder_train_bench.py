"""Training on decoders: one real SmolLM2 run (L0 head gates or CoFi, with LoRA) through the training loop
and the run store, measured against the dense model it starts from.

By default the run learns L0 head gates (Voita et al. 2019) on the built-in language-modelling text (the
Lee news articles, task lm: next-token loss mixed with distillation from the dense model), LoRA adapters
training with the weights frozen, then fine-tunes the sliced model. It prints the heads closed, the dev
perplexity of the dense and the pruned model (the final evaluation reads all 29 dev articles), next-token
accuracy, sparsity, the measured speedups, the steps and the wall time, and the `python -m pruning train`
command that runs the same configuration.

Quality bar (issue 13): on 2 cores the run finishes in <= 30 minutes and closes >= 30% of the heads with
<= 10% dev perplexity increase. `--data default` runs the prompted-classification version instead (Rotten
Tomatoes through SmolLM2's prompt: dev accuracy before / after).

Run: nice .venv/bin/python -m bench.decoder_train_bench [--method l0|cofi] [--data lm|default] [--steps N]
     [--finetune-steps N] [--l0-lambda X] [--target-sparsity X] [--threads 2] [--parallel]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from bench.train_bench import Printer
from pruning.config import TrainConfig
from pruning.loop import run_job
from pruning.runs import RunStore

SETTINGS = {  # chosen to fit the 30-minute budget on 2 cores (see the module docstring)
    "model": "smollm2", "data": "lm", "method": "l0", "lora": True, "lora_rank": 8, "lr": 2e-4,
    "batch_size": 4, "max_length": 64, "steps": 120, "finetune_steps": 40, "alpha_ce": 0.3,
    "eval_every": 40, "eval_examples": 8, "checkpoint_every": 0,
}
METHOD_SETTINGS = {"l0": {"l0_lambda": 0.01, "gate_lr": 0.5},
                   "cofi": {"target_sparsity": 0.3, "prefinetune_steps": 10, "warmup_steps": 80, "gate_lr": 0.5,
                            "lambda_lr": 0.5, "alpha_layer": 0.5}}
OVERRIDES = {"steps": int, "finetune_steps": int, "batch_size": int, "max_length": int, "lr": float, "l0_lambda": float,
             "gate_lr": float, "target_sparsity": float, "lora_rank": int, "eval_examples": int}
GOAL_MINUTES, GOAL_HEADS, GOAL_PERPLEXITY = 30, 0.30, 0.10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=sorted(METHOD_SETTINGS), default="l0")
    parser.add_argument("--data", default=SETTINGS["data"], help="lm (Lee news, perplexity) | default (prompts)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for training and timing")
    parser.add_argument("--parallel", action="store_true", help="do not wait for runs of other processes")
    for name, kind in OVERRIDES.items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=None,
                            help=f"default {SETTINGS.get(name, 'the method setting')}")
    args = parser.parse_args()
    given = {k: v for k, v in vars(args).items() if k in {*SETTINGS, *METHOD_SETTINGS[args.method]} and v is not None}
    settings = {**SETTINGS, **METHOD_SETTINGS[args.method], "method": args.method, "data": args.data,
                "threads": args.threads, **given}
    config = TrainConfig.build(**settings).check()
    torch.set_num_threads(args.threads)
    store = RunStore()
    run_id = store.create(config.to_dict())
    print(f"run {run_id}: python -m pruning train {' '.join(config.cli_args())}", flush=True)
    start = time.perf_counter()
    status = run_job(store, run_id, Printer(f"{args.method} on {args.data}", start), exclusive=not args.parallel)
    minutes = (time.perf_counter() - start) / 60
    run = store.get(run_id)
    f = run.final
    if f is None:
        raise SystemExit(f"run {run_id} {status}: {run.error}")
    heads = len(f.heads_alive) * f.heads_total
    closed = heads - sum(f.heads_alive)
    print(f"\nrun {run_id} {status} in {minutes:.1f} min, {run.total} steps ({config.gate_steps} gate + "
          f"{config.finetune_steps} fine-tune), batch {config.batch_size} x {config.max_length} tokens")
    print(f"heads closed {closed}/{heads} ({closed / heads:.1%}); sparsity {f.sparsity:.3f}; parameters "
          f"{f.parameters:,} of {f.dense_parameters:,}")
    if f.perplexity is not None:
        rise = f.perplexity / f.dense_perplexity - 1
        print(f"dev perplexity {f.dense_perplexity:.2f} dense -> {f.perplexity:.2f} pruned ({rise:+.1%}); next-token "
              f"accuracy {f.dense_accuracy:.4f} -> {f.accuracy:.4f} on {f.examples} documents")
    else:
        rise = None
        print(f"dev accuracy {f.dense_accuracy:.4f} dense -> {f.accuracy:.4f} pruned on {f.examples} prompts")
    print(f"speedup batch 1 {f.speedup_b1:.2f}x, batch 32 {f.speedup_b32:.2f}x (FLOPs {f.flop_speedup:.2f}x); "
          f"live metrics {f.eval_fraction:.0%} of the time; clock {({k: round(v) for k, v in f.clock.items()})}")
    checks = [(f"<= {GOAL_MINUTES} min", minutes <= GOAL_MINUTES), (f">= {GOAL_HEADS:.0%} heads closed",
                                                                     closed / heads >= GOAL_HEADS)]
    if rise is not None:
        checks.append((f"<= {GOAL_PERPLEXITY:.0%} perplexity increase", rise <= GOAL_PERPLEXITY))
    print("goal: " + ", ".join(f"{name} {'met' if ok else 'MISSED'}" for name, ok in checks))
    load = os.getloadavg()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.threads} threads; load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
