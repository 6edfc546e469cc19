"""What the Model page shows of any model: its architecture, and under each cached measurement the
busy-machine warning and the re-measure button."""

from __future__ import annotations

import os
from pathlib import Path

import streamlit as st

from core.jobs import cancel_job
from core.loaded import LoadedModel

MODEL_CHOICES = {  # the Model page's choices: shown label -> built-in spec (None: a local folder or .gguf file)
    "Embedded default: MiniLM-L6 fine-tuned on Rotten Tomatoes": "default",
    "MiniLM-L3 (small dense baseline)": "minilm-l3",
    "SmolLM2-135M-Instruct (decoder: perplexity, zero-shot by prompting, generation)": "smollm2",
    "Gemma-3-270M (optional decoder: a 240 MB download, converted once)": "gemma3",
    "Local Hugging Face folder": None,
}


def show_architecture(loaded: LoadedModel) -> None:
    """One row of metrics: type, layers, heads (a decoder's query and KV heads), hidden, FFN, parameters."""
    arch = loaded.architecture()
    heads = [("Query heads", arch.heads), ("KV heads", arch.kv_heads)] if loaded.is_decoder else [("Heads", arch.heads)]
    figures = [("Type", arch.model_type), ("Layers", arch.layers), *heads, ("Hidden", arch.hidden),
               ("FFN", arch.ffn), ("Parameters", f"{arch.parameters / 1e6:.1f} M")]
    for col, (label, value) in zip(st.columns(len(figures)), figures):
        col.metric(label, value)


def timing_notes(load_average: float, out: Path, job: str, key: str) -> None:
    """A warning when the machine was busier than its cores while timing, and a button that measures again
    (forgets job `job` and deletes its result `out`, so the page starts it afresh)."""
    if load_average > (os.cpu_count() or 1):
        st.warning(f"The machine was busy while timing (load {load_average:.1f} on {os.cpu_count()} cores): "
                   "latencies are inflated. Re-measure when it is idle.")
    if st.button("Re-measure", key=key, help="Evaluate and time again (e.g. after the machine was busy)"):
        cancel_job(job)
        out.unlink(missing_ok=True)
        st.rerun()
