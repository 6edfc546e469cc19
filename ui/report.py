"""A page's current view as one self-contained HTML file (opens offline): its figures, drawn by the
plotly.js embedded once in the file, and the tables of numbers behind them.

The app starts a fresh collection on every full run (`begin`); charts (`ui.presenter.chart`) and pages
(`keep_table`) add to it while the page draws; the sidebar's download button (`download_button`) builds the
file from what the page drew when it is clicked."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

KEY = "report_view"


@dataclass
class View:
    """What a page drew in its last run: figures and tables by name, in drawing order."""

    figures: dict[str, go.Figure] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)


def begin() -> View:
    """A fresh, empty view for this run (the app calls it before the page runs)."""
    st.session_state[KEY] = View()
    return st.session_state[KEY]


def current() -> View:
    return st.session_state.setdefault(KEY, View())


def keep(name: str, fig: go.Figure) -> None:
    current().figures[name] = fig


def keep_table(name: str, frame: pd.DataFrame) -> None:
    current().tables[name] = frame


def report_html(title: str, view: View, context: str = "") -> str:
    """One HTML document: a heading, `context` (plain text, e.g. the view's link), each figure (plotly.js
    inlined once, before the first) and each table. Opens offline; nothing is fetched."""
    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<p>{html.escape(context)}</p>" if context else "",
             f"<p><small>HeadLab report, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC</small></p>"]
    for i, (name, fig) in enumerate(view.figures.items()):
        parts.append(f'<h2>{html.escape(name)}</h2><div class="figure">'
                     f'{fig.to_html(include_plotlyjs=i == 0, full_html=False, div_id=f"fig-{i}")}</div>')
    for name, frame in view.tables.items():
        parts.append(f"<h2>{html.escape(name)}</h2>{frame.to_html(index=False, border=0, na_rep='')}")
    if not view.figures and not view.tables:
        parts.append("<p>This view had no figures or tables yet.</p>")
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;font-size:0.9em}td,th{padding:2px 8px;border-bottom:1px solid #ddd}")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")


def download_button(title: str, context: str, file_name: str) -> None:
    """The sidebar's "Download this view" button: the report of what the page draws in this run."""
    view = current()
    st.sidebar.download_button("Download this view (HTML report)", data=lambda: report_html(title, view, context),
                               file_name=file_name, mime="text/html", on_click="ignore",
                               help="The page's figures and the numbers behind them in one HTML file that "
                                    "opens offline.")
