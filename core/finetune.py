"""Fine-tune a sequence-classification head (and the encoder) on a labeled task.

Used once per machine to turn the packaged sentence encoders into the built-in classifiers, and
for user models that arrive without a classification head.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from core.batching import collate, encode, sorted_batches
from core.data import TaskSplits
from core.evaluate import evaluate
from core.folders import atomic_folder

WRITER = "core.finetune"  # names the writer in a fine-tuned folder's marker (core.folders)

Progress = Callable[[int, int, str], None]


@dataclass
class FinetuneConfig:
    epochs: int = 2
    batch_size: int = 32
    lr: float = 5e-5  # peak learning rate of AdamW, decayed linearly to 0
    warmup_frac: float = 0.06  # fraction of steps with linear warm-up
    weight_decay: float = 0.01
    max_length: int = 64  # tokens; review snippets average ~25
    seed: int = 0
    freeze_embeddings: bool = False  # the embedding tables (half of MiniLM's weights) stay as pre-trained


# What `prepare` runs for the built-in encoders: one epoch at twice the peak lr keeps dev >= 0.83 in half the time
# of 2 epochs at 5e-5; freezing the embedding tables saves little more and costs accuracy (bench.finetune_bench).
BUILTIN_FINETUNE = FinetuneConfig(epochs=1, lr=1e-4)


@dataclass
class FinetuneResult:
    dev_accuracy: float
    test_accuracy: float
    seconds: float  # wall time of training (evaluation excluded)
    steps: int
    threads: int
    config: dict


def finetune(model, tokenizer, splits: TaskSplits, config: FinetuneConfig = FinetuneConfig(),
             progress: Progress | None = None) -> FinetuneResult:
    """Train `model` in place on `splits.train`; report dev and test accuracy. Leaves it in eval mode."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    enc = encode(tokenizer, splits.train.texts, config.max_length)
    labels = torch.tensor(splits.train.labels)
    steps_per_epoch = -(-len(enc) // config.batch_size)
    total = steps_per_epoch * config.epochs
    if config.freeze_embeddings:
        for table in model.base_model.embeddings.modules():
            if isinstance(table, torch.nn.Embedding):
                table.requires_grad_(False)
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    no_decay = [p for n, p in trained if p.ndim < 2]
    decay = [p for n, p in trained if p.ndim >= 2]
    optim = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
    )
    warm = max(1, int(total * config.warmup_frac))
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm)))
    )
    model.train()
    step = 0
    start = time.perf_counter()
    for epoch in range(config.epochs):
        for idx in sorted_batches(enc, config.batch_size, rng):
            batch = collate([enc.ids[i] for i in idx], tokenizer.pad_token_id)
            loss = model(**batch, labels=labels[idx]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optim.step()
            sched.step()
            optim.zero_grad(set_to_none=True)
            step += 1
            if progress:
                progress(step, total, f"fine-tuning: epoch {epoch + 1}/{config.epochs}, loss {loss.item():.3f}")
    seconds = time.perf_counter() - start
    model.eval()
    dev = evaluate(model, tokenizer, splits.dev, max_length=config.max_length)
    test = evaluate(model, tokenizer, splits.test, max_length=config.max_length)
    return FinetuneResult(dev.accuracy, test.accuracy, seconds, step, torch.get_num_threads(), asdict(config))


def save_classifier(model, tokenizer, out_dir: Path, result: FinetuneResult | None = None) -> Path:
    """Save atomically (`core.folders.atomic_folder`): a crash leaves no half folder, and an existing
    `out_dir` is replaced only if HeadLab's fine-tune wrote it (FolderError otherwise)."""
    with atomic_folder(out_dir, written_by=WRITER, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if result is not None:
            (tmp / "headlab_finetune.json").write_text(json.dumps(asdict(result), indent=2))
    return out_dir
