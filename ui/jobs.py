"""Start a background job (a separate `python -m ...` process) and show its progress from the store."""

from __future__ import annotations

import streamlit as st

from core.cpu_queue import Turn, reconcile
from core.jobs import JobState, job_state, start_job

# What the app's job names (their prefix before the fingerprints) do, as the queue panel says it.
JOB_KINDS = {"summary": "Model evaluation", "heads": "Heads analysis", "gates-eval": "Gates full-dev evaluation",
             "prepare": "preparing", "finetune": "fine-tuning", "export": "export",
             "perplexity": "Language modelling (perplexity)", "zeroshot": "Zero-shot evaluation",
             "ziplm-structure": "ZipLM speed-up preset"}


def ensure_job(name: str, args: list[str]) -> JobState | None:
    """Start job `name` unless it is running or done; return its current state."""
    state = job_state(name)
    if state is None or state.status in ("failed", "interrupted") and st.session_state.get(f"retry-{name}"):
        start_job(name, args)
        st.session_state.pop(f"retry-{name}", None)
        state = job_state(name)
    return state


def show_job(state: JobState | None, label: str) -> None:
    """A progress bar for a running job, or an error box with a retry button for a failed one."""
    if state is None:
        st.info(f"{label}: starting...")
    elif state.status == "running":
        st.progress(min(state.fraction, 1.0), text=f"{label}: {state.message} ({state.done}/{state.total})")
    elif state.status in ("failed", "interrupted"):
        st.error(f"{label} {state.status}: {state.error}")
        if st.button("Retry", key=f"retry-button-{state.name}"):
            st.session_state[f"retry-{state.name}"] = True
            st.rerun()


def wait_for(name: str, label: str, finished) -> None:
    """Poll job `name` every second, showing its progress; rerun the page once `finished()` is true."""

    @st.fragment(run_every=1.0)
    def _poll() -> None:
        show_job(job_state(name), label)
        if finished():
            st.rerun()

    _poll()


def describe_turn(turn: Turn) -> str:
    """A queue entry as a person reads it: "Heads analysis", "preparing smollm2", "pruning train --run-id 3"."""
    for prefix, what in sorted(JOB_KINDS.items(), key=lambda kv: -len(kv[0])):
        if turn.name.startswith(f"{prefix}-"):
            rest = turn.name.removeprefix(f"{prefix}-")
            return f"{what} {rest}" if prefix == "prepare" else what
    return turn.name


def queue_line(turns: list[Turn]) -> str | None:
    """One line on what HeadLab's background work does with the CPU (None when nothing is queued)."""
    if not turns:
        return None
    parts = []
    for turn in turns:
        state = {"running": "runs", "paused": "is paused (interactive work goes first)", "waiting": "waits"}[turn.state]
        parts.append(f"{describe_turn(turn)} {state}")
    return "CPU: " + "; ".join(parts) + "."


def cpu_queue_panel() -> None:
    """The sidebar line on every page: what background work runs, what is paused, what waits (polled every 2 s)."""

    @st.fragment(run_every=2.0)
    def _poll() -> None:
        line = queue_line(reconcile())
        if line:
            st.caption(line)

    with st.sidebar:
        _poll()
