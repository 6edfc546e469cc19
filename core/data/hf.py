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
import io
import os
from pathlib import Path
from typing import Any

from core.data.dataset import DataError, TaskSplits
from core.data.tables import TEXT_NAMES, cell, named_column, pick_columns, resolve_column, table_dataset
from core.data.tasks import split_dataset
from core.data.text import LMSplits, LMText, split_documents
from core.messages import one_line, quote

FILE_SUFFIXES = (".parquet", ".arrow")
DICT_FILE = "dataset_dict.json"  # what save_to_disk writes at the top of a DatasetDict folder
DATASET_FILE = "state.json"  # ... and in a single Dataset's folder (with dataset_info.json and the shards)
SPLIT_NAMES = {"train": ("train",), "dev": ("validation", "dev", "valid", "val"), "test": ("test",)}

Columns = dict[str, list[str | None]]


def is_hf_source(source: Any) -> bool:
    """True for a path (or an upload's name) ending in .parquet / .arrow, or a folder written by save_to_disk."""
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if path.is_dir():
            return (path / DICT_FILE).is_file() or (path / DATASET_FILE).is_file()
        return path.suffix.lower() in FILE_SUFFIXES
    name = getattr(source, "name", None)
    return isinstance(name, str) and Path(name).suffix.lower() in FILE_SUFFIXES


def read_columns(source: Any) -> tuple[str, Columns]:
    """(display name, columns) of a Parquet / Arrow file, an upload of one, or a save_to_disk folder (a
    DatasetDict's splits one after another)."""
    display, splits = read_splits(source)
    return display, _concat(display, splits)


def task_splits(path: str, *, text_column: str | None, label_column: str | None, label_names: list[str] | None,
                label_map: dict[str, str]) -> TaskSplits | None:
    """Train/dev/test of a DatasetDict folder from its own splits (see the module docstring), or None when it
    has no train split. Columns are chosen once over all splits, and labels numbered over all of them (as the
    model's `label_names`, else the data's own sorted names), so every split numbers them alike."""
    display, splits = read_splits(path)
    named = named_splits(splits)
    if named is None:
        return None
    combined = _concat(display, splits)
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
    column = text_field(display, _concat(display, splits), text_column)
    parts = {}
    for role, (split, columns) in named.items():
        docs = tuple(d for d in columns[column] if d)
        if not docs:
            raise DataError(f"{display} split '{quote(split)}' holds no non-empty document in '{quote(column)}'.")
        parts[role] = LMText(f"{display}/{role}", docs, f"split '{split}' of {display}, {len(docs):,} documents")
    return LMSplits(**_fill(parts, split_documents))


def text_field(display: str, columns: Columns, text_column: str | None) -> str:
    """The column holding documents: `text_column`, else the first of the usual text names."""
    column = (resolve_column(list(columns), text_column, "text", display) if text_column
              else named_column(list(columns), TEXT_NAMES, exclude=None))
    if column is None:
        raise DataError(f"{display} has no 'text' column (columns: {quote(', '.join(columns)) or 'none'}); "
                        "name the column that holds the documents.")
    return column


def _fill(parts: dict, split_all) -> dict:
    """`parts` with a missing dev / test taken from the seeded 80/10/10 split of train (`split_all`), whose
    80% is then train."""
    if "dev" in parts and "test" in parts:
        return parts
    cut = split_all(parts["train"])
    return {"train": cut.train, "dev": parts.get("dev", cut.dev), "test": parts.get("test", cut.test)}


def _concat(display: str, splits: dict[str, Columns]) -> Columns:
    """Every split's rows one after another (the splits must have the same columns)."""
    names = list(next(iter(splits.values())))
    for split, columns in splits.items():
        if list(columns) != names:
            raise DataError(f"{display}: split '{quote(split)}' has columns {quote(', '.join(columns))}, the first "
                            f"split {quote(', '.join(names))}; every split needs the same columns.")
    return {name: [c for columns in splits.values() for c in columns[name]] for name in names}


def read_splits(source: Any) -> tuple[str, dict[str, Columns]]:
    """(display name, split name -> columns): a DatasetDict folder's splits in their order; anything else
    one split named ""."""
    _offline()
    import datasets

    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        display = path.name
        if not path.exists():
            raise DataError(f"File not found: {path}")
        try:
            if path.is_dir():
                data = datasets.load_from_disk(str(path))
            elif path.suffix.lower() == ".parquet":
                data = _from_table(_parquet(path))
            else:
                data = _arrow_file(path)
        except DataError:
            raise
        except Exception as e:  # datasets / pyarrow raise many types for a damaged file
            raise DataError(f"{display} cannot be read by the datasets library ({one_line(e)}).") from e
    else:
        display = Path(str(source.name)).name
        raw = source.getvalue() if hasattr(source, "getvalue") else source.read()
        try:
            data = _from_table(_parquet(io.BytesIO(raw)) if display.lower().endswith(".parquet")
                               else _arrow_table(io.BytesIO(raw)))
        except Exception as e:
            raise DataError(f"{display} cannot be read by the datasets library ({one_line(e)}).") from e
    if isinstance(data, datasets.DatasetDict):
        if not data:
            raise DataError(f"{display} holds no split.")
        return display, {name: _columns(split) for name, split in data.items()}
    return display, {"": _columns(data)}


def named_splits(splits: dict[str, Columns]) -> dict[str, tuple[str, Columns]] | None:
    """{"train", and "dev" / "test" where present} -> (split name, columns) of a DatasetDict's splits
    (`SPLIT_NAMES`, case-insensitive), or None when it has no train split (then it is one table)."""
    by_lower = {name.lower(): (name, columns) for name, columns in splits.items()}
    found = {role: next((by_lower[n] for n in names if n in by_lower), None) for role, names in SPLIT_NAMES.items()}
    if found["train"] is None:
        return None
    return {role: split for role, split in found.items() if split is not None}


def _offline() -> None:
    """Nothing of `datasets` may reach a hub: set before its first import (it reads the variable then)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _parquet(where):
    import pyarrow.parquet as pq

    return pq.read_table(where)


def _arrow_table(where):
    """A table from an Arrow stream (what `datasets` writes) or an Arrow IPC file (Feather v2)."""
    import pyarrow as pa

    try:
        return pa.ipc.open_stream(where).read_all()
    except pa.ArrowInvalid:
        where.seek(0)
        return pa.ipc.open_file(where).read_all()


def _arrow_file(path: Path):
    """A Dataset memory-mapped from an Arrow stream file (a save_to_disk shard), else read as an IPC file."""
    import datasets
    import pyarrow as pa

    try:
        return datasets.Dataset.from_file(str(path))
    except pa.ArrowInvalid:
        with path.open("rb") as fh:
            return _from_table(_arrow_table(io.BytesIO(fh.read())))


def _from_table(table):
    """A Dataset over a pyarrow table: its features (ClassLabel names) from the schema's `datasets` metadata."""
    import datasets

    return datasets.Dataset(table)


def _columns(data) -> Columns:
    """Column name -> cleaned cells of a Dataset; a ClassLabel column as its names (a negative id: missing)."""
    import datasets

    columns: Columns = {}
    for name in data.column_names:
        feature = data.features[name]
        values = data[name]
        if isinstance(feature, datasets.ClassLabel):
            columns[str(name).strip()] = [None if v is None or v < 0 else feature.int2str(int(v)) for v in values]
        else:
            columns[str(name).strip()] = [cell(v) for v in values]
    return columns
