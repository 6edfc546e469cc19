"""Gates page responsiveness: time from a toggle to updated subset accuracy and latency.

Drives the Gates page with Streamlit's AppTest on the default model: opens it (dense figures are
measured once and cached, as in the app), then closes heads one at a time through the page's own
code path (`ui.gates.toggle_head`) and times each rerun: physical pruning of a copy, accuracy on the
100-sentence subset, batch 1 and 32 latency interleaved with the dense model, and rendering.
Background refinement jobs are disabled for the timing (they would compete for the 2 cores).

Run: .venv/bin/python -m bench.gates_bench [--toggles 6]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toggles", type=int, default=6)
    args = parser.parse_args()
    from streamlit.testing.v1 import AppTest

    import ui.jobs

    logging.getLogger("streamlit").setLevel(logging.ERROR)
    ui.jobs.start_job = lambda *a, **k: None  # no background jobs while timing
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.switch_page("pages/gates.py")
    start = time.perf_counter()
    at.run()
    assert not at.exception, at.exception
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"first open (loads the model, measures the dense model): {time.perf_counter() - start:.1f} s")
    times = []
    for i in range(args.toggles):
        from pruning.live import ManualGates

        closed = frozenset((layer, head) for layer in range(6) for head in range(i + 1))
        at.session_state["gates"] = ManualGates(closed_heads=closed)
        start = time.perf_counter()
        at.run()
        times.append(time.perf_counter() - start)
        assert not at.exception, at.exception
        shown = {m.label: m.value for m in at.metric}
        print(f"  {len(closed):2d} heads closed: {times[-1]:.2f} s  accuracy {shown['Accuracy (100 dev)']}, "
              f"batch 1 {shown['Latency, batch 1']}, batch 32 {shown['Latency, batch 32']}")
    print(f"toggle -> figures on screen: median {statistics.median(times):.2f} s, max {max(times):.2f} s "
          f"over {len(times)} changes; goal <= 2 s")


if __name__ == "__main__":
    main()
