"""Shareable views: the URL carries the model, the data, the page and what is selected (a head,
a sentence, a gate state, a run and step, a tour step), so a link opens exactly that view.

`restore` reads the link's query parameters into the session once (the first run of a session); `sync`
writes the session's view back into the URL on every run and shows the link in the sidebar. A link names
its page in a `page` parameter of the app's root URL (`/?page=gates&...`), not as a path: a page's own path
(`/gates`) opened first on a freshly started server runs that page's script without app.py. A gate state
travels as its switches (`encode_gates`): closed heads as one hex bit mask per layer, sublayers switched off,
keep fractions and criterion, and, for gates loaded from a training run, the run and step they started from.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from urllib.parse import urlencode

import streamlit as st

from core.data import DataError, DataSpec
from pruning.live import ManualGates
from ui.data import DATA_SOURCES
from ui.model_view import MODEL_CHOICES

GATE_PARAMS = ("closed", "attn_off", "ffn_off", "ffn_keep", "hidden_keep", "criterion", "gates_run")
BASES = "share_bases"  # session: {digest of a ManualGates.base: (run id, step)}


def encode_heads(closed: frozenset[tuple[int, int]]) -> str:
    """Closed heads as "layer:hexmask" joined by "-", bit h of a layer's mask = head h: {(0,1),(0,2),(3,0)} ->
    "0:6-3:1" ("" for none)."""
    masks: dict[int, int] = {}
    for layer, head in closed:
        masks[layer] = masks.get(layer, 0) | 1 << head
    return "-".join(f"{layer}:{masks[layer]:x}" for layer in sorted(masks))


def decode_heads(text: str) -> frozenset[tuple[int, int]]:
    """Inverse of `encode_heads`; ValueError for anything else."""
    heads = set()
    for part in filter(None, text.split("-")):
        layer, mask = part.split(":")
        bits = int(mask, 16)
        heads |= {(int(layer), h) for h in range(bits.bit_length()) if bits >> h & 1}
    return frozenset(heads)


def _base_digest(base: str) -> str:
    return hashlib.sha1(base.encode()).hexdigest()[:16]


def remember_run_base(gates: ManualGates, run_id: int, step: int) -> None:
    """Note that `gates` started from run `run_id`'s gates at `step`, so a link can name them."""
    if gates.base:
        st.session_state.setdefault(BASES, {})[_base_digest(gates.base)] = (int(run_id), int(step))


def encode_gates(gates: ManualGates, run_step: tuple[int, int] | None = None) -> dict[str, str]:
    """Query parameters of `gates` (only what differs from dense); `run_step` names its base's run and step."""
    out = {"closed": encode_heads(gates.closed_heads),
           "attn_off": ",".join(map(str, sorted(gates.attention_off))),
           "ffn_off": ",".join(map(str, sorted(gates.ffn_off))),
           "ffn_keep": f"{gates.ffn_keep:g}" if gates.ffn_keep < 1 else "",
           "hidden_keep": f"{gates.hidden_keep:g}" if gates.hidden_keep < 1 else "",
           "criterion": gates.criterion if gates.criterion != ManualGates.criterion else "",
           "gates_run": f"{run_step[0]}@{run_step[1]}" if run_step else ""}
    return {k: v for k, v in out.items() if v}


def decode_gates(params: dict[str, str], run_gates=None) -> ManualGates | None:
    """The ManualGates of query `params` (None when they hold no gate state); `run_gates(run, step)` gives a
    run's GateState for a "gates_run" base. ValueError for a malformed value."""
    if not any(params.get(k) for k in GATE_PARAMS):
        return None

    def layers(name: str) -> frozenset[int]:
        return frozenset(int(i) for i in params.get(name, "").split(",") if i)

    gates = ManualGates()
    if params.get("gates_run"):
        run, step = (int(x) for x in params["gates_run"].split("@"))
        gates = ManualGates.from_state(run_gates(run, step))
    return replace(gates, closed_heads=decode_heads(params.get("closed", "")),
                   attention_off=layers("attn_off"), ffn_off=layers("ffn_off"),
                   ffn_keep=float(params.get("ffn_keep", 1.0)), hidden_keep=float(params.get("hidden_keep", 1.0)),
                   criterion=params.get("criterion", ManualGates.criterion))


def view_params(page: str = "") -> dict[str, str]:
    """The session's view on page `page` (its url_path, "" for the default page) as query parameters (only
    what is set and not the default)."""
    state = st.session_state
    out = {"page": page, "model": state.get("model_spec", "default")}
    data = state.get("data_spec")
    if data is not None and data != DataSpec():
        out["data"] = data.to_json()
    if "head_layer" in state and "head_index" in state:
        out["head"] = f"{int(state['head_layer'])}.{int(state['head_index'])}"
    if state.get("why_text"):
        out["sentence"] = state["why_text"]
    gates = state.get("gates_from_run") or state.get("gates")  # gates on their way to the Gates page come first
    if isinstance(gates, ManualGates) and gates != ManualGates():
        origin = state.get(BASES, {}).get(_base_digest(gates.base)) if gates.base else None
        out.update(encode_gates(gates, origin))
    run = state.get("prune_run")
    if run is not None:
        out["run"] = str(run)
        step = state.get(f"gate_step_{run}")
        if step is not None:
            out["step"] = str(step)
    if state.get("tour_step"):
        out["tour"] = str(state["tour_step"])
    return {k: v for k, v in out.items() if v and not (k == "model" and v == "default")}


def _restore_model(spec: str) -> None:
    labels = {v: k for k, v in MODEL_CHOICES.items() if v}
    st.session_state["model_spec"] = spec
    if spec in labels:
        st.session_state["model_choice"] = labels[spec]
    else:
        st.session_state.update(model_choice=next(k for k, v in MODEL_CHOICES.items() if v is None), model_path=spec)


def _restore_data(spec: DataSpec) -> None:
    builtin = {v: k for k, v in DATA_SOURCES.items()}
    st.session_state["data_spec"] = spec
    if spec.path in builtin:
        st.session_state["data_choice"] = builtin[spec.path]
    else:
        st.session_state.update(data_choice="File path", data_path=spec.path, text_column=spec.text_column or "",
                                label_column=spec.label_column or "", whole_file=spec.whole_file)


def restore() -> str:
    """Once per session: put the link's view (st.query_params) into the session state (a bad value is
    reported and skipped); returns the url_path of the link's page ("" for none: stay)."""
    if st.session_state.get("share_restored"):
        return ""
    st.session_state["share_restored"] = True
    params = st.query_params.to_dict()
    if not params:
        return ""
    from pruning.runs import RunStore

    store = RunStore()
    try:
        if "model" in params:
            _restore_model(params["model"])
        if "data" in params:
            _restore_data(DataSpec.from_json(params["data"]))
        if "head" in params:
            layer, head = (int(x) for x in params["head"].split("."))
            st.session_state.update(head_layer=layer, head_index=head)
        if "sentence" in params:
            st.session_state["why_text"] = params["sentence"]
        gates = decode_gates(params, store.gates)
        if gates is not None:
            st.session_state.update(gates_from_run=gates, gates_what="from a shared link")
            if params.get("gates_run"):
                remember_run_base(gates, *(int(x) for x in params["gates_run"].split("@")))
        if "run" in params and int(params["run"]) in {r.id for r in store.list()}:
            run = int(params["run"])
            st.session_state["prune_run"] = run
            if "step" in params and int(params["step"]) in store.gate_steps(run):
                st.session_state[f"gate_step_{run}"] = int(params["step"])
        if "tour" in params:
            st.session_state["tour_step"] = int(params["tour"])
    except (ValueError, KeyError, DataError) as exc:
        st.warning(f"Part of this link could not be read and was skipped: {exc}")
    return params.get("page", "")


def link(params: dict[str, str], page: str = "") -> str:
    """The app's root URL (the browser's, without page `page`'s path) with `params`."""
    base = st.context.url or ""
    if page and base.rstrip("/").endswith(f"/{page}"):
        base = base.rstrip("/")[: -len(page)]
    return f"{base}?{urlencode(params)}" if params else base


def sync(page: str = "") -> str:
    """Write the session's view on page `page` (its url_path) into the URL and show its link (with a copy
    button) in the sidebar."""
    params = view_params(page)
    if st.query_params.to_dict() != params:
        st.query_params.from_dict(params)
    url = link(params, page)
    with st.sidebar.popover("Link to this view", width="stretch"):
        st.caption("Copy this link (button at its right) to open exactly this view: model, data, page, head, "
                   "sentence, gate state, run and step.")
        st.code(url, language=None, wrap_lines=True)
    return url
