"""Reading a user's labeled table (CSV, TSV, JSONL) from a path or an upload, and finding its columns.

Every problem is raised as `DataError`, whose message is one line fit for a UI error box or the command
line; what it quotes from the file (column names, label values) is cut by `core.messages.quote`.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any

import pandas as pd

from core.data import hf_files  # Parquet / Arrow files and `save_to_disk` folders, read by `datasets`
from core.data.cells import cell
from core.data.dataset import DataError, TextDataset
from core.data.labels import map_labels
from core.messages import one_line, quote

TEXT_NAMES = ("text", "sentence", "review", "content", "snippet", "statement", "tweet", "document")
_LABEL_NAMES = ("label", "labels", "category", "class", "sentiment", "target", "y", "party")
_MAX_LABEL_VALUES = 50
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def read_table(
    source: Any,
    *,
    text_column: str | None = None,
    label_column: str | None = None,
    label_names: list[str] | None = None,
    label_map: dict[str, str] | None = None,
    name: str | None = None,
    max_chars: int = 20_000,
) -> TextDataset:
    """Read a labeled table from a path (str/Path) or an uploaded file-like (`.name`, `.getvalue()`/`.read()`).

    Format by extension: .csv, .tsv (or .txt with tabs), .jsonl/.json (JSON lines, or one JSON array),
    .parquet / .arrow or a folder written by `datasets`' `save_to_disk` (`core.data.hf`; every split of it);
    a file-like without a name is sniffed. Columns are auto-detected unless given. Rows with an empty
    text or label are dropped and texts over `max_chars` characters truncated, each with a warning.
    Labels are first renamed by `label_map` (file label -> model label). With `label_names` (the model's
    id2label order) they are then mapped to the model's ids, by name or by integer id; without, sorted
    unique labels become ids 0..k-1. Raises DataError on any bad input.
    """

    if hf_files.is_hf_source(source):
        display, cells = hf_files.read_columns(source)
    else:
        display, text = read_source(source)
        if not text.strip():
            raise DataError(f"{display} is empty.")
        fmt = _detect_format(display, text)
        cells = parse_json(text, display) if fmt == "jsonl" else _parse_delimited(text, fmt, display)
    return table_dataset(cells, display, name or display, text_column=text_column, label_column=label_column,
                         label_names=label_names, label_map=label_map, max_chars=max_chars)


def pick_columns(cells: dict[str, list[str | None]], text_column: str | None, label_column: str | None,
                 display: str) -> tuple[str, str]:
    """(text column, label column) of a table's `cells`: the ones named (exact, else case-insensitive), else
    the usual names ("text", "label", ...), else guessed from the values. DataError when none fits."""
    n_rows = len(next(iter(cells.values()), []))
    if n_rows == 0:
        raise DataError(f"{display} has no data rows (columns: {_columns(cells)}).")
    columns = list(cells)
    text_col = resolve_column(columns, text_column, "text", display) if text_column else None
    label_col = resolve_column(columns, label_column, "label", display) if label_column else None
    if text_col is not None and text_col == label_col:
        raise DataError(f"The text and label columns must differ (both are '{quote(text_col)}').")
    text_col = text_col or named_column(columns, TEXT_NAMES, exclude=label_col)
    label_col = label_col or named_column(columns, _LABEL_NAMES, exclude=text_col)
    text_col = text_col or _guess_text_column(cells, exclude=label_col)
    if text_col is None:
        raise DataError(f"{display}: no text column found (columns: {_columns(columns)}); name one.")
    label_col = label_col or _guess_label_column(cells, exclude=text_col, n_rows=n_rows)
    if label_col is None:
        raise DataError(f"{display}: no label column found (columns: {_columns(columns)}); name one.")
    return text_col, label_col


def table_dataset(cells: dict[str, list[str | None]], display: str, where: str, *, text_column: str | None = None,
                  label_column: str | None = None, label_names: list[str] | None = None,
                  label_map: dict[str, str] | None = None, max_chars: int = 20_000) -> TextDataset:
    """The labeled rows of a table's columns (column name -> cleaned cells), by `read_table`'s rules."""
    n_rows = len(next(iter(cells.values()), []))
    text_col, label_col = pick_columns(cells, text_column, label_column, display)
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
    ids, names = map_labels([lab for _, lab in rows], label_names, f"{display} (column '{quote(label_col)}')",
                            label_map)
    return TextDataset(texts=texts, labels=ids, label_names=names, name=where, warnings=warnings,
                       selection=f"the whole file, {len(texts):,} rows")


def read_source(source: Any) -> tuple[str, str]:
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
        raise DataError(f"{display}: a .txt file of labeled rows must be tab-separated with a header row "
                        "(text<TAB>label); plain text (documents separated by blank lines) is read as task lm.")
    if ext == "":
        if first_line.lstrip()[:1] in ("{", "["):
            return "jsonl"
        return "tsv" if "\t" in first_line else "csv"
    raise DataError(f"{display}: unsupported file type '{ext}' (use .csv, .tsv, .txt with tabs, .jsonl, .parquet, "
                    ".arrow or a datasets save_to_disk folder).")


def _parse_delimited(text: str, fmt: str, display: str) -> dict[str, list[str | None]]:
    """Columns (header name -> cleaned cells) of CSV/TSV text with a header row."""
    try:
        df = pd.read_csv(io.StringIO(text), sep="\t" if fmt == "tsv" else ",", dtype=str, keep_default_na=False)
    except (ValueError, csv.Error) as e:  # pandas ParserError / EmptyDataError are ValueErrors
        raise DataError(f"{display} could not be read as {fmt.upper()} ({quote(e)}).") from e
    return {str(col).strip(): [cell(v) for v in df.iloc[:, i]] for i, col in enumerate(df.columns)}


def parse_json(text: str, display: str) -> dict[str, list[str | None]]:
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
    return {str(key).strip(): [cell(record.get(key)) for record in records] for key in keys}


def resolve_column(columns: list[str], wanted: str, role: str, display: str) -> str:
    """The column called `wanted` (exact, else case-insensitive); DataError listing the columns otherwise."""
    if wanted in columns:
        return wanted
    for col in columns:
        if col.lower() == wanted.strip().lower():
            return col
    raise DataError(f"{display} has no {role} column '{quote(wanted)}'; available columns: {_columns(columns)}.")


def named_column(columns: list[str], names: tuple[str, ...], exclude: str | None) -> str | None:
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


def _columns(columns) -> str:
    """Column names for a message, cut by `quote` ('none' if there are none)."""
    return quote(", ".join(columns)) or "none"
