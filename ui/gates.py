"""Session state and cached measurements of the Gates page.

Each browser tab has its own session: its gate choices, undo stack and history live in
`st.session_state`; the dense model is a shared read-only singleton (`ui.loaders`). A gate choice
(`ManualGates`) is turned into a GateState once (`gate_state`), a physically pruned copy is made once
(`pruned_model`, also what Export saves) and measured once (`measure`, `pruning.live.measure_pruned`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path

import streamlit as st

from analysis.drift import Drift, Explanations, drift, explain
from analysis.heads import HeadsReport
from core.adapter import GateShape
from core.cli import torch_threads
from core.cpu_queue import paused_for_timing
from core.data import TextDataset
from core.latency import threads_leaving_a_core
from core.models import LoadedModel
from core.paths import headlab_home
from core.structure import PruningPlan
from core.summary import median_tokens
from pruning.gate_state import GateState
from pruning.int8 import Int8Report, compare
from pruning.live import Comparison, Figures, ManualGates, figures, measure_pruned, quick_rounds, time_models
from pruning.surgery import prune
from ui.jobs import ensure_job, wait_for

SUBSET = 100  # dev sentences measured after every change (seeded); the full dev set follows in the background
DECODER_SUBSET = 32  # a decoder's prompts cost ~0.15 s each on 2 cores (SmolLM2)


def subset_size(loaded: LoadedModel) -> int:
    return DECODER_SUBSET if loaded.is_decoder else SUBSET


DRIFT_EXAMPLES = 8  # the subset's first texts explained after every change: ~0.2 s of one core on the default model


_MODEL = {LoadedModel: lambda m: m.fingerprint}
_DATA = {TextDataset: lambda d: d.fingerprint()}


def current() -> ManualGates:
    return st.session_state.setdefault("gates", ManualGates())


def apply(change: ManualGates, what: str) -> None:
    """Make `change` the current gates, remembering the previous ones for undo."""
    if change != current():
        st.session_state.setdefault("gates_undo", []).append(current())
        st.session_state["gates"] = change
        st.session_state["gates_what"] = what


def undo() -> None:
    stack = st.session_state.get("gates_undo", [])
    if stack:
        st.session_state["gates"] = stack.pop()
        st.session_state["gates_what"] = "undo"


def reset() -> None:
    apply(ManualGates(), "reset")


def toggle_head(layer: int, head: int) -> None:
    gates = current()
    closed = gates.closed_heads ^ {(layer, head)}
    apply(replace(gates, closed_heads=frozenset(closed)), f"{'close' if (layer, head) in closed else 'open'} "
                                                          f"L{layer}H{head}")


def find_report(loaded: LoadedModel, data: TextDataset) -> HeadsReport | None:
    """The largest Heads report on disk for this model and data (any subset size, predicted class)."""
    folder = headlab_home() / "cache" / "heads"
    found = sorted(folder.glob(f"{loaded.fingerprint}-{data.fingerprint()}-*-None/heads.csv"),
                   key=lambda p: int(p.parent.name.split("-")[-2]))
    return _load_report(str(found[-1].parent)) if found else None


@st.cache_data(max_entries=8, show_spinner=False)
def _load_report(folder: str) -> HeadsReport:
    return HeadsReport.load(Path(folder))


TOGGLE_ROUNDS = {1: (3, 3), 32: (1, 1)}  # an encoder's pruned copy after a toggle: one batch-32 call (~0.3 s)


def toggle_rounds(loaded: LoadedModel) -> dict[int, tuple[int, int]]:
    """(rounds, repeats) per batch size of the timing after a toggle; the full-dev job refines it."""
    return quick_rounds(loaded) if loaded.is_decoder else TOGGLE_ROUNDS


@st.cache_data(max_entries=4, show_spinner="Measuring the dense model...", hash_funcs={**_MODEL, **_DATA})
def dense_figures(loaded: LoadedModel, subset: TextDataset) -> Figures:
    """The dense model's accuracy and sizes on `subset`, and its latency timed alone: what the page shows
    while nothing is pruned (the same model is never timed against itself), and the dense side of every
    toggle's quick look (`measure`)."""
    with paused_for_timing():
        dense = figures(loaded, subset, median_tokens(loaded, subset.texts))
        time_models({"dense": (loaded, dense)}, subset.texts, quick_rounds(loaded), threads=threads_leaving_a_core())
    return dense


@st.cache_data(max_entries=64, show_spinner=False, hash_funcs=_MODEL)
def gate_state(loaded: LoadedModel, gates: ManualGates) -> tuple[str, str]:
    """(digest, GateState JSON) of `gates` on `loaded`, computed once per gate choice (FFN and hidden
    keep fractions score units by weight magnitude, hidden dims over the whole embedding table)."""
    text = gates.state(loaded).to_json()
    return hashlib.sha1(f"{loaded.fingerprint}:{text}".encode()).hexdigest()[:12], text


@st.cache_resource(max_entries=4, show_spinner="Pruning a copy...", hash_funcs=_MODEL)
def pruned_model(loaded: LoadedModel, gates: ManualGates) -> LoadedModel:
    """The physically pruned copy of `loaded` for `gates` (shared read-only, like the dense model): the
    copy that is measured and, on Export, saved."""
    return prune(loaded, GateState.from_json(gate_state(loaded, gates)[1]))


@st.cache_data(max_entries=64, show_spinner="Pruning a copy and measuring it...", hash_funcs={**_MODEL, **_DATA})
def measure(loaded: LoadedModel, gates: ManualGates, subset: TextDataset) -> Comparison:
    """Dense vs pruned on `subset` (`pruning.live.measure_pruned`, cached per gate choice: undo and
    repeats are instant). Only the pruned copy is timed: the dense latencies are `dense_figures`' (the same
    batches and threads, also timed with background work frozen), which halves a toggle's timing; the
    full-dev job times both interleaved. The copy just ran, so batch 32 is not warmed up; `seconds`
    includes pruning.
    Background work holding the CPU is frozen meanwhile (`paused_for_timing`): a toggle is interactive
    work, and the two models' timings must not share the cores with it. With nothing pruned the dense
    figures are shown as they are (1.00x)."""
    start = time.perf_counter()
    dense = dense_figures(loaded, subset)
    if gates == ManualGates():
        shape = GateShape.of(loaded)
        return Comparison(dense=dense, pruned=dense, sparsity=0.0, seq_len=median_tokens(loaded, subset.texts),
                          seconds=time.perf_counter() - start,
                          note=f"Dense: {PruningPlan.from_state(GateState.dense(shape)).describe(shape)}.")
    with paused_for_timing():
        cmp = measure_pruned(loaded, pruned_model(loaded, gates), subset, dense, toggle_rounds(loaded), warm_b32=False,
                             timing_threads=threads_leaving_a_core(), time_dense=False)
    return dataclasses.replace(cmp, seconds=time.perf_counter() - start)


@st.cache_data(max_entries=4, show_spinner="Explaining the dense model...", hash_funcs={**_MODEL, **_DATA})
def dense_explanations(loaded: LoadedModel, subset: TextDataset) -> Explanations:
    """LRP explanations of the dense model on the first `DRIFT_EXAMPLES` texts of `subset` (they do not change)."""
    return explain(loaded, subset.texts[:DRIFT_EXAMPLES])


@st.cache_data(max_entries=64, show_spinner="Comparing explanations...", hash_funcs={**_MODEL, **_DATA})
def explanation_drift(loaded: LoadedModel, gates: ManualGates, subset: TextDataset) -> Drift:
    """The pruned copy's explanation drift from the dense model (`analysis.drift`) on the texts of
    `dense_explanations`, cached per gate choice. Part of the toggle's interactive work: background work
    stays frozen for it too (`paused_for_timing`)."""
    reference = dense_explanations(loaded, subset)
    with paused_for_timing():
        return drift(loaded, pruned_model(loaded, gates), subset.texts[:DRIFT_EXAMPLES], reference=reference)


@st.cache_data(max_entries=16, show_spinner="Quantising the pruned copy to int8 and measuring it...",
               hash_funcs={**_MODEL, **_DATA})
def int8_figures(loaded: LoadedModel, gates: ManualGates, subset: TextDataset) -> Int8Report:
    """The pruned copy in fp32 and dynamically int8-quantised (torch: every Linear; `pruning.int8.compare`):
    accuracy, agreement with fp32, latency at batch 1 and the larger batch, size; cached per gate choice (the
    Gates page's int8 toggle). Pruning and quantisation compose: both figures are the pruned model's."""
    with paused_for_timing(), torch_threads(threads_leaving_a_core()):
        return compare(pruned_model(loaded, gates), subset)


def gates_file(loaded: LoadedModel, gates: ManualGates) -> tuple[str, Path]:
    """(digest, path) of the current gate state saved as JSON for background jobs (written once)."""
    digest, text = gate_state(loaded, gates)
    path = headlab_home() / "cache" / "gates" / f"{digest}.json"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".partial").write_text(text)
        path.with_suffix(".partial").replace(path)
    return digest, path


def refined_path(digest: str, data: TextDataset) -> Path:
    """Where the full-dataset evaluation of a gate state (by `gates_file` digest) is written."""
    return headlab_home() / "cache" / "gates" / f"{digest}-{data.fingerprint()}-full.json"


def refined(digest: str, data: TextDataset) -> tuple[str, int, Comparison] | None:
    """(data name, examples, comparison) of the full-dataset job's result for `digest`, or None yet."""
    path = refined_path(digest, data)
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    return record["data"], record["examples"], Comparison.from_dict(record)


def runs_with_gates(spec: str) -> dict[int, str]:
    """{run id: label} of training runs of model `spec` that recorded gate snapshots, newest first."""
    from pruning.runs import RunStore

    store = RunStore()
    return {run.id: f"{run.id}: {run.config.get('method', '?')} {run.status}, step {run.step}"
            for run in sorted(store.list(), key=lambda r: -r.id)
            if run.config.get("model") == spec and store.gate_steps(run.id)}


def run_steps(run_id: int) -> list[int]:
    from pruning.runs import RunStore

    return RunStore().gate_steps(run_id)


def run_gates(run_id: int, step: int | None):
    from pruning.runs import RunStore

    return RunStore().gates(run_id, step)


def speedup_preset_path(loaded: LoadedModel, data: TextDataset, target: float) -> tuple[str, Path]:
    """(job name, gates file) of ZipLM's structure for `target` speed-up on this model and data."""
    key = f"{loaded.fingerprint}-{data.fingerprint()}-{target:.2f}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    return f"ziplm-structure-{digest}", headlab_home() / "cache" / "gates" / f"ziplm-{digest}.json"


def speedup_preset(spec: str, data_spec, loaded: LoadedModel, data: TextDataset, target: float) -> GateState | None:
    """ZipLM's structure for `target` (`python -m pruning structure` in a background job, its latency table
    cached per machine): the gate state once the job has written it, else None (the job's progress shows)."""
    job, path = speedup_preset_path(loaded, data, target)
    if path.exists():
        return GateState.from_json(path.read_text())
    ensure_job(job, ["pruning", "structure", "--model", spec, *data_spec.cli_args(), "--speedup", f"{target:.2f}",
                     "--out", str(path), "--job", job])
    wait_for(job, f"ZipLM structure for {target:.2f}×", path.exists)
    return None
