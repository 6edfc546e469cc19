"""The Model page's data choices as `DataSpec`s: labeled data (the source, its columns, the whole-file
option and the label table: the data's labels -> the model's) and a decoder's text for perplexity."""

from __future__ import annotations

import dataclasses

import pandas as pd
import streamlit as st

from core.data import DEFAULT, LM, WIKI, DataError, DataSpec
from ui.loaders import get_labels, save_upload
from ui.presenter import advanced

DATA_SOURCES = {"Default task: Rotten Tomatoes (dev split)": DEFAULT}
TEXT_SOURCES = {"Lee news articles (dev split)": LM, "Wikipedia articles (dev split, out of domain)": WIKI}
TABLE = "label_table"  # the label table's widget key (reset when the data's labels change)


def choose_data(model_labels: list[str] | None) -> DataSpec:
    """`data_choice`, or the page stops (no file yet, or a choice that does not fit: the reason is shown)."""
    spec = data_choice(model_labels)
    if spec is None:
        st.stop()
    return spec


def data_choice(model_labels: list[str] | None) -> DataSpec | None:
    """Widgets for labeled data; returns its spec, or None (no file yet, or a choice that does not fit: the
    reason is shown). With `model_labels` (a classifier's), the label table is shown too."""
    path = _source("Data", DATA_SOURCES, ("Upload CSV / TSV / JSONL", "Labeled data"), ("File path", "Data file"),
                   "data", ["csv", "tsv", "jsonl", "json", "txt"])
    if not path:
        return None
    text_col = label_col = None
    whole = False
    if path != DEFAULT:
        with advanced("Columns (auto-detected when empty)", "data_columns"):
            text_col = st.text_input("Text column", key="text_column").strip() or None
            label_col = st.text_input("Label column", key="label_column").strip() or None
        whole = st.checkbox("Evaluate the whole file", key="whole_file",
                            help="Every row instead of the seeded dev split (10% of the rows, the same on every "
                                 "page). The Heads and Gates pages follow; training always splits 80/10/10.")
    try:
        spec = DataSpec(path, text_col, label_col, whole_file=whole)
        return dataclasses.replace(spec, label_map=_label_table(spec, model_labels)) if model_labels else spec
    except DataError as exc:
        st.error(str(exc))
        return None


def text_choice() -> DataSpec | None:
    """Widgets for a decoder's text (task "lm"): the built-in Lee or Wikipedia dev split, or a .txt file
    (documents separated by blank lines) / .jsonl file (a text field). Its spec, or None (no file yet, or a
    bad choice: the reason is shown)."""
    path = _source("Text", TEXT_SOURCES, ("Upload .txt / .jsonl", "Text: documents separated by blank lines, or "
                   "JSON lines with a text field"), ("Text file path", "Text file"), "text", ["txt", "jsonl", "json"])
    if not path:
        return None
    whole = path not in TEXT_SOURCES.values() and st.checkbox(
        "Score the whole file", key="text_whole_file",
        help="Every document instead of the seeded dev split (10% of the documents).")
    try:
        return DataSpec(path, whole_file=whole, task=LM)
    except DataError as exc:
        st.error(str(exc))
        return None


def _source(label: str, builtins: dict[str, str], upload: tuple[str, str], typed: tuple[str, str], key: str,
            types: list[str]) -> str:
    """The chosen source: one of `builtins` (shown -> name), an upload or a typed path, each option shown as
    `upload[0]` / `typed[0]` with its widget labelled `upload[1]` / `typed[1]` (widget keys "<key>_choice",
    "<key>_path"). A built-in name, a saved upload's path or a typed path ("" while there is none)."""
    choice = st.radio(label, [*builtins, upload[0], typed[0]], key=f"{key}_choice", horizontal=True)
    if choice in builtins:
        return builtins[choice]
    if choice == upload[0]:
        file = st.file_uploader(upload[1], type=types, key=f"{key}_upload")
        return str(save_upload(file)) if file else ""
    return st.text_input(typed[1], key=f"{key}_path").strip()


def _label_table(spec: DataSpec, model_labels: list[str]) -> dict[str, str]:
    """When some label of the data matches no model label (by name or id): an editable table of the data's
    labels and the model label each means. Returns the label map: the rows set to other than their preset."""
    labels = get_labels(spec)
    if labels is None:
        st.stop()
    presets = [_preset(label, model_labels) for label in labels]
    if None not in presets:
        return {}
    if st.session_state.get(f"{TABLE}_for") != (spec.path, labels):  # other labels: start from the presets
        st.session_state.pop(TABLE, None)
        st.session_state[f"{TABLE}_for"] = (spec.path, labels)
    st.markdown("**Labels**: the data has labels the model does not; choose the model label each one means.")
    table = pd.DataFrame({"data label": labels, "model label": presets})
    edited = st.data_editor(table, key=TABLE, hide_index=True, disabled=["data label"], column_config={
        "model label": st.column_config.SelectboxColumn(options=model_labels, help="the model label this data "
                                                        "label means")})
    return {label: chosen for label, chosen, preset in zip(labels, edited["model label"], presets)
            if isinstance(chosen, str) and chosen and chosen != preset}


def _preset(label: str, model_labels: list[str]) -> str | None:
    """The model label a data label matches by itself: the same name (any case) or an integer id."""
    by_name = {name.lower(): name for name in model_labels}
    if label.lower() in by_name:
        return by_name[label.lower()]
    if label.lstrip("+-").isdigit() and 0 <= int(label) < len(model_labels):
        return model_labels[int(label)]
    return None
