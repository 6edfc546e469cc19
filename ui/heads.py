"""Cached pieces of the Heads page: the on-disk report, one sentence's attention view, one explanation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import streamlit as st

from analysis.attention import capture_attention
from analysis.explain import Explanation, explain_prediction
from analysis.heads import HeadsReport
from core.models import LoadedModel


@st.cache_data(max_entries=8, show_spinner=False)
def cached_report(folder: str) -> HeadsReport:
    return HeadsReport.load(Path(folder))


@st.cache_data(max_entries=64, show_spinner=False, hash_funcs={LoadedModel: lambda m: m.fingerprint})
def sentence_attention(loaded: LoadedModel, sentence: str) -> tuple[list[str], np.ndarray]:
    """Tokens of `sentence` and its attention (layers, heads, T, T) from the eager model."""
    record = capture_attention(loaded, [sentence])[0]
    return record.tokens, record.attention


@st.cache_data(max_entries=64, show_spinner=False, hash_funcs={LoadedModel: lambda m: m.fingerprint})
def explain(loaded: LoadedModel, text: str, target: int | None, method: str = "conservative") -> Explanation:
    return explain_prediction(loaded, text, target, method=method)
