"""Reading the Hugging Face `datasets` formats from local disk: Parquet (`.parquet`) and Arrow (`.arrow`) files
(or uploads of them) and folders written by `save_to_disk`, as columns like every other table (column name ->
cleaned cells; a `ClassLabel` column as its names, a negative id as a missing label). Offline: nothing is
fetched. `core.data.hf` builds train/dev/test and documents from them."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from core.data.cells import cell
from core.data.dataset import DataError
from core.messages import one_line, quote

FILE_SUFFIXES = (".parquet", ".arrow")
DICT_FILE = "dataset_dict.json"  # what save_to_disk writes at the top of a DatasetDict folder
DATASET_FILE = "state.json"  # ... and in a single Dataset's folder (with dataset_info.json and the shards)

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
    return display, concat(display, splits)


def concat(display: str, splits: dict[str, Columns]) -> Columns:
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
