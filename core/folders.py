"""Folders HeadLab writes: built whole under a temporary name, renamed into place, and replaced or
removed only when HeadLab wrote them.

Every writer of a folder (pruned exports, heads reports, run folders) goes through `atomic_folder`,
every writer of a single file (CSV and JSON outputs, training checkpoints) through `atomic_file`:

    with atomic_folder(out, written_by="analysis.heads", overwrite=True) as tmp:
        (tmp / "heads.csv").write_text(...)

The files go into a fresh hidden sibling of `out` (`.<name>.partial-<pid>-<random>`); on success a
marker file (`headlab.json`, naming the writer) is added and the sibling is renamed to `out`. An
exception inside the block removes the sibling and leaves `out` as it was. An existing `out` is
replaced only with `overwrite` and only if its marker names the same writer; an empty folder
holds nothing to lose and counts as free. Anything else (a user's folder, a file, a symlink)
is refused with a `FolderError`: a ValueError whose message is one line naming the folder, so CLIs
print `error: ...` and exit 2 and pages show one error box.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

MARKER = "headlab.json"  # {"written_by": ..., "created": Unix seconds, ...details}


class FolderError(ValueError):
    """A folder HeadLab will not write, replace or remove; the message is one line naming it."""


class FolderExists(FolderError):
    """The folder exists, is not empty, and replacing it was not asked for."""


def read_marker(path: str | Path) -> dict | None:
    """The marker record of folder `path`, or None if it has no valid marker (not written by HeadLab)."""
    try:
        record = json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("written_by"), str) else None


def owned_by_headlab(path: str | Path, **expected) -> bool:
    """True if `path` is a real folder (not a symlink) with a HeadLab marker whose fields equal `expected`
    (e.g. `run_id=3`)."""
    path = Path(path)
    record = read_marker(path) if path.is_dir() and not path.is_symlink() else None
    return record is not None and all(record.get(k) == v for k, v in expected.items())


def check_target(out: str | Path, *, written_by: str, overwrite: bool = False) -> Path:
    """`out` (user home expanded) if `written_by` may write a folder there, else `FolderError`.

    Free: a missing path or an empty folder. With `overwrite`, also a folder the same writer wrote
    (its marker names `written_by`). Refused, nothing touched: a file or a symlink, a non-empty folder
    without `overwrite` (`FolderExists`), a folder without a HeadLab marker or written by another part
    of HeadLab (an export never replaces a run folder).
    """
    out = Path(out).expanduser()
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise FolderError(f"{out} is not a folder (a file or a link is there); choose a folder path "
                          "(nothing was written).")
    if not out.exists() or not any(out.iterdir()):
        return out
    if not overwrite:
        raise FolderExists(f"{out} already exists and is not empty; choose another folder (nothing was written).")
    record = read_marker(out)
    if record is None:
        raise FolderError(f"{out} was not written by HeadLab (it has no {MARKER}); HeadLab replaces only "
                          "folders it wrote: choose another folder (nothing was written).")
    if record["written_by"] != written_by:
        raise FolderError(f"{out} was written by HeadLab's {record['written_by']}, not {written_by}; "
                          "choose another folder (nothing was written).")
    return out


def write_marker(folder: Path, written_by: str, **details) -> None:
    """Write the marker naming `written_by` (e.g. "pruning.export.save_pruned") and JSON-able `details`."""
    (folder / MARKER).write_text(json.dumps({"written_by": written_by, "created": time.time(), **details}))


def _sibling(out: Path, kind: str) -> Path:
    """A fresh hidden name next to `out`: `.<name>.<kind>-<pid>-<random>`."""
    return out.with_name(f".{out.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def _writing_in(parent: Path) -> Iterator[None]:
    """Turn an OSError while creating something in `parent` (missing rights, a file on the way) into
    one FolderError line."""
    try:
        yield
    except OSError as exc:
        raise FolderError(f"Cannot write in {parent} ({exc.strerror or type(exc).__name__}); "
                          "choose another place.") from exc


def _move_into_place(new: Path, out: Path) -> None:
    """Rename folder `new` to `out`. An existing `out` is renamed aside first and removed afterwards; if
    the second rename fails, it is put back."""
    old = _sibling(out, "old")
    if out.exists():
        out.rename(old)
    try:
        new.rename(out)
    except BaseException:
        if old.exists():
            old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(out: str | Path, *, written_by: str, overwrite: bool = False, **details) -> Iterator[Path]:
    """Yield a fresh empty temporary folder next to `out`; on a clean exit mark it as written by
    `written_by` (with `details` in the marker) and rename it to `out`.

    `out` is checked (`check_target`) before anything is written and again just before the rename.
    On any exception the temporary folder is removed and `out` is left as it was.
    """
    out = check_target(out, written_by=written_by, overwrite=overwrite)
    tmp = _sibling(out, "partial")
    with _writing_in(out.parent):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    try:
        yield tmp
        write_marker(tmp, written_by, **details)
        check_target(out, written_by=written_by, overwrite=overwrite)  # something may have appeared meanwhile
        _move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def new_folder(out: str | Path, *, written_by: str, **details) -> Path:
    """Create the empty marked folder `out` (atomically, like `atomic_folder`); FolderError if taken."""
    with atomic_folder(out, written_by=written_by, **details):
        pass
    return Path(out).expanduser()


def remove_owned(path: str | Path, **expected) -> bool:
    """Delete folder `path` if HeadLab wrote it (`owned_by_headlab(path, **expected)`); True if deleted."""
    if not owned_by_headlab(path, **expected):
        return False
    shutil.rmtree(path, ignore_errors=True)
    return True


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a fresh hidden sibling of the file `path` to write; on a clean exit it is fsynced and
    renamed over `path`, so a reader sees the old file or the new one, never a part.

    An exception inside the block leaves the old file as it was and no sibling behind. FolderError if
    `path` is a folder or its folder cannot be written.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise FolderError(f"{path} is a folder; choose a file path (nothing was written).")
    tmp = _sibling(path, "partial")
    with _writing_in(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # the bytes reach the disk before the rename makes them the file
            os.fsync(f.fileno())
        with _writing_in(path.parent):
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomically(path: str | Path, text: str) -> Path:
    """Write `text` to the file `path` whole (`atomic_file`). FolderError if `path` is a folder."""
    with atomic_file(path) as tmp, _writing_in(Path(path).expanduser().parent):
        tmp.write_text(text)
    return Path(path).expanduser()
