"""The guided tour: seven short steps on the session's model (the default encoder or SmolLM2), from "a
sentence goes in" to "half the heads are gone and it still works". Each step is one paragraph, one live
chart drawn by the pages' own code (ui.charts, ui.heads, ui.gates) and one thing to try.

The Heads analysis the later steps need (relevance and roles of every head on `REPORT_LIMIT` dev
sentences) starts in the background as soon as the tour opens, like the Gates page's; a step that needs it
says so while it waits."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import streamlit as st

from analysis.heads import HeadsReport, report_dir
from core.data import DataSpec, TextDataset
from core.jobs import job_state
from core.models import LoadedModel
from pruning.live import ManualGates, least_relevant_heads
from ui import gates as g
from ui.charts import attention_lines, gate_grid, head_heatmap, highlighted_tokens, role_map
from ui.heads import explain, sentence_attention
from ui.jobs import ensure_job, wait_for
from ui.model_view import show_architecture
from ui.notes import note
from ui.presenter import chart

REPORT_LIMIT = 100  # dev sentences of the tour's Heads analysis (about a minute on the default encoder)
STEP = "tour_step"  # session: the step shown, 0-based


@dataclass
class Tour:
    """What every step works on: the session's model and dev data, and the sentence of step 1."""

    spec: str
    data_spec: DataSpec
    loaded: LoadedModel
    data: TextDataset

    @property
    def sentence(self) -> str:
        return st.session_state.get("tour_sentence") or self.data.texts[0]

    @property
    def decoder(self) -> bool:
        return self.loaded.is_decoder

    def report(self) -> HeadsReport | None:
        """The Heads report of this model and data (any subset size), starting its job if there is none."""
        found = g.find_report(self.loaded, self.data)
        if found is None:
            folder = self.report_folder()
            ensure_job(f"heads-{folder.name}", ["analysis", "heads", "--model", self.spec, *self.data_spec.cli_args(),
                                                "--limit", str(REPORT_LIMIT), "--out", str(folder),
                                                "--job", f"heads-{folder.name}"])
        return found

    def report_folder(self):
        return report_dir(self.loaded.fingerprint, self.data.fingerprint(), REPORT_LIMIT, None)

    def wait_for_report(self) -> HeadsReport | None:
        """The report, or None after showing what the step waits for (the page polls until it is there)."""
        report = self.report()
        if report is None:
            folder = self.report_folder()
            st.info(f"This step needs every head's relevance and role on {REPORT_LIMIT} dev sentences: the Heads "
                    "analysis runs in the background (started when the tour opened; about a minute on the default "
                    "encoder, longer on SmolLM2). The step appears by itself when it is done.")
            wait_for(f"heads-{folder.name}", "Heads analysis", lambda: (folder / "heads.csv").exists())
        return report


@dataclass(frozen=True)
class Step:
    title: str
    text: str  # the encoder's paragraph
    decoder_text: str  # SmolLM2's ("" = the same)
    draw: Callable[[Tour], None]  # the live chart and the thing to try

    def paragraph(self, tour: Tour) -> str:
        text = self.decoder_text if tour.decoder and self.decoder_text else self.text
        return text.format(layers=tour.loaded.architecture().layers)


def go_to(page: str, **state) -> None:
    """Set `state` in the session and open `page` (a path under views/)."""
    st.session_state.update(state)
    st.switch_page(page)


def heads_page_with(layer: int, head: int, sentence: str) -> None:
    go_to("views/heads.py", head_layer=int(layer), head_index=int(head), why_text=sentence)


def gates_page_with(closed: frozenset[tuple[int, int]], what: str) -> None:
    go_to("views/gates.py", gates_from_run=replace(ManualGates(), closed_heads=closed), gates_what=what)


# ----------------------------------------------------------------------------- the steps' charts and tries
def _sentence_in(tour: Tour) -> None:
    show_architecture(tour.loaded)
    why = explain(tour.loaded, tour.sentence, None)
    tokens = [t for t, inside in zip(why.tokens, why.in_text) if inside] if tour.decoder else why.tokens
    st.html(highlighted_tokens(tokens, np.zeros(len(tokens)), spaced=not tour.decoder))
    st.markdown(f"The model says **{why.predicted}** ({why.confidence:.0%} sure) for this sentence, cut into "
                f"**{len(tokens)} tokens** as shown.")
    note("architecture")
    st.text_input("**Try it:** type your own sentence (the next steps use it)", key="tour_sentence",
                  placeholder=tour.data.texts[0])


def previous_token_head(attention: np.ndarray) -> tuple[int, int]:
    """(layer, head) whose attention (layers, heads, T, T) puts the most weight on the token just before."""
    t = attention.shape[-1]
    prev = attention[..., np.arange(1, t), np.arange(t - 1)].mean(-1)  # (layers, heads)
    layer, head = np.unravel_index(int(np.argmax(prev)), prev.shape)
    return int(layer), int(head)


def _attention(tour: Tour) -> None:
    tokens, attention = sentence_attention(tour.loaded, tour.sentence)
    layers, heads = attention.shape[:2]
    if "tour_layer" not in st.session_state:  # start on the head that most looks one token back
        st.session_state["tour_layer"], st.session_state["tour_head"] = previous_token_head(attention)
    c1, c2 = st.columns(2)
    layer = c1.selectbox("**Try it:** pick another layer", range(layers), key="tour_layer")
    head = c2.selectbox("... and head", range(heads), key="tour_head")
    chart(attention_lines(tokens, attention[layer, head], f"L{layer}H{head}: who looks at whom"), "tour_attention")
    note("attention")
    if st.button(f"Open L{layer}H{head} on the Heads page", key="tour_to_head"):
        heads_page_with(layer, head, tour.sentence)


def _why(tour: Tour) -> None:
    why = explain(tour.loaded, tour.sentence, None)
    tokens, relevance = why.tokens, why.relevance
    if tour.decoder:
        tokens, relevance = [t for t, inside in zip(tokens, why.in_text) if inside], relevance[why.in_text]
    st.markdown(f"Predicted **{why.predicted}** ({why.confidence:.0%}); the **{why.explained}** logit "
                f"{why.logit:+.2f} split over the tokens. Green supports it, red speaks against it.")
    st.html(highlighted_tokens(tokens, relevance, spaced=not tour.decoder))
    note("why")
    st.caption("**Try it:** go back to step 1 and change one word (e.g. 'great' to 'dull'), then come back.")
    if st.button("Explain it on the Heads page", key="tour_to_why"):
        layer, head = st.session_state.get("tour_layer", 0), st.session_state.get("tour_head", 0)
        heads_page_with(layer, head, tour.sentence)


def _relevance(tour: Tour) -> None:
    report = tour.wait_for_report()
    if report is None:
        return
    table = report.table
    chart(head_heatmap(table, "relevance", "LRP relevance of every head (share of the decision)"), "tour_relevance")
    note("head_heatmap")
    top = table.loc[table["relevance"].idxmax()]
    low = table.loc[table["relevance"].idxmin()]
    st.markdown(f"The most relevant head is **L{int(top['layer'])}H{int(top['head'])}** "
                f"({top['relevance']:.3f}); the least, L{int(low['layer'])}H{int(low['head'])} "
                f"({low['relevance']:.3f}). Uniform would be {1 / len(table):.3f} each.")
    if st.button(f"Look at L{int(top['layer'])}H{int(top['head'])} on the Heads page", key="tour_to_top"):
        heads_page_with(top["layer"], top["head"], tour.sentence)


def _roles(tour: Tour) -> None:
    report = tour.wait_for_report()
    if report is None:
        return
    table = report.table
    event = chart(role_map(table), "tour_roles", on_select="rerun", selection_mode="points")
    note("role_map")
    counts = table["roles"].fillna("").map(lambda r: r.split("(")[0].split("+")[0] or "none").value_counts()
    st.caption("Heads by first role: " + ", ".join(f"{kind} {n}" for kind, n in counts.items()))
    points = event.selection.points if event and event.selection else []
    if points:
        layer, head = points[0]["customdata"]
        st.session_state.update(tour_layer=int(layer), tour_head=int(head))
    layer, head = st.session_state.get("tour_layer"), st.session_state.get("tour_head")
    if layer is None:
        st.caption("**Try it:** click a coloured head to pick it.")
        return
    roles = table[(table["layer"] == layer) & (table["head"] == head)]["roles"].iloc[0] or "no role"
    st.markdown(f"**Try it:** click a coloured head. Picked: **L{layer}H{head}** ({roles}).")
    if st.button(f"See what L{layer}H{head} does on the Heads page", key="tour_to_role"):
        heads_page_with(layer, head, tour.sentence)


def _measured(tour: Tour, closed: frozenset[tuple[int, int]]) -> None:
    """Accuracy and size of the model with `closed` heads cut out, on the Gates page's dev subset."""
    subset = tour.data.subset(g.subset_size(tour.loaded), seed=0)
    result = g.measure(tour.loaded, replace(ManualGates(), closed_heads=closed), subset)
    d, p = result.dense, result.pruned
    cols = st.columns(3)
    cols[0].metric(f"Accuracy ({len(subset)} dev)", f"{p.accuracy:.1%}", f"{(p.accuracy - d.accuracy) * 100:+.1f} pts",
                   help=f"dense {d.accuracy:.1%}")
    cols[1].metric("Parameters", f"{p.parameters / 1e6:.2f} M", f"{p.parameters / d.parameters - 1:+.1%}",
                   delta_color="off")
    cols[2].metric(f"Latency, batch {result.large_batch}", f"{getattr(p, f'latency_b{result.large_batch}_ms'):.0f} ms",
                   f"{result.speedup(result.large_batch):.2f}× faster", delta_color="off")
    st.caption(result.note)


def _close(tour: Tour) -> None:
    report = tour.wait_for_report()
    if report is None:
        return
    closed = st.session_state.setdefault("tour_closed", frozenset(least_relevant_heads(report.table, 6)))
    shape = (int(report.table["layer"].nunique()), int(report.table["head"].nunique()))
    values = report.table.pivot(index="layer", columns="head", values="relevance").sort_index().to_numpy(float)
    event = chart(gate_grid(shape, values, set(closed), "Head switches, coloured by relevance (✕ closed)"),
                  f"tour_gates_{len(closed)}_{hash(closed) % 997}", on_select="rerun", selection_mode="points")
    note("gate_grid")
    points = event.selection.points if event and event.selection else []
    if points:
        layer, head = points[0]["customdata"]
        st.session_state["tour_closed"] = closed ^ {(int(layer), int(head))}
        st.rerun()
    st.markdown(f"**Try it:** click heads to close or open them ({len(closed)} closed now: the least relevant "
                "ones), then measure the model without them.")
    if st.button(f"Measure the model with these {len(closed)} heads cut out", key="tour_measure") or \
            st.session_state.get("tour_measured") == closed:
        st.session_state["tour_measured"] = closed
        _measured(tour, closed)
    if st.button("Open these switches on the Gates page", key="tour_to_gates"):
        gates_page_with(closed, "from the tour")


def _half(tour: Tour) -> None:
    report = tour.wait_for_report()
    if report is None:
        return
    table = report.table
    half = least_relevant_heads(table, len(table) // 2)
    shape = (int(table["layer"].nunique()), int(table["head"].nunique()))
    chart(gate_grid(shape, None, set(half), f"The {len(half)} least relevant heads closed (✕), roles of the rest",
                    roles=table), "tour_half")
    note("live_figures")
    _measured(tour, half)
    st.markdown("**Try it:** open this model on the Gates page, or let training choose which parts go (CoFi "
                "learns a gate for every head, FFN unit and hidden dim, then cuts them out).")
    c1, c2 = st.columns(2)
    if c1.button("Open this half-pruned model in Gates", key="tour_half_gates", width="stretch"):
        gates_page_with(half, f"tour: {len(half)} least relevant heads closed")
    if c2.button("Prepare a CoFi run on the Prune page", key="tour_cofi", width="stretch"):
        go_to("views/prune.py", prune_method="cofi")


STEPS = [
    Step("1. A sentence goes in",
         "The model reads a movie review and says whether it is *fresh* (positive) or *rotten*. First the sentence "
         "is cut into tokens, word pieces from a fixed vocabulary; then {layers} layers of attention heads and small "
         "feed-forward networks turn each token into a vector, and a classifier reads the first token's vector.",
         "SmolLM2 is a small language model: it reads the review inside a prompt and answers with the next word "
         "('positive' or 'negative'); the more likely word is its verdict. The sentence is cut into tokens, and "
         "{layers} layers of attention heads and feed-forward networks read them left to right.", _sentence_in),
    Step("2. Every head looks somewhere",
         "Inside each layer, every attention head lets each token gather information from other tokens. How "
         "much a token looks at each other token is a set of weights that add up to 1. Many heads follow simple "
         "patterns: this one mostly looks at the token just before.",
         "Inside each layer, every attention head lets each token gather information from the tokens before it "
         "(a decoder never looks ahead). Weights add up to 1 per token; many heads follow simple patterns, this "
         "one mostly looks at the token just before.", _attention),
    Step("3. Why did it decide that?",
         "Layer-wise relevance propagation (LRP) splits the model's score for its answer backwards, layer by "
         "layer, until every token has its share. The shares add up to the score, so you can read the colours "
         "as 'how much this word pushed the decision'.", "", _why),
    Step("4. Some heads matter more than others",
         "The same backward split can stop at the heads: how much of the decision passed through each head, "
         "averaged over 100 dev sentences. A few heads carry a lot; many carry almost nothing.", "", _relevance),
    Step("5. Heads have jobs",
         "Voita et al. found that the heads that matter often do a recognisable job: look at the previous or "
         "next word (positional), find a grammatical partner (syntactic), or look at the rarest word.",
         "In language models Olsson et al. found induction heads (after '... A B ... A' they look at B, to copy "
         "it), and heads that look at the previous token or at earlier copies of the same token.", _roles),
    Step("6. Switch some heads off",
         "Every head has a switch. Closing it removes the head's weights from a copy of the model, which is then "
         "measured again: accuracy on 100 dev sentences, size and speed. Closing the least relevant heads "
         "barely changes accuracy.",
         "Every query head has a switch. Closing it removes the head's weights from a copy of the model (a KV "
         "head goes when all its query heads go), which is measured again on 32 dev prompts.", _close),
    Step("7. Half the heads are gone, and it still works",
         "Now half the heads are closed: the least relevant ones. Most of the accuracy is still there, because "
         "the heads that carry the decision and do the jobs are kept. Training can go further: it learns which "
         "heads, FFN units and hidden dims to remove, and recovers accuracy while doing so.", "", _half),
]


def show(tour: Tour) -> None:
    """The tour's current step with Back / Next; the Heads analysis starts in the background meanwhile."""
    st.session_state["tour_seen"] = True
    index = min(max(int(st.session_state.get(STEP, 0)), 0), len(STEPS) - 1)
    tour.report()  # start the later steps' analysis now, so it is ready when they come
    if job_state(f"heads-{tour.report_folder().name}") is not None and index < 3:
        st.caption("The Heads analysis for steps 4–7 runs in the background meanwhile.")
    st.progress((index + 1) / len(STEPS), text=f"Step {index + 1} of {len(STEPS)} on `{tour.spec}`")
    step = STEPS[index]
    st.header(step.title)
    st.write(step.paragraph(tour))
    step.draw(tour)
    st.divider()
    back, _, forward = st.columns([1, 4, 1])
    if back.button("← Back", disabled=index == 0, width="stretch", key="tour_back"):
        st.session_state[STEP] = index - 1
        st.rerun()
    if forward.button("Next →", disabled=index == len(STEPS) - 1, width="stretch", key="tour_next", type="primary"):
        st.session_state[STEP] = index + 1
        st.rerun()
