"""Plotly figures and small HTML renderings shared by pages (no model math here)."""

from __future__ import annotations

import html

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

ROLE_COLOURS = {"positional": "#1f77b4", "syntactic": "#2ca02c", "rare-word": "#d62728", "induction": "#9467bd",
                "previous-token": "#17becf", "duplicate-token": "#ff7f0e", "": "#c7c7c7"}
BADGES = {"rare-word": "R", "induction": "I", "previous-token": "PT", "duplicate-token": "D"}  # roles without detail


def grid(table: pd.DataFrame, column: str) -> np.ndarray:
    """(layers, heads) array of `column` from a one-row-per-head table."""
    return table.pivot(index="layer", columns="head", values=column).sort_index().to_numpy(dtype=float)


def head_heatmap(table: pd.DataFrame, column: str, title: str) -> go.Figure:
    """Layer x head heatmap of one per-head score; layers top to bottom, 0-based labels."""
    fig = px.imshow(grid(table, column), color_continuous_scale="Viridis", aspect="auto",
                    labels={"x": "head", "y": "layer", "color": column}, title=title, text_auto=".2f")
    fig.update_xaxes(dtick=1)
    fig.update_yaxes(dtick=1)
    fig.update_layout(height=120 + 48 * table["layer"].nunique(), margin=dict(l=10, r=10, t=40, b=10))
    return fig


def role_kind(roles: str) -> str:
    """The first role's kind ('positional', 'syntactic', 'rare-word'; decoders also 'induction',
    'previous-token', 'duplicate-token') or '' for a head without a role."""
    return roles.split("(")[0].split("+")[0] if roles else ""


def badge(roles: str) -> str:
    """Short label for a head's roles: P-1, S:dobj, R, I, PT, D (joined with spaces)."""
    out = []
    for role in filter(None, roles.split("+")):
        if role.startswith("positional"):
            out.append("P" + role[len("positional("):-1])
        elif role.startswith("syntactic"):
            out.append("S:" + role[len("syntactic("):-1].split(":")[0])
        else:
            out.append(BADGES.get(role, role))
    return " ".join(out)


def role_map(table: pd.DataFrame) -> go.Figure:
    """Layer x head grid coloured by role kind, with a badge per head (cells are clickable)."""
    t = table.assign(kind=table["roles"].map(role_kind), text=table["roles"].map(badge))
    title = "Roles: P±k positional, S:rel syntactic, R rare-word"
    if "induction_score" in table:  # a decoder's table has Olsson's roles too
        title += ", I induction, PT previous-token, D duplicate-token"
    fig = _cell_grid(t["layer"].nunique(), t["head"].nunique(), title)
    fig.add_trace(_cells(t, color=t["kind"].map(ROLE_COLOURS)))
    return fig


def relevance_vs_importance(table: pd.DataFrame) -> go.Figure:
    """Scatter of LRP relevance against Michel importance, one point per head, coloured by role."""
    t = table.assign(role=table["roles"].map(role_kind).replace("", "none"),
                     name=[f"L{int(r.layer)}H{int(r.head)}" for r in table.itertuples()])
    fig = px.scatter(t, x="relevance", y="importance", color="role", hover_name="name",
                     custom_data=["layer", "head"], title="Relevance (LRP) vs importance (Michel)",
                     color_discrete_map={**ROLE_COLOURS, "none": ROLE_COLOURS[""]})
    fig.update_layout(height=380, margin=dict(l=10, r=10, t=40, b=10))
    return fig


def top_words_bar(words: list[dict]) -> go.Figure:
    frame = pd.DataFrame(words)
    fig = px.bar(frame, x="total", y="word", orientation="h", title="Words this head attends to most",
                 hover_data=["count", "mean"])
    fig.update_layout(height=360, yaxis=dict(autorange="reversed"), margin=dict(l=10, r=10, t=40, b=10))
    return fig


def highlighted_tokens(tokens: list[str], relevance: np.ndarray, spaced: bool = True) -> str:
    """HTML of tokens shaded by relevance: green supports the explained class, red speaks against it.

    `spaced`: a space goes before each token except a "##" continuation (WordPiece); False for pieces
    that carry their own leading space (a decoder's readable BPE pieces)."""
    scale = float(np.abs(relevance).max()) or 1.0
    spans = []
    for token, r in zip(tokens, relevance):
        alpha = min(abs(r) / scale, 1.0)
        colour = f"rgba(44,160,44,{alpha:.2f})" if r >= 0 else f"rgba(214,39,40,{alpha:.2f})"
        text = html.escape(token[2:] if token.startswith("##") else token)
        gap = " " if spaced and not token.startswith("##") else ""
        spans.append(f'{gap}<span title="{r:+.3f}" style="background:{colour};padding:2px 1px;'
                     f'border-radius:3px">{text}</span>')
    return f'<div style="font-size:1.1rem;line-height:2.1">{"".join(spans)}</div>'


def attention_lines(tokens: list[str], att: np.ndarray, title: str, min_weight: float = 0.02) -> go.Figure:
    """bertviz-style view drawn offline: tokens in two columns, a line from each token (left) to the
    tokens it attends to (right), opacity by weight. `att` is (T, T), rows = attending token."""
    t = len(tokens)
    fig = go.Figure()
    bins = [(0.02, 0.1), (0.1, 0.25), (0.25, 0.5), (0.5, 1.01)]
    for lo, hi in bins:
        xs, ys = [], []
        for i, j in zip(*np.nonzero((att >= max(lo, min_weight)) & (att < hi))):
            xs += [0, 1, None]
            ys += [-i, -j, None]
        if xs:
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", hoverinfo="skip", showlegend=False,
                                     line=dict(color=f"rgba(31,119,180,{min(1.0, hi):.2f})", width=1 + 4 * lo)))
    for x, anchor in ((-0.03, "right"), (1.03, "left")):  # labels outside the lines
        for i, token in enumerate(tokens):
            fig.add_annotation(x=x, y=-i, text=html.escape(token), xanchor=anchor, showarrow=False)
    fig.update_xaxes(visible=False, range=[-0.6, 1.6])
    fig.update_yaxes(visible=False)
    fig.update_layout(title=title, height=80 + 22 * t, margin=dict(l=10, r=10, t=40, b=10),
                      plot_bgcolor="white")
    return fig


def attention_heatmap(tokens: list[str], att: np.ndarray, title: str) -> go.Figure:
    """(T, T) attention of one head as a heatmap: row = attending token, column = attended token."""
    labels = [f"{i}:{tok}" for i, tok in enumerate(tokens)]
    fig = px.imshow(att, x=labels, y=labels, color_continuous_scale="Blues", zmin=0, zmax=1, aspect="auto",
                    labels={"x": "attended token", "y": "attending token", "color": "weight"}, title=title)
    fig.update_layout(height=140 + 18 * len(tokens), margin=dict(l=10, r=10, t=40, b=10))
    return fig


def _cell_grid(layers: int, heads: int, title: str) -> go.Figure:
    """An empty layer x head grid for square scatter markers (markers, unlike heatmap cells, can be
    clicked to select them in Streamlit); layer 0 on top."""
    fig = go.Figure()
    fig.update_yaxes(autorange="reversed", title="layer", dtick=1, showgrid=False, zeroline=False)
    fig.update_xaxes(title="head", dtick=1, showgrid=False, zeroline=False, range=[-0.6, heads - 0.4])
    fig.update_layout(title=title, height=120 + 48 * layers, margin=dict(l=10, r=10, t=40, b=10),
                      plot_bgcolor="white", showlegend=False)
    return fig


def _cells(frame: pd.DataFrame, **marker) -> go.Scatter:
    """Square markers at (head, layer) with text inside; `frame` has layer, head, text columns."""
    return go.Scatter(x=frame["head"], y=frame["layer"], mode="markers+text", text=frame["text"],
                      customdata=frame[["layer", "head"]].to_numpy(), textfont=dict(size=10),
                      marker=dict(symbol="square", size=34, **marker),
                      hovertemplate="layer %{y}, head %{x}: %{text}<extra></extra>")


def gate_grid(shape: tuple[int, int], values: np.ndarray | None, closed: set[tuple[int, int]], title: str,
              roles: pd.DataFrame | None = None) -> go.Figure:
    """Layer x head switches of a (layers, heads) `shape`: open heads coloured by `values`, or by role
    kind with badges when `roles` (a Heads report table) is given, or plain; closed heads grey with a
    cross. Each cell carries (layer, head) as customdata."""
    layers, heads = shape
    cells = pd.DataFrame([(lay, h) for lay in range(layers) for h in range(heads)], columns=["layer", "head"])
    cells["closed"] = [(lay, h) in closed for lay, h in zip(cells["layer"], cells["head"])]
    cells["value"] = values.reshape(-1) if values is not None else 1.0
    if roles is not None:
        cells = cells.merge(roles[["layer", "head", "roles"]], on=["layer", "head"], how="left")
        cells["text"] = cells["roles"].fillna("").map(badge).replace("", "·")
    else:
        cells["text"] = cells["value"].map("{:.2f}".format) if values is not None else "on"
    cells.loc[cells["closed"], "text"] = "✕"
    fig = _cell_grid(layers, heads, title)
    open_ = cells[~cells["closed"]]
    if roles is not None:
        colour = dict(color=open_["roles"].fillna("").map(role_kind).map(ROLE_COLOURS))
    elif values is not None:
        colour = dict(color=open_["value"], colorscale="Viridis", showscale=True, colorbar=dict(thickness=12))
    else:
        colour = dict(color="#4c78a8")
    fig.add_trace(_cells(open_, **colour))
    fig.add_trace(_cells(cells[cells["closed"]], color="#d0d0d0"))
    return fig


def history_chart(history: pd.DataFrame) -> go.Figure:
    """Accuracy against the larger batch's latency (`latency_ms` at `batch`) for each change of the session."""
    batch = int(history["batch"].iloc[-1])
    fig = px.line(history, x="latency_ms", y="accuracy", text="step", markers=True, hover_name="what",
                  title=f"This session's changes: accuracy vs latency (batch {batch})")
    fig.update_traces(textposition="top center")
    fig.update_layout(height=320, margin=dict(l=10, r=10, t=40, b=10), xaxis_title=f"latency, batch {batch} (ms)",
                      yaxis_title="subset accuracy")
    return fig


def mark_pauses(fig: go.Figure, rows: pd.DataFrame) -> None:
    """A dotted line at each eval step of a run (`rows`: its records, columns step and paused_s: seconds
    frozen so far by the CPU queue) reached after a pause, labelled with the pause's seconds; the run's
    clock and timings leave pauses out, the curve shows where they were."""
    if "paused_s" not in rows:
        return
    grown = rows["paused_s"].fillna(0).diff().fillna(rows["paused_s"].fillna(0))
    for step, seconds in zip(rows["step"], grown):
        if seconds >= 0.5:
            fig.add_vline(x=step, line_dash="dot", line_color="grey", annotation_text=f"paused {seconds:.0f} s",
                          annotation_font_size=10)


def role_survival_chart(survival: pd.DataFrame, title: str) -> go.Figure:
    """Share of each role kind's heads kept vs sparsity (`analysis.roles.survival.survival_frame` rows with a
    `sparsity` column; kinds no head carries are left out), role-free heads ("none") dashed grey."""
    frame = survival[survival["total"] > 0].sort_values("sparsity")
    fig = px.line(frame, x="sparsity", y="share", color="kind", markers=True, hover_data=["step", "kept", "total"],
                  color_discrete_map={**ROLE_COLOURS, "none": ROLE_COLOURS[""]}, title=title,
                  labels={"share": "share of the kind's heads kept", "sparsity": "sparsity (exact)"})
    fig.update_traces(selector=dict(name="none"), line_dash="dash")
    fig.update_yaxes(range=[-0.05, 1.05], tickformat=".0%")
    fig.update_xaxes(tickformat=".0%")
    fig.update_layout(height=300, margin=dict(l=10, r=10, t=40, b=10), legend_title_text="")
    return fig


def frontier(points: pd.DataFrame) -> pd.DataFrame:
    """The rows of `points` no other row beats on both speedup_b32 and accuracy, by rising speedup."""
    ordered = points.sort_values(["speedup_b32", "accuracy"], ascending=[False, False])
    best, keep = -float("inf"), []
    for index, row in ordered.iterrows():  # from the fastest down: kept if more accurate than every faster one
        if row["accuracy"] > best:
            best = row["accuracy"]
            keep.append(index)
    return points.loc[keep].sort_values("speedup_b32")


DRIFT_COLOURS = {"drift_token_spearman": "token relevance Spearman", "drift_head_spearman": "head relevance Spearman",
                 "drift_token_topk": "top-5 token overlap", "drift_flipped": "share of flipped explanations"}


def pareto_chart(runs: pd.DataFrame, colour: str | None = None) -> go.Figure:
    """Accuracy vs measured batch-32 speedup of finished runs, with each teacher's dense point at 1x.

    `runs`: one row per run with columns label, method, model, teacher, accuracy, dense_accuracy,
    speedup_b32 (the run's model timed interleaved with its teacher, so the ratio is comparable
    across runs measured at different times). A dotted line joins each method's frontier (`frontier`).
    `colour`: None colours by method; a column of `DRIFT_COLOURS` colours by that explanation-drift
    figure (faithfulness to the dense model's reasons), the method then given by the marker symbol.
    """
    by = dict(color="method", symbol="model") if colour is None else dict(color=colour, symbol="method")
    fig = px.scatter(runs, x="speedup_b32", y="accuracy", **by, text="label",
                     hover_data=["teacher", "sparsity"], labels={"speedup_b32": "batch-32 speedup over the teacher "
                                                                "(measured)", "accuracy": "full-dev accuracy",
                                                                **DRIFT_COLOURS},
                     title="Finished runs: accuracy vs measured speedup",
                     color_continuous_scale="RdYlGn_r" if colour == "drift_flipped" else "RdYlGn")
    if colour is not None:
        fig.update_layout(coloraxis_colorbar=dict(title=DRIFT_COLOURS.get(colour, colour), orientation="h", y=-0.25))
    fig.update_traces(textposition="top center", marker_size=11)
    for method, points in runs.groupby("method"):
        front = frontier(points)
        if len(front) > 1:
            fig.add_trace(go.Scatter(x=front["speedup_b32"], y=front["accuracy"], mode="lines", hoverinfo="skip",
                                     name=f"{method} frontier", line=dict(dash="dot", width=1), showlegend=False))
    dense = runs.groupby("teacher", as_index=False)["dense_accuracy"].mean()
    fig.add_trace(go.Scatter(x=[1.0] * len(dense), y=dense["dense_accuracy"], mode="markers+text",
                             text=[f"dense {t}" for t in dense["teacher"]], textposition="bottom center",
                             marker=dict(symbol="star", size=15, color="black"), name="dense teacher"))
    fig.update_xaxes(type="log")
    fig.update_layout(height=420, margin=dict(l=10, r=10, t=40, b=10))
    return fig


SIZE_KINDS = {"sparse": "large-sparse (weight masks)", "structured": "structured (smaller shape)",
              "small-dense": "small-dense (another model)"}


def size_points(finished, label) -> pd.DataFrame | None:
    """`sparse_vs_dense_chart`'s rows for `finished` (run, final StepRecord) pairs of the most common teacher,
    each with its kind: small-dense (a dense run of another model than its teacher), sparse (exact zeros in
    its Linear weights) or structured; `label(run)` names a point. None with fewer than two such runs."""
    rows = []
    for r, final in finished:
        teacher = r.config.get("teacher") or r.config.get("model")
        nonzero = final.nonzero_parameters or final.parameters
        kind = ("small-dense" if teacher != r.config.get("model") and final.sparsity == 0 else
                "sparse" if nonzero < final.parameters else "structured")
        rows.append({"label": label(r), "teacher": teacher, "kind": kind, "accuracy": final.accuracy,
                     "nonzero_parameters": nonzero, "speedup_b1": final.speedup_b1,
                     "dense_accuracy": final.dense_accuracy, "dense_parameters": final.dense_parameters})
    if not rows:
        return None
    frame = pd.DataFrame(rows)
    frame = frame[frame["teacher"] == frame["teacher"].mode().iloc[0]]
    return frame if len(frame) >= 2 else None


def sparse_vs_dense_chart(runs: pd.DataFrame) -> go.Figure:
    """Zhu & Gupta (2017)'s comparison: full-dev accuracy against non-zero parameters (equal size) and
    against the measured batch-1 speedup over the teacher (equal latency), one point per finished run.

    `runs`: columns label, kind (a `SIZE_KINDS` key), accuracy, nonzero_parameters, speedup_b1, and
    dense_accuracy / dense_parameters of the teacher (drawn as a star at 1x)."""
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.06,
                        subplot_titles=("equal size: non-zero parameters (M)", "equal latency: batch-1 speedup "
                                        "over the teacher (measured)"))
    colours = dict(zip(SIZE_KINDS, px.colors.qualitative.Set1))
    for kind, rows in runs.groupby("kind"):
        for col, x in ((1, rows["nonzero_parameters"] / 1e6), (2, rows["speedup_b1"])):
            fig.add_trace(go.Scatter(x=x, y=rows["accuracy"], mode="markers+text", text=rows["label"],
                                     textposition="top center", name=SIZE_KINDS.get(kind, kind),
                                     marker=dict(size=11, color=colours.get(kind)), legendgroup=kind,
                                     showlegend=col == 1), row=1, col=col)
    dense = runs.iloc[0]
    for col, x in ((1, dense["dense_parameters"] / 1e6), (2, 1.0)):
        fig.add_trace(go.Scatter(x=[x], y=[dense["dense_accuracy"]], mode="markers", name="dense teacher",
                                 marker=dict(symbol="star", size=15, color="black"), showlegend=col == 1),
                      row=1, col=col)
    fig.update_yaxes(title_text="full-dev accuracy", tickformat=".0%", row=1, col=1)
    fig.update_xaxes(type="log", row=1, col=2)
    fig.update_layout(height=420, margin=dict(l=10, r=10, t=50, b=10), legend=dict(orientation="h", y=-0.15))
    return fig
