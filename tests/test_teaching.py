"""Teaching: the guided tour's steps, presenter mode, shared links (query parameters) and the HTML report."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import pytest
from streamlit.testing.v1 import AppTest

from tests.conftest import link_prepared, stop_background_work

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Iterator[Path]:
    """A HEADLAB_HOME with the prepared models; its background work ends with the module."""
    home = link_prepared(tmp_path_factory.mktemp("home"))
    yield home
    stop_background_work(home)


@pytest.fixture
def with_report(app_home) -> Path:
    """The default's Heads report on 20 dev sentences (the tour takes any subset size; 20 keeps this quick)."""
    from analysis.heads import build_report, report_dir
    from core.data import load_data
    from core.models import load_model

    loaded, data = load_model("default"), load_data("default", split="dev")
    build_report(loaded, data, limit=20).save(report_dir(loaded.fingerprint, data.fingerprint(), 20, None))
    return app_home


@pytest.fixture
def app_home(home, monkeypatch) -> Path:
    monkeypatch.setenv("HEADLAB_HOME", str(home))
    return home


def at_page(page: str, **state) -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=180)
    for key, value in state.items():
        at.session_state[key] = value
    at.switch_page(page).run()
    assert not at.exception, at.exception
    return at


def specs(at: AppTest) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def test_every_tour_step_renders_a_live_chart_on_the_default_model(with_report):
    from ui.tour import STEPS

    assert 6 <= len(STEPS) <= 8
    for index, step in enumerate(STEPS):
        at = at_page("views/tour.py", tour_step=index)
        assert at.header[0].value == step.title
        assert any(f"Step {index + 1} of {len(STEPS)}" in p.proto.text for p in at.get("progress"))
        drawn = specs(at)
        if index in (0, 2):  # the tokens (plain, then shaded by relevance) are HTML
            assert len(at.get("html")) >= 1
        else:
            assert drawn, step.title
        assert at.button(key="tour_next").disabled == (index == len(STEPS) - 1)
        if index == 5:  # switches: measure the model without the 6 least relevant heads
            at.button(key="tour_measure").click().run()
            assert not at.exception, at.exception
        if index in (5, 6):
            shown = {m.label: m.value for m in at.metric}
            closed = len(at.session_state["tour_closed"]) if index == 5 else 36
            params = float(shown["Parameters"].split()[0])
            assert params < 22.71 and abs(params - (22.71 - closed * 49_248 / 1e6)) < 0.011  # 4 d d_h + 3 d_h each
            assert 0.6 <= float(shown["Accuracy (100 dev)"].rstrip("%")) / 100 <= 1
    # a try-it button takes the student to the page with the state set
    at = at_page("views/tour.py", tour_step=6)
    at.button(key="tour_half_gates").click().run()
    assert not at.exception, at.exception
    assert "kept 36/72 heads" in at.caption[0].value and len(at.session_state["gates"].closed_heads) == 36


def test_the_tour_works_on_smollm2(app_home):
    """Every step on the built-in decoder (its Heads report on 10 dev sentences: the tour takes any size)."""
    from analysis.heads import build_report, report_dir
    from core.data import load_data
    from core.models import load_model
    from ui.tour import STEPS

    loaded = load_model("smollm2")
    data = load_data("default", split="dev", label_names=loaded.label_names)
    build_report(loaded, data, limit=10).save(report_dir(loaded.fingerprint, data.fingerprint(), 10, None))
    for index, step in enumerate(STEPS):
        at = at_page("views/tour.py", tour_step=index, model_spec="smollm2")
        assert at.header[0].value == step.title
        assert specs(at) or at.get("html"), step.title
        if index == 5:
            at.button(key="tour_measure").click().run()
            assert not at.exception, at.exception
            assert any(m.label.startswith("Accuracy") for m in at.metric)


def test_presenter_mode_enlarges_charts_and_hides_advanced_controls(app_home, tmp_path):
    data = tmp_path / "mine.csv"
    data.write_text("text,label\n" + "".join(f"a splendid film {i},fresh\nawful mess {i},rotten\n" for i in range(10)))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=180)
    at.run()  # the Model page (AppTest keeps the sidebar of a first run that switches pages empty)
    at.radio(key="data_choice").set_value("File path").run()
    at.text_input(key="data_path").input(str(data)).run()
    assert "Columns (auto-detected when empty)" in [e.label for e in at.expander]
    at.session_state["presenter"] = True  # the sidebar toggle's key
    at.run()
    assert not at.exception, at.exception
    assert "Columns (auto-detected when empty)" not in [e.label for e in at.expander]  # advanced: hidden

    normal = at_page("views/tour.py", tour_step=1)
    presented = at_page("views/tour.py", tour_step=1, presenter=True)
    plain, big = specs(normal)[0]["layout"], specs(presented)[0]["layout"]
    assert plain.get("font", {}).get("size") is None and big["font"]["size"] == 20
    assert big["height"] == int(plain["height"] * 1.35)
    assert {a["font"]["size"] for a in specs(presented)[0]["layout"]["annotations"]} == {16}  # token labels


def test_heads_round_trip_through_the_compact_code():
    from ui.share import decode_heads, encode_heads

    closed = frozenset({(0, 1), (0, 2), (3, 0), (29, 8)})
    assert encode_heads(closed) == "0:6-3:1-29:100"
    assert decode_heads(encode_heads(closed)) == closed and decode_heads("") == frozenset()
    with pytest.raises(ValueError):
        decode_heads("0:zz")


def test_a_shared_link_restores_model_page_head_and_gate_state(app_home):
    from core.models import load_model
    from pruning.live import ManualGates

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=180)
    link = {"model": "minilm-l3", "head": "1.2", "closed": "0:6-2:1", "ffn_keep": "0.5", "sentence": "a dull film"}
    at.query_params.update(link)
    at.run()  # the link opens the Model page (AppTest drops the session state of a first run that switches pages)
    assert at.radio(key="model_choice").value.startswith("MiniLM-L3")  # the Model page shows the link's model
    at.switch_page("views/gates.py").run()
    assert not at.exception, at.exception
    expected = ManualGates(closed_heads=frozenset({(0, 1), (0, 2), (2, 0)}), ffn_keep=0.5)
    assert at.session_state["gates"] == expected and at.session_state["model_spec"] == "minilm-l3"
    assert "kept 33/36 heads, 2304/4608 FFN units" in at.caption[0].value  # the same pruned model
    assert (at.session_state["head_layer"], at.session_state["head_index"]) == (1, 2)
    assert at.session_state["why_text"] == "a dull film"
    assert {k: at.query_params[k] for k in link} == link  # the URL still carries the view
    assert expected.state(load_model("minilm-l3")).closed_heads() == [(0, 1), (0, 2), (2, 0)]


def test_a_shared_link_names_a_runs_gates_by_run_and_step(app_home):
    from core.models import load_model
    from pruning.gate_state import GateState
    from pruning.live import ManualGates
    from pruning.runs import RunStore
    from ui.share import decode_gates, encode_gates

    store = RunStore()
    run = store.create({"model": "minilm-l3", "method": "cofi"}, app_home / "run-share")
    l3 = load_model("minilm-l3")
    state = GateState.from_closed_heads(l3, [(1, 1)]).with_ffn_keep(l3.adapter, 0.5)
    store.add_gates(run, 10, state, attempt=0)
    gates = ManualGates.from_state(state)
    gates = ManualGates(**{**gates.__dict__, "closed_heads": gates.closed_heads | {(2, 3)}})
    params = encode_gates(gates, (run, 10))
    assert params == {"closed": "1:2-2:8", "gates_run": f"{run}@10"}
    restored = decode_gates(params, store.gates)
    assert restored.state(l3) == gates.state(l3)


def test_the_report_is_one_self_contained_html_file_with_the_figures_data(app_home):
    from ui.report import View, report_html

    fig = go.Figure(go.Scatter(x=[1, 2, 3], y=[0.125, 0.5, 0.875], name="acc"), layout_title_text="A curve")
    html = report_html("HeadLab: Gates", View({"curve": fig}, {"numbers": pd.DataFrame({"a": [0.3125]})}),
                       "http://x/gates?closed=0%3A2")
    assert html.startswith("<!DOCTYPE html>") and html.endswith("</html>")
    assert not re.search(r"<script[^>]+src=", html)  # nothing fetched: plotly.js is inline
    assert html.count("plotly.js v") >= 1 and len(html) > 1_000_000
    data = json.loads(re.search(r'Plotly\.newPlot\(\s*"fig-0",\s*(\[.*?\]),\s*\{', html, re.S).group(1))
    assert data[0]["y"] == [0.125, 0.5, 0.875] and "0.3125" in html and "closed=0%3A2" in html

    at = at_page("views/gates.py", gates_from_run=__import__("pruning.live", fromlist=["ManualGates"]).ManualGates(
        closed_heads=frozenset({(0, 1)})))
    view = at.session_state["report_view"]
    assert list(view.figures) == ["gate_grid_0"] and "Live figures: dense vs pruned" in view.tables
    page = report_html("HeadLab: Gates", view)
    assert "Heads: click to close" in page and view.tables["Live figures: dense vs pruned"].shape[0] == 2
