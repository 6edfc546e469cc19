"""Are SMP's learned masks better than chance? Each finished `smp` run's exported masks against a random and a
magnitude mask of the same size per matrix, every mask put on the dense teacher with its own classifier (the
mask alone is judged, not SMP's classifier): full dev accuracy, and the share of each mask's kept weights that
the magnitude mask also keeps (a random mask: the kept share itself).

Run: nice .venv/bin/python -m bench.smp_masks --runs 28,22 [--threads 2]
"""

from __future__ import annotations

import argparse

import torch

from core.data import load_default_task
from core.evaluate import evaluate
from core.models import load_model
from pruning.methods.smp import top_mask
from pruning.methods.wanda import layer_linears
from pruning.runs import RunStore


def linears(loaded) -> dict[str, torch.nn.Linear]:
    """Every Linear SMP masks, by layer and name."""
    return {f"{layer}.{name}": m for layer in range(loaded.model.config.num_hidden_layers)
            for name, m in layer_linears(loaded, layer).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", required=True, help="comma-separated ids of finished smp runs")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dev, store = load_default_task().dev, RunStore()
    for run_id in (int(r) for r in args.runs.split(",")):
        run = store.get(run_id)
        if run.config.get("method") != "smp" or not run.result:
            raise SystemExit(f"run {run_id} is not a finished smp run")
        masks = {n: (m.weight != 0).float() for n, m in linears(load_model(run.result["export"])).items()}
        kept_share = sum(float(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
        print(f"run {run_id}: SMP keeps {kept_share:.3f} of the masked matrices' weights")
        dense = load_model(run.config.get("teacher") or run.config["model"])
        original = {k: v.clone() for k, v in dense.model.state_dict().items()}
        for kind in ("smp", "random", "magnitude"):
            dense.model.load_state_dict(original)
            generator, shared, kept = torch.Generator().manual_seed(0), 0.0, 0
            with torch.no_grad():
                for name, m in linears(dense).items():
                    keep = int(masks[name].sum())
                    if kind == "smp":
                        mask = masks[name]
                    else:
                        score = torch.rand(m.weight.shape, generator=generator) if kind == "random" else m.weight.abs()
                        mask = top_mask(score, keep)
                    shared += float((mask * top_mask(m.weight.abs(), keep)).sum())
                    kept += keep
                    m.weight.mul_(mask)
            accuracy = evaluate(dense.model, dense.tokenizer, dev, max_length=64).accuracy
            print(f"  {kind} mask: dev {accuracy:.4f}, kept weights the magnitude mask also keeps {shared / kept:.3f}",
                  flush=True)


if __name__ == "__main__":
    main()
