"""Model page: choose a model and a dataset; see architecture, dev accuracy, latency and predictions. A
decoder shows perplexity and decoding speed on text, zero-shot accuracy with its prompt, and a reply."""

from __future__ import annotations

import json

import pandas as pd
import streamlit as st

from core.models import ModelNotPrepared
from core.summary import summary_path
from ui.data import choose_data
from ui.decoder import generation, language_modelling, zero_shot
from ui.finetune import offer_finetune
from ui.jobs import ensure_job, wait_for
from ui.loaders import get_data, get_model
from ui.model_view import MODEL_CHOICES, show_architecture, timing_notes
from ui.notes import note as chart_note  # "note" names the loop below
from ui.prepare import prepare_in_background
from ui.report import keep_table

st.title("Model")
choice = st.radio("Model", list(MODEL_CHOICES), key="model_choice")
spec = MODEL_CHOICES[choice] or st.text_input("Model folder or .gguf file", key="model_path",
                                             placeholder="/path/to/a/save_pretrained/folder or model.gguf").strip()
if not spec:
    st.info("Enter the path of a local Hugging Face model folder (BERT, RoBERTa, MiniLM, ELECTRA, MPNet, or a "
            "Llama / Qwen2 / Gemma3 decoder) or of a .gguf file (converted once).")
    st.stop()

try:
    loaded = get_model(spec)
except ModelNotPrepared:
    prepare_in_background(spec)
    st.stop()
if loaded is None:
    st.stop()
st.session_state["model_spec"] = spec
for note in loaded.notes:
    st.warning(note)
show_architecture(loaded)
chart_note("architecture")

if loaded.is_decoder:
    language_modelling(spec, loaded)
    zero_shot(spec, loaded)
    generation(loaded)
    st.stop()

label_names = loaded.label_names if loaded.has_classifier else None
data_spec = choose_data(label_names)
data = get_data(data_spec, "dev", label_names)
if data is None:
    st.stop()
st.session_state["data_spec"] = data_spec
st.caption(f"{data.name}: {len(data)} examples; labels " +
           ", ".join(f"{i} = {n} ({data.label_counts()[n]})" for i, n in enumerate(data.label_names)))
st.caption(data_spec.caption(data))
for warning in data.warnings:
    st.warning(warning)

if not loaded.has_classifier:
    offer_finetune(spec, data_spec, data)
    st.stop()

out = summary_path(loaded.fingerprint, data.fingerprint())
job = f"summary-{loaded.fingerprint}-{data.fingerprint()}"
if not out.exists():
    ensure_job(job, ["core", "evaluate", "--model", spec, *data_spec.cli_args(), "--json", "--out", str(out),
                     "--job", job])
    wait_for(job, "Evaluating", out.exists)
    st.stop()

record = json.loads(out.read_text())
fig = record["figures"]
cols = st.columns(4)
cols[0].metric("Dev accuracy", f"{fig['accuracy']:.1%}", help=f"on {fig['examples']} examples")
cols[1].metric("Macro-F1", f"{fig['macro_f1']:.3f}")
cols[2].metric("Latency, batch 1", f"{fig['latency_b1_ms']:.1f} ms", help=f"p90 {fig['latency_b1_p90_ms']} ms")
cols[3].metric("Latency, batch 32", f"{fig['latency_b32_ms']:.0f} ms", help=f"p90 {fig['latency_b32_p90_ms']} ms")
st.caption(
    f"Median of repeats after warm-up on {fig['threads']} CPU threads, measured in a separate process. "
    f"Encoder: {fig['encoder_gflops_per_example']:.3f} GFLOPs per example at {fig['median_tokens']} tokens "
    f"({fig['flops_attention_share']:.0%} attention, {1 - fig['flops_attention_share']:.0%} FFN)."
)
timing_notes(fig["load_average"], out, job, key="remeasure")
chart_note("evaluation")
keep_table("Dev evaluation", pd.DataFrame([fig]))
st.subheader("Sample predictions")
st.dataframe(pd.DataFrame(record["predictions"]), hide_index=True, width="stretch")
chart_note("predictions")
keep_table("Sample predictions", pd.DataFrame(record["predictions"]))
