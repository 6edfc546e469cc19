"""The export panels of the Gates and Prune pages, writing a folder + ONNX: `save_panel` saves a pruned
model the page already holds, in a thread of this server process (no other process, no re-pruning);
`export_panel` runs a background job (a finished run's model, read from its run folder)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import streamlit as st

from core.folders import FolderError, check_target
from core.jobs import job_state
from core.loaded import LoadedModel
from core.paths import headlab_home
from pruning.export import WRITER, check_name
from pruning.standard_export import STANDARD, export, export_kind
from ui.jobs import ensure_job, wait_for

_SAVER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="headlab-export")  # one export at a time

HELP = ("Physically smaller safetensors folder, plus model.onnx for onnxruntime, checked against torch; a plain "
        "transformers folder (from_pretrained loads it) when every layer keeps the same heads and FFN width, "
        "else HeadLab's own layout")


def exports_dir() -> Path:
    return headlab_home() / "exports"


def export_folder(default: str, key: str) -> Path | None:
    """A name input; the folder under `exports_dir()` it names, or None (with an error shown) if invalid.
    Until the user types a name of their own, the input follows `default` (e.g. a new gate state's)."""
    if st.session_state.get(key) in (None, st.session_state.get(f"{key}_default")):
        st.session_state[key] = default
    st.session_state[f"{key}_default"] = default
    name = st.text_input("Name", key=key, help=f"A folder of this name is written under {exports_dir()}")
    try:
        return exports_dir() / check_name(name)
    except ValueError as exc:
        st.error(str(exc))
        return None


def export_panel(out: Path, job: str, args: list[str], label: str, *, disabled: bool = False) -> None:
    """A button starting `python -m <args>` as job `job` (which writes the folder `out`), its progress, then
    the sizes written. Refuses, with one error line, an `out` that this job did not write and that is not
    free (`core.folders.check_target`: nothing is overwritten)."""
    state = job_state(job)
    if state is None:
        if not _writable(out):
            return
        if st.button(label, disabled=disabled, help=HELP):
            ensure_job(job, args)
            st.rerun()
    elif state.status != "done" or not out.exists():
        wait_for(job, "Exporting", lambda: getattr(job_state(job), "status", "") == "done" and out.exists())
    else:
        _saved(out)


def save_panel(out: Path, key: str, model: Callable[[], LoadedModel], label: str, *, disabled: bool = False) -> None:
    """A button saving the pruned `model()` (called on the click, in the page: the copy the page has
    measured) to the folder `out` with model.onnx, in a thread of this process so the page stays
    responsive; then its progress, the sizes written or the error. `key` names what is saved (e.g. the
    gate state's digest): `out` is shown as saved only for the same key; otherwise, like any folder
    that is not free, it is refused with one error line (`core.folders.check_target`)."""
    tasks: dict[str, tuple[str, Future]] = st.session_state.setdefault("save_tasks", {})
    task = tasks.get(str(out))
    future = task[1] if task is not None and task[0] == key else None
    if future is not None and future.done() and future.exception() is None and not out.exists():
        future = None  # saved, then removed by hand: offer the button again
    if future is not None:
        if not future.done():
            _wait(future)
        elif future.exception() is not None:
            st.error(f"Export failed: {' '.join(str(future.exception()).split())}")
            if st.button("Retry", key=f"retry-save-{out.name}"):
                tasks.pop(str(out))
                st.rerun()
        else:
            _saved(out)
        return
    if not _writable(out):
        return
    if st.button(label, disabled=disabled, help=HELP):
        tasks[str(out)] = (key, _SAVER.submit(export, model(), out, onnx=True))  # plain when the shape is standard
        st.rerun()


def _wait(future: Future) -> None:
    @st.fragment(run_every=0.5)
    def poll() -> None:
        if future.done():
            st.rerun()
        st.info("Exporting: saving the pruned copy, then model.onnx (checked against torch)...")

    poll()


def _saved(out: Path) -> None:
    kind = export_kind(out)
    if kind is not None:  # which kind of folder was written, and why (pruning.standard_export)
        st.caption(f"**{'Plain transformers' if kind[0] == STANDARD else 'HeadLab'} folder**: {kind[1]}.")
    sizes = {f.name: f.stat().st_size for f in out.iterdir()}
    st.success(f"Saved {out}: model.safetensors {sizes.get('model.safetensors', 0) / 1e6:.1f} MB, "
               f"model.onnx {sizes.get('model.onnx', 0) / 1e6:.1f} MB. Load it on the Model page as a local "
               "folder, or run model.onnx with onnxruntime (inputs input_ids, attention_mask; output logits).")


def _writable(out: Path) -> bool:
    """True if an export may be written to `out`; otherwise shows the one error line and returns False."""
    try:
        check_target(out, written_by=WRITER)
    except FolderError as exc:
        st.error(str(exc))
        return False
    return True
