"""Predictions, accuracy and macro-F1 of a classifier on a labeled dataset."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from core.batching import collate, encode, sorted_batches
from core.data import TextDataset

Progress = Callable[[int, int, str], None]

# Examples per forward pass. Batches are length-sorted, so smaller ones pad less; measured on the default
# model, one thread: 100 dev rows 0.86-0.96 s at 16 vs 1.31-1.40 s at 64, the full dev set (1,275) 9.9-10.1 s
# vs 10.2-10.4 s (32: 9.4-9.5 s there, 0.92-1.05 s on the 100 rows the Gates page measures after every change).
EVAL_BATCH = 16


@dataclass
class Evaluation:
    """Quality of a model on `n` examples; `predictions` and `labels` are (n,) int arrays."""

    accuracy: float
    macro_f1: float
    n: int
    predictions: np.ndarray
    labels: np.ndarray
    probabilities: np.ndarray  # (n, classes), softmax of the logits
    seconds: float
    truncated: int  # examples cut at the model's maximum length


def macro_f1(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> float:
    """Unweighted mean over classes of F1; a class absent from both labels and predictions is skipped."""
    scores = []
    for c in range(num_classes):
        tp = np.sum((predictions == c) & (labels == c))
        fp = np.sum((predictions == c) & (labels != c))
        fn = np.sum((predictions != c) & (labels == c))
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0


@torch.inference_mode()
def predict_logits(
    model,
    tokenizer,
    texts: list[str],
    *,
    max_length: int = 128,
    batch_size: int = EVAL_BATCH,
    progress: Progress | None = None,
) -> tuple[np.ndarray, int]:
    """Logits (N, classes) in the input order, and how many texts were truncated to `max_length`."""
    enc = encode(tokenizer, texts, max_length)
    out = np.zeros((len(texts), model.config.num_labels), dtype=np.float32)
    device = next(model.parameters()).device  # batches go where the model is (CPU or a GPU)
    done = 0
    for idx in sorted_batches(enc, batch_size):
        batch = collate([enc.ids[i] for i in idx], tokenizer.pad_token_id)
        out[idx] = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu().numpy()
        done += len(idx)
        if progress:
            progress(done, len(texts), "evaluating")
    return out, enc.truncated


def evaluate(
    model,
    tokenizer,
    data: TextDataset,
    *,
    max_length: int = 128,
    batch_size: int = EVAL_BATCH,
    progress: Progress | None = None,
) -> Evaluation:
    """Accuracy and macro-F1 of `model` on all of `data` (take `data.subset(n)` for a quick look)."""
    if len(data) == 0:
        raise ValueError("The dataset is empty: nothing to evaluate.")
    start = time.perf_counter()
    logits, truncated = predict_logits(
        model, tokenizer, data.texts, max_length=max_length, batch_size=batch_size, progress=progress
    )
    labels = np.asarray(data.labels)
    preds = logits.argmax(axis=1)
    probs = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
    return Evaluation(
        accuracy=float(np.mean(preds == labels)),
        macro_f1=macro_f1(labels, preds, logits.shape[1]),
        n=len(labels),
        predictions=preds,
        labels=labels,
        probabilities=probs,
        seconds=time.perf_counter() - start,
        truncated=truncated,
    )
