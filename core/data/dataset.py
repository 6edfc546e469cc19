"""The labeled-text containers every part passes around, and the one error type for bad user data."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field

import numpy as np


class DataError(ValueError):
    """Bad user data; the message is one clear line fit for a UI error box / CLI."""


@dataclass
class TextDataset:
    """Labeled texts. `labels[i]` is an id into `label_names`; lists are parallel, one entry per row.

    Instances may be shared (the default task is cached): treat them as read-only.
    """

    texts: list[str]
    labels: list[int]  # ids into label_names
    label_names: list[str]  # id -> name, e.g. ["fresh", "rotten"]
    name: str
    warnings: list[str] = field(default_factory=list)  # e.g. truncation notices
    selection: str = ""  # which rows of the source these are, in words (for captions)

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels")
        if self.labels and not 0 <= min(self.labels) <= max(self.labels) < len(self.label_names):
            raise ValueError(f"label ids must lie in 0..{len(self.label_names) - 1}")

    def __len__(self) -> int:
        """Number of rows."""
        return len(self.texts)

    def subset(self, n: int, seed: int = 0) -> TextDataset:
        """A seeded random subset of min(n, len) rows, in their original order (n >= len returns self)."""
        if n >= len(self):
            return self
        if n < 1:
            raise DataError(f"A subset needs at least one row (asked for {n}).")
        idx = np.sort(np.random.default_rng(seed).choice(len(self), size=n, replace=False))
        return self.rows(idx, name=f"{self.name} (random {n} of {len(self)})")

    def rows(self, idx, name: str, selection: str | None = None) -> TextDataset:
        """The rows at positions `idx` (in that order) as a dataset called `name` (same label names)."""
        return TextDataset(
            texts=[self.texts[i] for i in idx],
            labels=[self.labels[i] for i in idx],
            label_names=list(self.label_names),
            name=name,
            warnings=list(self.warnings),
            selection=self.selection if selection is None else selection,
        )

    def label_counts(self) -> dict[str, int]:
        """Rows per label name, in `label_names` order (labels without rows count 0)."""
        counts = Counter(self.labels)
        return {name: counts.get(i, 0) for i, name in enumerate(self.label_names)}

    def fingerprint(self) -> str:
        """Short stable sha1 (16 hex chars) of texts + labels + label_names, for cache keys. Ignores name."""
        payload = [self.texts, [int(x) for x in self.labels], [str(x) for x in self.label_names]]
        return hashlib.sha1(json.dumps(payload).encode("ascii")).hexdigest()[:16]


@dataclass
class TaskSplits:
    """A task split three ways: fit on `train`, tune/analyse on `dev`, report on `test`."""

    train: TextDataset
    dev: TextDataset
    test: TextDataset

    def split(self, name: str) -> TextDataset:
        """The split called "train", "dev" or "test" (DataError otherwise)."""
        if name not in ("train", "dev", "test"):
            raise DataError(f"Unknown split '{name}': choose train, dev or test.")
        return getattr(self, name)
