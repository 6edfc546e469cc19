"""The "this model has no classification head: fine-tune it on this data" offer of the Model page."""

from __future__ import annotations

import hashlib

import streamlit as st

from core.data import DataSpec, TextDataset
from core.jobs import job_state
from core.paths import models_dir
from ui.jobs import ensure_job, wait_for


def offer_finetune(spec: str, data_spec: DataSpec, data: TextDataset) -> None:
    """Explain that accuracy is meaningless, then fine-tune in a background job and offer the result."""
    st.warning("This model has no trained classification head, so its accuracy is chance level. "
               f"Fine-tune it on {data.name} ({len(data.label_names)} labels, 80/10/10 split) to use it.")
    name = f"finetune-{hashlib.sha1(spec.encode()).hexdigest()[:8]}-{data.fingerprint()[:8]}"
    out = models_dir() / name
    state = job_state(name)
    if (out / "config.json").exists():
        st.success(f"Fine-tuned model saved in {out}.")
        st.button("Use the fine-tuned model", on_click=st.session_state.update, kwargs={"model_path": str(out)})
    elif state is not None or st.button("Fine-tune on this data"):
        ensure_job(name, ["core", "finetune", "--model", spec, *data_spec.cli_args(), "--out", str(out), "--job", name])
        wait_for(name, "Fine-tuning", lambda: (out / "config.json").exists())
