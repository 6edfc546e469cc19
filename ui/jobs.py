"""Start a background job (a separate `python -m ...` process) and show its progress from the store."""

from __future__ import annotations

import streamlit as st

from core.jobs import JobState, job_state, start_job


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
