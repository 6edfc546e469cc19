"""The built-in default's fine-tune (what a fresh machine runs before the first accuracy figure): dev and
test accuracy and training time of several settings, one after another in this process, each from the
same packaged MiniLM-L6 sentence encoder on the Rotten Tomatoes task.

    2ep-5e-5    2 epochs, peak lr 5e-5, max length 64 (what `prepare` ran before)
    1ep-1e-4    1 epoch at peak lr 1e-4 (what `prepare` runs: core.finetune.BUILTIN_FINETUNE)
    1ep-1e-4-frozen     the same with the embedding tables frozen (52% of the weights: no gradient, no AdamW state)
    1ep-2e-4-frozen     1 epoch at 2e-4, embeddings frozen
    1ep-1e-4-frozen-48  the same with texts cut to 48 tokens
    1ep-5e-5-b16        1 epoch at 5e-5 in batches of 16 (twice the steps, the same examples)

The goal (issue 19): the shortest setting with dev accuracy >= 0.83. Times are wall seconds of the
training loop only (evaluation excluded), with the threads given; the time ratio to `2ep-5e-5` is the
figure to compare (a busy machine slows every setting alike only roughly: run it on a quiet one).

Run: nice .venv/bin/python -m bench.finetune_bench [--settings 2ep-5e-5,1ep-1e-4] [--model default] [--threads 2]
"""

from __future__ import annotations

import argparse
import os

import torch

from core.data import load_default_task
from core.finetune import BUILTIN_FINETUNE, FinetuneConfig, finetune
from core.prepare import untrained_classifier

SETTINGS = {
    "2ep-5e-5": FinetuneConfig(epochs=2, lr=5e-5),
    "1ep-1e-4": BUILTIN_FINETUNE,
    "1ep-1e-4-frozen": FinetuneConfig(epochs=1, lr=1e-4, freeze_embeddings=True),
    "1ep-2e-4-frozen": FinetuneConfig(epochs=1, lr=2e-4, freeze_embeddings=True),
    "1ep-1e-4-frozen-48": FinetuneConfig(epochs=1, lr=1e-4, freeze_embeddings=True, max_length=48),
    "1ep-5e-5-b16": FinetuneConfig(epochs=1, lr=5e-5, batch_size=16),
}
GOAL_DEV = 0.83


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated of {', '.join(SETTINGS)}")
    parser.add_argument("--model", default="default", help="built-in encoder (default | minilm-l3)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    splits = load_default_task()
    print(f"machine: {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}, {args.threads} threads; model "
          f"{args.model}; {len(splits.train)} train / {len(splits.dev)} dev / {len(splits.test)} test")
    rows = []
    for name in args.settings.split(","):
        config = SETTINGS[name]
        model, tokenizer = untrained_classifier(args.model, splits.train.label_names)
        result = finetune(model, tokenizer, splits, config)
        rows.append((name, result))
        print(f"  {name}: dev {result.dev_accuracy:.4f}, test {result.test_accuracy:.4f}, {result.steps} steps, "
              f"{result.seconds:.0f} s, load {os.getloadavg()[0]:.2f}", flush=True)
    base = dict(rows).get("2ep-5e-5")
    print("\n| setting | epochs | peak lr | embeddings | max length | dev | test | train s | time vs 2ep-5e-5 |"
          "\n|---|---|---|---|---|---|---|---|---|")
    for name, r in rows:
        c = SETTINGS[name]
        ratio = f"{r.seconds / base.seconds:.2f}" if base else "-"
        mark = "" if r.dev_accuracy >= GOAL_DEV else " (below 0.83)"
        print(f"| {name} | {c.epochs} | {c.lr:g} | {'frozen' if c.freeze_embeddings else 'trained'} | {c.max_length} | "
              f"{r.dev_accuracy:.4f}{mark} | {r.test_accuracy:.4f} | {r.seconds:.0f} | {ratio} |")


if __name__ == "__main__":
    main()
