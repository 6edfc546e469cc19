"""The Model page's one-time preparation of a model in a background job: fine-tuning a built-in encoder,
converting the built-in decoder or a user's .gguf file (`python -m core prepare ...`)."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from core.gguf_cache import is_gguf_spec
from core.jobs import job_state
from core.models import BUILTIN_MODELS
from core.prepare import prepare_job
from ui.jobs import ensure_job, wait_for


def prepare_in_background(spec: str) -> None:
    """Say what preparing `spec` means, start it as a background job and show its progress; the page
    reruns when it is done (the caller stops the page meanwhile)."""
    if is_gguf_spec(spec):
        what, label = (f"{Path(spec).name} is converted once into a plain fp32 folder under HEADLAB_HOME (1-2 min "
                       "for a 100 MB file on 2 cores)", "Converting")
    elif spec in ("smollm2", "gemma3"):
        what, label = f"{BUILTIN_MODELS[spec]}; this takes 1-3 min", "Converting"
    else:
        what, label = f"{BUILTIN_MODELS[spec]} is fine-tuned once on this machine (a few minutes)", "Fine-tuning"
    st.info(f"{what}; it runs in the background.")
    job = prepare_job(spec)
    ensure_job(job, ["core", "prepare", spec])
    wait_for(job, label, lambda: getattr(job_state(job), "status", "") == "done")
