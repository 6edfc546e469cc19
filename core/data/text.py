"""Text without labels for language modelling: documents, a user's `.txt` / `.jsonl` file of them, and the
seeded 80/10/10 split by document (the rule every HeadLab split follows, `core.data.tasks.split_indices`).

A `.txt` file holds one document per block of lines separated by blank lines (a file without a blank line
is one document); a `.jsonl` file (or `.json`, `.ndjson`) holds one JSON object per line whose `text` field
(or the field named `text_column`, or the first of the usual text names) is a document. Every problem
is a `DataError` with one line fit for a UI error box or the command line.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.data import hf_files  # Parquet / Arrow files and `save_to_disk` folders, read by `datasets`
from core.data.dataset import DataError
from core.data.tables import TEXT_NAMES, named_column, parse_json, read_source, resolve_column
from core.data.tasks import SPLIT_SEED, split_indices
from core.messages import quote

TEXT_SUFFIXES = (".txt", ".text", ".md")  # plain text: documents separated by blank lines
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")  # one JSON object per line, the document in a text field
_BLANK_LINES = re.compile(r"\n[ \t]*\n\s*")  # one or more blank (or whitespace-only) lines


@dataclass(frozen=True)
class LMText:
    """Plain-text documents for language modelling; each document is scored on its own."""

    name: str  # e.g. "lee/dev", "wiki/dev", "notes.txt"
    documents: tuple[str, ...]
    selection: str = ""  # which documents of the source these are, in words (for captions)

    def __len__(self) -> int:
        """Number of documents."""
        return len(self.documents)

    @property
    def characters(self) -> int:
        return sum(map(len, self.documents))

    def subset(self, n: int, seed: int = 0) -> LMText:
        """A seeded random subset of min(n, len) documents, in their original order (n >= len returns self)."""
        if n >= len(self):
            return self
        if n < 1:
            raise DataError(f"A subset needs at least one document (asked for {n}).")
        idx = np.sort(np.random.default_rng(seed).choice(len(self), size=n, replace=False))
        return LMText(f"{self.name} (random {n} of {len(self)})", tuple(self.documents[i] for i in idx),
                      f"{n} random documents of {self.selection or self.name}")

    def fingerprint(self) -> str:
        """Short stable sha1 (16 hex chars) of the documents, for cache keys. Ignores the name."""
        return hashlib.sha1(json.dumps(self.documents).encode("ascii")).hexdigest()[:16]


@dataclass(frozen=True)
class LMSplits:
    """Documents split three ways by document, like `core.data.TaskSplits`."""

    train: LMText
    dev: LMText
    test: LMText

    def split(self, name: str) -> LMText:
        """The split called "train", "dev" or "test" (DataError otherwise)."""
        if name not in ("train", "dev", "test"):
            raise DataError(f"Unknown split '{quote(name)}': choose train, dev or test.")
        return getattr(self, name)


def split_documents(text: LMText, what: str = "documents", seed: int = SPLIT_SEED) -> LMSplits:
    """`text` split by document, seeded 80/10/10 (`split_indices`); each part named "<base>/<split>" and
    captioned e.g. "dev split, 29 of 293 Lee news articles, seeded 80/10/10" (`what` names the documents)."""
    n = len(text)
    if n < 10:
        raise DataError(f"{text.name} has {n} documents; a seeded 80/10/10 split into train/dev/test needs at "
                        "least 10 (evaluation can read the whole file instead).")
    base = text.name.split("/")[0]
    return LMSplits(**{
        split: LMText(f"{base}/{split}", tuple(text.documents[i] for i in idx),
                      f"{split} split, {len(idx):,} of {n:,} {what}, seeded 80/10/10")
        for split, idx in split_indices(n, seed).items()
    })


def read_documents(source: Any, text_column: str | None = None) -> LMText:
    """The documents of a `.txt` or `.jsonl` file, from a path or an uploaded file-like (`.name`,
    `.getvalue()`/`.read()`); see the module docstring for the formats (a `.parquet` / `.arrow` file or a
    save_to_disk folder: its text column, `core.data.hf`). Empty documents are skipped.
    `text_column` names a JSONL field (a `.txt` file has none). DataError for anything else."""

    if hf_files.is_hf_source(source):
        display, columns = hf_files.read_columns(source)
        column = text_field(display, columns, text_column)
        return _documents(display, columns[column])
    display, content = read_source(source)
    suffix = Path(display).suffix.lower()
    if suffix not in TEXT_SUFFIXES + JSON_SUFFIXES:
        raise DataError(f"{display}: language-modelling text is read from .txt (documents separated by blank "
                        f"lines) or .jsonl (a 'text' field); got '{quote(suffix or 'no extension')}'.")
    if not content.strip():
        raise DataError(f"{display} is empty.")
    if suffix in TEXT_SUFFIXES:
        if text_column:
            raise DataError(f"{display} is plain text and has no columns: drop the text column "
                            f"'{quote(text_column)}'.")
        docs = [block.strip() for block in _BLANK_LINES.split(content.replace("\r\n", "\n"))]
    else:
        docs = _json_documents(content, display, text_column)
    return _documents(display, docs)


def _documents(display: str, docs: list[str | None]) -> LMText:
    """The whole file's non-empty documents (DataError when there is none)."""
    docs = [d for d in docs if d]
    if not docs:
        raise DataError(f"{display} holds no non-empty document.")
    shown = "document" if len(docs) == 1 else "documents"
    return LMText(display, tuple(docs), f"the whole file, {len(docs):,} {shown}")


def _json_documents(content: str, display: str, text_column: str | None) -> list[str]:
    """The text field of every JSON object (`text_column`, else the first of `TEXT_NAMES`)."""
    cells = parse_json(content, display)
    columns = list(cells)
    column = (resolve_column(columns, text_column, "text", display) if text_column
              else named_column(columns, TEXT_NAMES, exclude=None))
    if column is None:
        raise DataError(f"{display} has no 'text' field (fields: {quote(', '.join(columns)) or 'none'}); "
                        "name the field that holds the documents.")
    return [cell or "" for cell in cells[column]]


def text_field(display: str, columns: hf_files.Columns, text_column: str | None) -> str:
    """The column holding documents: `text_column`, else the first of the usual text names."""
    column = (resolve_column(list(columns), text_column, "text", display) if text_column
              else named_column(list(columns), TEXT_NAMES, exclude=None))
    if column is None:
        raise DataError(f"{display} has no 'text' column (columns: {quote(', '.join(columns)) or 'none'}); "
                        "name the column that holds the documents.")
    return column
