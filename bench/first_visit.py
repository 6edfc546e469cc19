"""A newcomer's first visit: the four pages opened in Debian chromium one after another right after the
app starts, with a fresh HEADLAB_HOME (the prepared models linked in, no cached results).

Prints the seconds until each page is usable (its main figures on screen; the Heads page once when it
shows its analysis under way, and again when its results are there), and the dense model's batch-1
latency the Gates page shows (nothing pruned) against an idle measurement of the same model on the same
kind of batch and number of threads in this process after the app is closed (goal: shown / idle <= 1.2).

Run: .venv/bin/python -m bench.first_visit [--timeout 600]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

from core.cli import torch_threads
from core.data import load_data
from core.jobs import stop_background_work
from core.latency import compare, make_batch, threads_leaving_a_core
from core.models import BUILTIN_MODELS, load_model
from core.paths import link_prepared
from ui.gates import SUBSET

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str) -> bool:
    """Whether the Streamlit server at `url` answers its health check."""
    try:
        return urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok"
    except OSError:
        return False


def start_app(home: Path) -> tuple[subprocess.Popen, str]:
    """`streamlit run app.py` on a free port with HEADLAB_HOME `home`; returns once it is healthy."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.address", "127.0.0.1",
                             "--server.port", str(port), "--server.headless", "true",
                             "--browser.gatherUsageStats", "false"],
                            cwd=ROOT, env={**os.environ, "HEADLAB_HOME": str(home)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    while not healthy(url):
        time.sleep(0.3)
    return proc, url


def open_page(page: Page, title: str, ready: str, timeout_s: float) -> float:
    """Click page `title` in the sidebar and return the seconds until text `ready` shows."""
    start = time.perf_counter()
    page.locator('[data-testid="stSidebarNav"]').get_by_text(title).click()
    page.get_by_text(ready).first.wait_for(timeout=timeout_s * 1000)
    return time.perf_counter() - start


def shown_ms(page: Page, label: str) -> float:
    metric = page.locator('[data-testid="stMetric"]').filter(has_text=label)
    return float(metric.locator('[data-testid="stMetricValue"]').inner_text().split()[0])


def idle_batch1_ms() -> float:
    """The default model's batch-1 latency on the Gates page's kind of batch and threads, nothing else running."""
    loaded = load_model("default")
    subset = load_data("default").subset(SUBSET, seed=0)
    batch = make_batch(loaded.tokenizer, subset.texts, 1, loaded.max_length)
    with torch_threads(threads_leaving_a_core()):
        return compare({"dense": loaded.model}, batch, rounds=5, repeats_per_round=5)["dense"].median_s * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for any one page")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = link_prepared(Path(tmp), BUILTIN_MODELS)
        started = time.perf_counter()
        app, url = start_app(home)
        print(f"app healthy after {time.perf_counter() - started:.1f} s (load average {os.getloadavg()[0]:.1f} "
              f"on {os.cpu_count()} cores)")
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1400, "height": 1200})
                start = time.perf_counter()
                page.goto(url)
                page.get_by_text("Dev accuracy").wait_for(timeout=args.timeout * 1000)
                print(f"Model page usable (dev accuracy shown): {time.perf_counter() - start:.1f} s")
                heads = open_page(page, "Heads", "Computing relevance and roles", args.timeout)
                print(f"Heads page shows its analysis under way: {heads:.1f} s")
                gates = open_page(page, "Gates", "Latency, batch 1", args.timeout)
                shown = shown_ms(page, "Latency, batch 1")
                print(f"Gates page usable (figures shown): {gates:.1f} s; dense batch 1 shown {shown:.1f} ms")
                prune = open_page(page, "Prune", "Start run", args.timeout)
                print(f"Prune page usable (run form shown): {prune:.1f} s")
                done = open_page(page, "Heads", "Why this prediction", args.timeout)
                print(f"Heads page results shown {done:.1f} s after returning to it")
                browser.close()
        finally:
            app.terminate()
            app.wait(timeout=30)
            stop_background_work(home)  # the app's jobs run detached from it
    idle = idle_batch1_ms()
    print(f"dense batch 1: shown {shown:.1f} ms, idle {idle:.1f} ms ({threads_leaving_a_core()} thread(s), as the page "
          f"times): ratio {shown / idle:.2f} (goal <= 1.2)")


if __name__ == "__main__":
    main()
