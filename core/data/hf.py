"""Data in the Hugging Face `datasets` formats: Parquet (`.parquet`) and Arrow (`.arrow`) files, and a folder
written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`, all read through the `datasets` library from
local disk (offline: nothing is fetched).

Everything comes out as the columns other tables give (`core.data.tables`: column name -> cleaned cells), so
the column and label choices are those of every file. A `ClassLabel` column reads as its label names
("neg", "pos"), a negative id (an unlabeled row, as in GLUE's test splits) as a missing label.

A `DatasetDict` folder keeps its own splits: "train" is train, "validation" (or "dev", "valid", "val") is dev,
"test" is test (`SPLIT_NAMES`). A split it lacks is taken from the seeded 80/10/10 split of its train rows
(`core.data.tasks.split_indices`), whose train part is then the run's train split. A folder without a train
split, a single `Dataset` and a file are one table, split 80/10/10 like any file. Read as a whole (whole
file, `source_labels`), a `DatasetDict` is all its splits in order.
"""

from __future__ import annotations

import dataclasses

from core.data.dataset import DataError, TaskSplits
from core.data.hf_files import Columns, concat, read_splits
from core.data.tables import pick_columns, table_dataset
from core.data.tasks import split_dataset
from core.data.text import LMSplits, LMText, split_documents, text_field
from core.messages import quote

SPLIT_NAMES = {"train": ("train",), "dev": ("validation", "dev", "valid", "val"), "test": ("test",)}



def task_splits(path: str, *, text_column: str | None, label_column: str | None, label_names: list[str] | None,
                label_map: dict[str, str]) -> TaskSplits | None:
    """Train/dev/test of a DatasetDict folder from its own splits (see the module docstring), or None when it
    has no train split. Columns are chosen once over all splits, and labels numbered over all of them (as the
    model's `label_names`, else the data's own sorted names), so every split numbers them alike."""
    display, splits = read_splits(path)
    named = named_splits(splits)
    if named is None:
        return None
    combined = concat(display, splits)
    text_col, label_col = pick_columns(combined, text_column, label_column, display)
    choice = {"text_column": text_col, "label_column": label_col, "label_map": label_map}
    names = label_names or table_dataset(combined, display, display, **choice).label_names
    parts = {}
    for role, (split, columns) in named.items():
        data = table_dataset(columns, f"{display} split '{split}'", f"{display}/{role}", label_names=names, **choice)
        parts[role] = dataclasses.replace(data, selection=f"split '{split}' of {display}, {len(data):,} rows")
    return TaskSplits(**_fill(parts, split_dataset))


def text_splits(path: str, text_column: str | None) -> LMSplits | None:
    """Train/dev/test documents of a DatasetDict folder from its own splits (as `task_splits`), or None."""
    display, splits = read_splits(path)
    named = named_splits(splits)
    if named is None:
        return None
    column = text_field(display, concat(display, splits), text_column)
    parts = {}
    for role, (split, columns) in named.items():
        docs = tuple(d for d in columns[column] if d)
        if not docs:
            raise DataError(f"{display} split '{quote(split)}' holds no non-empty document in '{quote(column)}'.")
        parts[role] = LMText(f"{display}/{role}", docs, f"split '{split}' of {display}, {len(docs):,} documents")
    return LMSplits(**_fill(parts, split_documents))


def _fill(parts: dict, split_all) -> dict:
    """`parts` with a missing dev / test taken from the seeded 80/10/10 split of train (`split_all`), whose
    80% is then train."""
    if "dev" in parts and "test" in parts:
        return parts
    cut = split_all(parts["train"])
    return {"train": cut.train, "dev": parts.get("dev", cut.dev), "test": parts.get("test", cut.test)}


def named_splits(splits: dict[str, Columns]) -> dict[str, tuple[str, Columns]] | None:
    """{"train", and "dev" / "test" where present} -> (split name, columns) of a DatasetDict's splits
    (`SPLIT_NAMES`, case-insensitive), or None when it has no train split (then it is one table)."""
    by_lower = {name.lower(): (name, columns) for name, columns in splits.items()}
    found = {role: next((by_lower[n] for n in names if n in by_lower), None) for role, names in SPLIT_NAMES.items()}
    if found["train"] is None:
        return None
    return {role: split for role, split in found.items() if split is not None}


