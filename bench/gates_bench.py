"""Gates page responsiveness: time from a toggle to updated subset accuracy and latency, on an idle
machine and while a training run trains.

Drives the Gates page with Streamlit's AppTest on the default model: opens it (dense figures are
measured once and cached, as in the app), then closes heads one at a time through the page's own
state (`ManualGates` in the session) and times each rerun: physical pruning of a copy, accuracy on the
100-sentence subset, the copy's batch 1 and 32 latency (the dense model's was timed on opening), the
explanation drift, and rendering. The
page's own background jobs (full-dev refinement, Heads analysis) are not started while timing. Two times per
change: until the figures are measured (`ui.gates.measure` returns; the page writes its metrics row next, and
Streamlit sends each element to the browser as it is written, so that is when the figures are on screen), and
the whole rerun (the explanation drift, the grid and the history chart follow).

`--with-run` then starts a real CoFi training run in the background (`pruning.launch`, as the Prune
page does: niced, one thread, in the CPU queue), waits until it trains, and times the same toggles
again; the page freezes the run while it measures (`core.cpu_queue.paused_for_timing`). The run is
stopped at the end. Goals: median <= 1.0 s idle, <= 1.5 s with the run.

Run: .venv/bin/python -m bench.gates_bench [--toggles 6] [--with-run]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from pathlib import Path

from streamlit.testing.v1 import AppTest

import ui.gates
import ui.jobs
from core.data import DataSpec
from pruning.config import TrainConfig
from pruning.launch import launch
from pruning.live import ManualGates
from pruning.runs import RunStore

ROOT = Path(__file__).resolve().parent.parent
RUN_CONFIG = dict(model="default", method="cofi", steps=100000, eval_every=50, threads=1)


MEASURED: list[float] = []  # perf_counter when each `ui.gates.measure` call returned


def record_measured() -> None:
    """Note when the page's figures are measured (`ui.gates.measure` returns), in `MEASURED`."""
    measure = ui.gates.measure

    def measured(*args, **kwargs):
        result = measure(*args, **kwargs)
        MEASURED.append(time.perf_counter())
        return result

    ui.gates.measure = measured


def time_toggles(at: AppTest, toggles: int, label: str, from_last: bool = False) -> tuple[list[float], list[float]]:
    """Close 6, 12, ... heads (heads 0..i of every layer, or 11-i..11 `from_last`: choices the page has not
    measured and cached before) one change at a time; (seconds until the figures are measured, seconds of the
    whole rerun) per change."""
    figures, reruns = [], []
    for i in range(toggles):
        heads = range(11 - i, 12) if from_last else range(i + 1)
        closed = frozenset((layer, head) for layer in range(6) for head in heads)
        at.session_state["gates"] = ManualGates(closed_heads=closed)
        start = time.perf_counter()
        at.run()
        reruns.append(time.perf_counter() - start)
        figures.append(MEASURED[-1] - start)
        assert not at.exception, at.exception
        shown = {m.label: m.value for m in at.metric}
        print(f"  {len(closed):2d} heads closed: figures {figures[-1]:.2f} s, rerun {reruns[-1]:.2f} s  accuracy "
              f"{shown['Accuracy (100 dev)']}, batch 1 {shown['Latency, batch 1']}, "
              f"batch 32 {shown['Latency, batch 32']}")
    print(f"{label}: toggle -> figures on screen: median {statistics.median(figures):.2f} s, max {max(figures):.2f} s; "
          f"whole rerun median {statistics.median(reruns):.2f} s, max {max(reruns):.2f} s over {len(reruns)} changes "
          f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    return figures, reruns


def start_training() -> tuple[RunStore, int]:
    """A real CoFi run on the default model, launched in the background; returns once it has trained a step."""
    store = RunStore()
    config = TrainConfig.build(**TrainConfig.data_fields(DataSpec("default")), **RUN_CONFIG).check()
    run_id = store.create(config.to_dict())
    launch(store, run_id)
    deadline = time.time() + 600
    while (run := store.get(run_id)).step < 1:
        if not run.active or time.time() > deadline:
            raise SystemExit(f"the training run did not start training: {run.status} {run.error or ''}")
        time.sleep(1)
    print(f"training run {run_id} trains (step {run.step}, pid {run.pid})")
    return store, run_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toggles", type=int, default=6)
    parser.add_argument("--with-run", action="store_true", help="also time the toggles while a training run trains")
    args = parser.parse_args()
    logging.getLogger("streamlit").setLevel(logging.ERROR)
    ui.jobs.start_job = lambda *a, **k: None  # the page's own background jobs would compete for the cores
    record_measured()
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.switch_page("views/gates.py")
    start = time.perf_counter()
    at.run()
    assert not at.exception, at.exception
    print(f"first open (loads the model, measures the dense model): {time.perf_counter() - start:.1f} s")
    idle = time_toggles(at, args.toggles, "idle")
    if not args.with_run:
        return
    store, run_id = start_training()
    at.session_state["gates"] = ManualGates()
    at.run()
    try:
        busy = time_toggles(at, args.toggles, "with a training run", from_last=True)
    finally:
        store.request_stop(run_id)
    print(f"toggle -> figures: median idle {statistics.median(idle[0]):.2f} s (goal <= 1.0), with a run "
          f"{statistics.median(busy[0]):.2f} s (goal <= 1.5); whole rerun idle {statistics.median(idle[1]):.2f} s, "
          f"with a run {statistics.median(busy[1]):.2f} s")


if __name__ == "__main__":
    main()
