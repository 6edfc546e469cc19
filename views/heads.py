"""Heads page: per-head LRP relevance, Michel importance and Voita roles; one head up close; why a prediction."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from analysis.heads import report_dir
from analysis.lrp_pass import METHODS as RELEVANCE_METHODS
from ui.charts import (
    attention_heatmap,
    attention_lines,
    head_heatmap,
    highlighted_tokens,
    relevance_vs_importance,
    role_map,
    top_words_bar,
)
from ui.heads import cached_report, explain, sentence_attention
from ui.jobs import ensure_job, wait_for
from ui.loaders import session_model_and_dev
from ui.notes import note
from ui.presenter import chart
from ui.report import keep_table

METRICS = {
    "relevance": "LRP relevance (mean share of |relevance|, per example summing to 1)",
    "relevance_signed": "Signed LRP relevance (mean share)",
    "importance": "Michel importance (|dLoss/dgate|, per-layer normalised)",
    "confidence": "Confidence (mean max word-level attention)",
    "positional_frac": "Positional: share of words attending at the most frequent offset",
    "rare_hit_rate": "Rare-word: share of sentences whose most-attended word is the rarest",
    "induction_score": "Induction (Olsson): attention to the token after the earlier copy, repeated random tokens",
    "prev_token_score": "Previous-token: mean attention to the token before",
    "duplicate_score": "Duplicate-token: attention to the earlier copy of the same token, repeated random tokens",
}
RELEVANCE_HELP = {"conservative": "conservative LRP (attention held constant; Ali et al. 2022)",
                  "attnlrp": "AttnLRP (softmax and the attention products get relevance too; Achtibat et al. 2024)"}

st.title("Heads")
spec, data_spec, loaded, data = session_model_and_dev()

left, middle, right = st.columns(3)
limit = left.select_slider("Sentences analysed (seeded subset)", [100, 250, 500, 1000], value=500, key="heads_limit")
classes = ["predicted class", *loaded.label_names]
explained = middle.selectbox("Explained logit", classes, key="heads_target")
method = right.selectbox("Relevance rules", list(RELEVANCE_METHODS), format_func=RELEVANCE_HELP.get,
                         key="heads_method")
target = None if explained == classes[0] else classes.index(explained) - 1
st.caption(f"Model `{spec}` on {min(limit, len(data))} of {len(data)} sentences (seeded subset) of "
           f"{data_spec.caption(data)}")

folder = report_dir(loaded.fingerprint, data.fingerprint(), limit, target, method)
if not (folder / "heads.csv").exists():
    job = f"heads-{folder.name}"
    args = ["analysis", "heads", "--model", spec, *data_spec.cli_args(), "--limit", str(limit), "--out", str(folder),
            "--relevance-method", method, "--job", job] + (["--target", str(target)] if target is not None else [])
    ensure_job(job, args)
    wait_for(job, "Computing relevance and roles", lambda: (folder / "heads.csv").exists())
    st.stop()
report = cached_report(str(folder))
table = report.table

metric = st.selectbox("Heatmap", [m for m in METRICS if m in table], format_func=METRICS.get, key="heads_metric")
chart(head_heatmap(table, metric, METRICS[metric]), "heatmap")
note("head_heatmap")
keep_table("Per-head table", table)
roles_col, scatter_col = st.columns(2)
clicked = [chart(role_map(table), "role_map", roles_col, on_select="rerun", selection_mode="points"),
           chart(relevance_vs_importance(table), "scatter", scatter_col, on_select="rerun", selection_mode="points")]
note("role_map", roles_col)
note("relevance_vs_importance", scatter_col)
for event in clicked:
    points = event.selection.points if event and event.selection else []
    if points:
        point = points[0]
        layer, head = point.get("customdata") or (point["y"], point["x"])
        st.session_state.update(head_layer=int(layer), head_index=int(head))
st.caption("Grey heads have no role by Voita's criteria. Click a head in either chart to look at it below.")
st.download_button("Download per-head table (CSV)", table.to_csv(index=False), file_name=f"heads-{folder.name}.csv",
                   mime="text/csv")

st.header("One head")
if "head_layer" not in st.session_state:  # start on the most relevant head
    top = table.loc[table["relevance"].idxmax()]
    st.session_state.update(head_layer=int(top["layer"]), head_index=int(top["head"]))
c1, c2 = st.columns(2)
layer = c1.selectbox("Layer", sorted(table["layer"].unique()), key="head_layer")
head = c2.selectbox("Head", sorted(table["head"].unique()), key="head_index")
row = table[(table["layer"] == layer) & (table["head"] == head)].iloc[0]
info = report.examples[f"{layer}:{head}"]
st.markdown(f"**L{layer}H{head}** — roles: **{row['roles'] or 'none'}**; relevance {row['relevance']:.3f}, "
            f"importance {row['importance']:.3f}, confidence {row['confidence']:.2f}, most frequent offset "
            f"{int(row['positional_offset']):+d} ({row['positional_frac']:.0%} of words)")
typical = pd.DataFrame(info["typical"])
label = (f"Sentences where it is most typical of {info['role']}" if info["has_role"] else
         f"No role; sentences where it most consistently attends at offset {int(row['positional_offset']):+d}")
sentences = typical["text"].tolist() if len(typical) else data.texts[:5]
sentence = st.selectbox("Sentence to view", sentences, key="head_sentence")
tokens, attention = sentence_attention(loaded, sentence)
lines_tab, grid_tab = st.tabs(["Lines", "Matrix"])
chart(attention_lines(tokens, attention[layer, head], f"L{layer}H{head} attention"), "lines", lines_tab)
chart(attention_heatmap(tokens, attention[layer, head], f"L{layer}H{head} attention"), "matrix", grid_tab)
note("attention")
cols = st.columns(2)
cols[0].markdown(f"**{label}**")
cols[0].dataframe(typical[["text", "score", "n"]] if len(typical) else typical, hide_index=True)
if info["words"]:
    chart(top_words_bar(info["words"]), "top_words", cols[1])
    note("top_words", cols[1])

st.header("Why this prediction")
text = st.text_input("Sentence", value=data.texts[0], key="why_text")
if text.strip():
    why = explain(loaded, text, target, method)
    st.markdown(f"Predicted **{why.predicted}** ({why.confidence:.0%}); explaining the **{why.explained}** "
                f"logit {why.logit:+.2f}. Green supports it, red speaks against it.")
    tokens, relevance = why.tokens, why.relevance
    if loaded.is_decoder:  # the whole prompt was explained; show the sentence's pieces
        tokens, relevance = [t for t, inside in zip(tokens, why.in_text) if inside], relevance[why.in_text]
    st.html(highlighted_tokens(tokens, relevance, spaced=not loaded.is_decoder))
    note("why")
    keep_table("Why this prediction: relevance per token", pd.DataFrame({"token": tokens, "relevance": relevance}))
    if loaded.is_decoder:
        st.caption(f"The prompt's template and special tokens hold {why.relevance[~why.in_text].sum():+.2f} of the "
                   f"logit's relevance (not shown); the sentence's pieces {why.relevance[why.in_text].sum():+.2f}.")
    if why.truncated:
        st.warning(f"The sentence was cut to the model's maximum of {loaded.max_length} tokens.")
