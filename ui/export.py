"""The export panel shared by the Gates and Prune pages: a background job writing a folder + ONNX."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from core.folders import FolderError, check_target
from core.jobs import job_state
from core.paths import headlab_home
from pruning.export import WRITER, check_name
from ui.jobs import ensure_job, wait_for

HELP = ("Physically smaller safetensors folder that HeadLab loads back, plus model.onnx for onnxruntime, "
        "checked against torch")


def exports_dir() -> Path:
    return headlab_home() / "exports"


def export_folder(default: str, key: str) -> Path | None:
    """A name input; the folder under `exports_dir()` it names, or None (with an error shown) if invalid."""
    name = st.text_input("Name", value=default, key=key, help=f"A folder of this name is written under {exports_dir()}")
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
        try:
            check_target(out, written_by=WRITER)
        except FolderError as exc:
            st.error(str(exc))
            return
        if st.button(label, disabled=disabled, help=HELP):
            ensure_job(job, args)
            st.rerun()
    elif state.status != "done" or not out.exists():
        wait_for(job, "Exporting", lambda: getattr(job_state(job), "status", "") == "done" and out.exists())
    else:
        sizes = {f.name: f.stat().st_size for f in out.iterdir()}
        st.success(f"Saved {out}: model.safetensors {sizes.get('model.safetensors', 0) / 1e6:.1f} MB, "
                   f"model.onnx {sizes.get('model.onnx', 0) / 1e6:.1f} MB. Load it on the Model page as a local "
                   "folder, or run model.onnx with onnxruntime (inputs input_ids, attention_mask; output logits).")
