"""A real browser (Debian chromium via Playwright) opens the running app and sees the Model page work."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

from tests.conftest import link_prepared, stop_background_work

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.browser


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Iterator[Path]:
    """The app's fresh HEADLAB_HOME (prepared models linked in); its background work ends with the module."""
    home = link_prepared(tmp_path_factory.mktemp("home"))
    yield home
    stop_background_work(home)


@contextlib.contextmanager
def running_app(home: Path) -> Iterator[str]:
    """`streamlit run app.py` on a free port with HEADLAB_HOME `home`; yields its URL once healthy."""
    port = free_port()
    env = {**os.environ, "HEADLAB_HOME": str(home)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.address", "127.0.0.1",
         "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("streamlit did not become healthy within 60 s")
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.fixture(scope="module")
def app_url(home):
    """The app on a fresh HEADLAB_HOME, for the module."""
    with running_app(home) as url:
        yield url


@pytest.fixture(scope="module")
def page():
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian chromium is not installed (make test installs it with apt)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        yield page
        browser.close()


def test_model_page_renders_accuracy_in_a_real_browser(app_url, page):
    page.goto(app_url)
    page.get_by_text("Dev accuracy").wait_for(timeout=240_000)
    metric = page.locator('[data-testid="stMetric"]').filter(has_text="Dev accuracy")
    value = metric.locator('[data-testid="stMetricValue"]').inner_text()
    assert 78 <= float(value.rstrip("%")) <= 90
    assert page.get_by_text("Latency, batch 32").is_visible()
    page.locator('[data-testid="stDataFrame"]').wait_for()
    page.wait_for_timeout(1500)  # the data grid paints its canvas after it attaches
    assert not page.locator('[data-testid="stException"]').count()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "model_page.png"), full_page=True)


def test_heads_page_computes_and_shows_heads_in_a_real_browser(app_url, page):
    page.goto(app_url)
    page.locator('[data-testid="stSidebarNav"]').get_by_text("Heads").click()
    page.get_by_text("Computing relevance and roles").or_(page.get_by_text("Why this prediction")).first.wait_for(
        timeout=60_000)
    page.get_by_text("Why this prediction").wait_for(timeout=300_000)
    page.locator(".js-plotly-plot").nth(3).wait_for()
    assert page.locator(".js-plotly-plot").count() >= 4  # heatmap, role map, scatter, attention view
    page.get_by_text("Green supports it").wait_for(timeout=60_000)  # the explanation of the first dev sentence
    assert not page.locator('[data-testid="stException"]').count()
    page.set_viewport_size({"width": 1400, "height": 3600})  # Streamlit scrolls inside its own container
    page.wait_for_timeout(2000)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "heads_page.png"))


def test_gates_page_toggles_a_head_and_figures_change_in_a_real_browser(app_url, page):
    page.set_viewport_size({"width": 1400, "height": 1800})
    page.goto(app_url)
    page.locator('[data-testid="stSidebarNav"]').get_by_text("Gates").click()
    page.get_by_text("kept 72/72 heads").wait_for(timeout=300_000)

    def shown(label: str) -> str:
        metric = page.locator('[data-testid="stMetric"]').filter(has_text=label)
        return metric.locator('[data-testid="stMetricValue"]').inner_text()

    def delta(label: str) -> str:
        metric = page.locator('[data-testid="stMetric"]').filter(has_text=label)
        return metric.locator('[data-testid="stMetricDelta"]').inner_text()

    before = {label: shown(label) for label in ("Parameters", "Latency, batch 1", "Latency, batch 32")}
    grid = page.locator(".js-plotly-plot").first
    grid.locator(".scatterlayer .trace").first.locator(".point").nth(1).click(force=True)  # layer 0, head 1
    page.get_by_text("kept 71/72 heads").wait_for(timeout=120_000)
    after = {label: shown(label) for label in before}
    # one BERT head owns d_head rows of W_q, W_k, W_v (with their biases) and d_head columns of W_o
    from core.models import load_model

    dense = load_model("default")
    d, d_head = dense.model.config.hidden_size, dense.model.config.hidden_size // dense.model.config.num_attention_heads
    removed, total = 4 * d * d_head + 3 * d_head, sum(p.numel() for p in dense.model.parameters())
    assert before["Parameters"] == f"{total / 1e6:.2f} M" and after["Parameters"] == f"{(total - removed) / 1e6:.2f} M"
    assert delta("Parameters").startswith(f"-{removed:,} ")  # 49,248 on the default (d 384, d_head 32)
    latencies = ("Latency, batch 1", "Latency, batch 32")
    assert [after[k] for k in latencies] != [before[k] for k in latencies]  # timed again for the new model
    page.get_by_text("This session's changes").wait_for(timeout=60_000)  # the history chart, drawn after
    assert not page.locator('[data-testid="stException"]').count()
    page.wait_for_timeout(1500)
    page.screenshot(path=str(ARTIFACTS / "gates_page.png"))


def test_prune_page_curves_grow_while_a_run_trains_in_a_real_browser(app_url, home, page, tmp_path):
    """The Prune page is open on an empty run store; a CoFi run started from the CLI appears by itself, and
    once picked its curves gain points by themselves (the fragment redraws every second); then the page's
    Stop button stops the run."""
    from pruning.runs import RunStore
    from tests.conftest import make_tiny

    model = make_tiny(tmp_path / "tiny")
    data = tmp_path / "easy.csv"
    data.write_text("text,label\n" + "".join(f"a great film {i},pos\nan awful film {i},neg\n" for i in range(200)))
    page.set_viewport_size({"width": 1400, "height": 2200})
    page.goto(app_url)
    page.locator('[data-testid="stSidebarNav"]').get_by_text("Prune").click()
    page.get_by_text("No runs yet").wait_for(timeout=120_000)
    train = subprocess.Popen(
        [sys.executable, "-m", "pruning", "train", "--model", str(model), "--data", str(data), "--method", "cofi",
         "--steps", "20000", "--prefinetune-steps", "5", "--warmup-steps", "2000", "--finetune-steps", "0",
         "--batch-size", "8", "--eval-every", "40", "--eval-budget", "1", "--eval-examples", "16"],
        cwd=ROOT, env={**os.environ, "HEADLAB_HOME": str(home)}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        page.locator('[data-testid="stDataFrame"]').wait_for(timeout=120_000)  # the page polls the store
        page.locator('[data-testid="stSelectbox"]').filter(has_text="Run").click()
        page.get_by_role("option").first.click()
        page.get_by_text("Last eval").wait_for(timeout=120_000)
        # points of the first curve as plotly drew them (its `data` holds base64 arrays; `_fullData` decoded ones)
        points = ("() => { const e = document.querySelector('.js-plotly-plot'); "
                  "return e?._fullData?.[0]?.x?.length ?? 0 }")
        page.wait_for_function(f"({points})() > 0", timeout=60_000)
        first = page.evaluate(points)
        page.wait_for_function(f"({points})() >= {first + 2}", timeout=120_000)  # no reload, no click
        page.screenshot(path=str(ARTIFACTS / "prune_page.png"))
        page.locator('[data-testid="stButton"]').get_by_role("button", name="Stop", exact=True).click()
        assert train.wait(timeout=60) == 0
        store = RunStore(home / "runs.sqlite")
        run = store.list()[0]
        assert run.status == "stopped" and 0 < run.step < run.total
        assert not page.locator('[data-testid="stException"]').count()
    finally:
        if train.poll() is None:
            train.kill()


def test_smollm2_goes_through_all_four_pages_in_a_real_browser(app_url, page):
    """Last in this file (it leaves the session on the decoder): the Model page shows SmolLM2's query and KV
    heads, the Heads page starts its analysis, the Gates page closes a query head and its figures change,
    the Prune page offers a run on it."""
    page.set_viewport_size({"width": 1400, "height": 1800})
    page.goto(app_url)
    page.get_by_text("SmolLM2-135M-Instruct (decoder").click(timeout=120_000)
    page.get_by_text("KV heads", exact=True).wait_for(timeout=120_000)
    page.get_by_text("Zero-shot classification").wait_for(timeout=120_000)
    assert not page.locator('[data-testid="stException"]').count()
    page.screenshot(path=str(ARTIFACTS / "model_page_smollm2.png"), full_page=True)

    page.locator('[data-testid="stSidebarNav"]').get_by_text("Heads").click()
    page.get_by_text("Computing relevance and roles").wait_for(timeout=120_000)  # its job runs in the background
    assert not page.locator('[data-testid="stException"]').count()

    page.locator('[data-testid="stSidebarNav"]').get_by_text("Gates").click()
    page.get_by_text("kept 270/270 heads").wait_for(timeout=600_000)
    assert page.get_by_text("Latency, batch 8").is_visible()  # a decoder's larger batch
    grid = page.locator(".js-plotly-plot").first
    grid.locator(".scatterlayer .trace").first.locator(".point").nth(1).click(force=True)  # layer 0, query head 1
    page.get_by_text("kept 269/270 heads (90/90 KV heads)").wait_for(timeout=600_000)
    assert not page.locator('[data-testid="stException"]').count()
    page.screenshot(path=str(ARTIFACTS / "gates_page_smollm2.png"))

    page.locator('[data-testid="stSidebarNav"]').get_by_text("Prune").click()
    new_run = page.locator("summary", has_text="New run")  # collapsed when the store holds a run already
    new_run.wait_for(timeout=120_000)
    if not page.locator("details[open] > summary", has_text="New run").count():
        new_run.click()
    page.get_by_role("button", name="Start run").wait_for(timeout=120_000)
    assert page.locator("code", has_text="smollm2").first.is_visible()  # the caption names the chosen model
    assert not page.locator('[data-testid="stException"]').count()
