"""Presenter mode (a sidebar toggle): larger fonts and charts for a projector, advanced controls hidden.

Every chart of the pages goes through `chart`, which enlarges a copy of the figure in presenter mode
(`presented`) and keeps the figure for the page's HTML report (`ui.report.keep`)."""

from __future__ import annotations

from contextlib import AbstractContextManager

import plotly.graph_objects as go
import streamlit as st

from ui import report

KEY = "presenter"
FONT, TITLE, TEXT = 20, 26, 16  # px on a projector (plotly's defaults: 12, 17, 12)
GROW = 1.35  # chart heights (not the head grids' cell markers: the grid's width does not grow)
ADVANCED = "hl-advanced"  # key prefix of the containers presenter mode hides
CSS = f"""<style>
html {{ font-size: 21px; }}
[data-testid="stSidebar"] {{ font-size: 0.9rem; }}
h1 {{ font-size: 2.6rem !important; }}
[class*="st-key-{ADVANCED}"] {{ display: none !important; }}
</style>"""


def is_on() -> bool:
    return bool(st.session_state.get(KEY, False))


def toggle() -> None:
    """The sidebar toggle; in presenter mode also the page's CSS (root font size, hidden advanced controls)."""
    st.sidebar.toggle("Presenter mode", key=KEY, help="Larger fonts and charts for a projector; advanced controls "
                                                      "are hidden.")
    if is_on():
        st.sidebar.markdown(CSS, unsafe_allow_html=True)  # applies to the whole page


def presented(fig: go.Figure) -> go.Figure:
    """`fig` as shown: in presenter mode a copy with larger fonts, text and height."""
    if not is_on():
        return fig
    out = go.Figure(fig)  # a copy: figures may come from caches
    out.update_layout(font_size=FONT, title_font_size=TITLE, legend_font_size=FONT)
    if out.layout.height:
        out.update_layout(height=int(out.layout.height * GROW))
    out.update_annotations(font_size=TEXT)
    for trace in out.data:
        if "textfont" in trace:
            trace.textfont.size = TEXT
    return out


def chart(fig: go.Figure, key: str, where=None, **kwargs):
    """`where.plotly_chart` (default: the page) of `fig` as presented, kept for the report under `key`;
    returns what plotly_chart returns (the selection event with `on_select`)."""
    report.keep(key, fig)
    return (where or st).plotly_chart(presented(fig), key=key, **kwargs)


def advanced(label: str, key: str, **kwargs) -> AbstractContextManager:
    """An expander of advanced controls; in presenter mode a hidden container instead (its widgets still run)."""
    if is_on():
        return st.container(key=f"{ADVANCED}-{key}")
    return st.expander(label, **kwargs)
