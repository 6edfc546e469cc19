"""Tokenize once, then cut length-sorted batches padded only to their own longest example.

Sorting by length roughly halves padding on short review snippets, which is most of the cost of
both evaluation and fine-tuning on CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Encoded:
    """Token ids per example (ragged) and how many examples were cut at `max_length`."""

    ids: list[list[int]]
    truncated: int
    max_length: int

    def __len__(self) -> int:
        return len(self.ids)


def encode(tokenizer, texts: list[str], max_length: int) -> Encoded:
    """Tokenize `texts` with special tokens, truncating each to `max_length` tokens."""
    full = tokenizer(list(texts), add_special_tokens=True, truncation=False)["input_ids"]
    truncated = sum(len(x) > max_length for x in full)
    ids = [x if len(x) <= max_length else x[: max_length - 1] + [x[-1]] for x in full]
    return Encoded(ids=ids, truncated=truncated, max_length=max_length)


def collate(ids: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad a list of id lists to their longest: input_ids and attention_mask, both (B, T) int64."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, x in enumerate(ids):
        input_ids[row, : len(x)] = torch.tensor(x)
        mask[row, : len(x)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def sorted_batches(enc: Encoded, batch_size: int, rng: np.random.Generator | None = None) -> Iterator[np.ndarray]:
    """Yield index arrays of examples with similar lengths.

    Without `rng`: in length order (evaluation). With `rng`: lengths are sorted inside shuffled
    chunks of 50 batches and the batch order is shuffled, so training still sees random batches.
    """
    lengths = np.array([len(x) for x in enc.ids])
    if rng is None:
        order = np.argsort(lengths, kind="stable")
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    else:
        perm = rng.permutation(len(lengths))
        chunk = batch_size * 50
        batches = []
        for start in range(0, len(perm), chunk):
            part = perm[start : start + chunk]
            part = part[np.argsort(lengths[part], kind="stable")]
            batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
        batches = [batches[i] for i in rng.permutation(len(batches))]
    yield from batches
