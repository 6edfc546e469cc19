"""The `python -m analysis` command line and the Heads report it writes (what the Heads page reads)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from analysis.explain import explain_prediction
from analysis.heads import HeadsReport, build_report
from core.data import load_data, read_table
from core.models import load_model
from tests.test_cli_and_jobs import assert_one_line_error

ROOT = Path(__file__).resolve().parent.parent
RELEVANCE_COLUMNS = ["layer", "head", "relevance", "relevance_signed", "importance"]
ROLE_COLUMNS = ["layer", "head", "confidence", "positional_offset", "positional_frac", "rare_hit_rate", "roles"] + [
    f"{r}_{d}" for r in ("nsubj", "dobj", "amod", "advmod") for d in ("dep2head", "head2dep")]


def run_analysis(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HEADLAB_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "analysis", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=600)


def test_relevance_csv_on_a_file(tiny_dir, reviews_csv, tmp_path):
    out = tmp_path / "rel.csv"
    proc = run_analysis("relevance", "--model", str(tiny_dir), "--data", str(reviews_csv), "--limit", "16",
                        "--out", str(out), home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    table = pd.read_csv(out)
    assert list(table.columns[:5]) == RELEVANCE_COLUMNS and len(table) == 2 * 4
    assert table["relevance"].sum() == pytest.approx(1.0, abs=1e-5)  # mean of per-example shares summing to 1
    assert (table["importance"] >= 0).all()


def test_roles_csv_on_a_file(tiny_dir, reviews_csv, tmp_path):
    out = tmp_path / "roles.csv"
    proc = run_analysis("roles", "--model", str(tiny_dir), "--data", str(reviews_csv), "--limit", "10",
                        "--out", str(out), home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    table = pd.read_csv(out)
    assert set(ROLE_COLUMNS) <= set(table.columns) and len(table) == 8
    assert table["confidence"].between(0, 1).all()
    assert not {"prev_token_score", "duplicate_score", "induction_score"} & set(table.columns)  # decoders only


@pytest.mark.parametrize("case, pattern", [
    ("missing_model", "does not exist"),
    ("empty_data", "no data rows"),
    ("bad_target", "target"),
    ("heads_without_out", "--out"),
])
def test_bad_input_exits_2_with_one_line(case, pattern, tiny_dir, reviews_csv, tmp_path):
    model, data, extra = str(tiny_dir), str(reviews_csv), []
    command = "relevance"
    if case == "missing_model":
        model = str(tmp_path / "nowhere")
    elif case == "empty_data":
        (tmp_path / "empty.csv").write_text("text,label\n")
        data = str(tmp_path / "empty.csv")
    elif case == "bad_target":
        extra = ["--target", "7"]
    else:
        command = "heads"
    proc = run_analysis(command, "--model", model, "--data", data, "--limit", "4", *extra, home=tmp_path)
    assert_one_line_error(proc, pattern)


def test_limit_below_one_is_refused(tiny_dir, tmp_path):
    proc = run_analysis("roles", "--model", str(tiny_dir), "--limit", "0", home=tmp_path)
    assert proc.returncode == 2 and "--limit" in proc.stderr and "Traceback" not in proc.stderr


def test_heads_report_round_trip(tiny_dir, reviews_csv, tmp_path):
    loaded = load_model(str(tiny_dir))
    data = read_table(reviews_csv, label_names=loaded.label_names)
    report = build_report(loaded, data, limit=12, examples_per_head=3)
    assert len(report.table) == 8 and set(report.examples) == {f"{lay}:{h}" for lay in range(2) for h in range(4)}
    assert report.meta["examples"] == 12
    for info in report.examples.values():
        assert len(info["typical"]) <= 3 and all(t["text"] in data.texts for t in info["typical"])
    folder = report.save(tmp_path / "report")
    again = HeadsReport.load(folder)
    pd.testing.assert_frame_equal(again.table, report.table, check_dtype=False)
    assert again.examples == report.examples and again.meta == report.meta
    report.save(folder)  # saving over an existing report replaces it whole
    assert sorted(p.name for p in folder.iterdir()) == ["examples.json", "headlab.json", "heads.csv"]


def test_explanation_sums_to_the_logit_up_to_bias(tiny_dir):
    import torch

    loaded = load_model(str(tiny_dir))
    text = "a quietly moving film"
    why = explain_prediction(loaded, text)
    with torch.inference_mode():
        logits = loaded.model(**loaded.tokenizer(text, return_tensors="pt")).logits[0]
    assert why.predicted == loaded.label_names[int(logits.argmax())] == why.explained
    assert why.logit == pytest.approx(float(logits.max()), abs=1e-5)
    assert why.confidence == pytest.approx(float(torch.softmax(logits, -1).max()), abs=1e-5)
    assert why.tokens[0] == "[CLS]" and why.tokens[-1] == "[SEP]" and len(why.relevance) == len(why.tokens)
    assert why.relevance.sum() + why.bias == pytest.approx(why.logit, rel=1e-4, abs=1e-5) and not why.truncated
    other = explain_prediction(loaded, text, target=1 - int(logits.argmax()))
    assert other.explained != other.predicted and other.logit == pytest.approx(float(logits.min()), abs=1e-5)
    long = explain_prediction(loaded, "word " * 400, target=0)
    assert long.truncated and long.explained == loaded.label_names[0] and len(long.tokens) == loaded.max_length
    with pytest.raises(ValueError, match="empty"):
        explain_prediction(loaded, "   ")


def test_relevance_cli_on_the_real_default(tmp_path):
    from tests.conftest import link_prepared

    (tmp_path / "home").mkdir()
    home = link_prepared(tmp_path / "home")
    out = tmp_path / "rel.csv"
    proc = run_analysis("relevance", "--model", "default", "--data", "default", "--limit", "40", "--out", str(out),
                        home=home)
    assert proc.returncode == 0, proc.stderr
    table = pd.read_csv(out)
    assert len(table) == 72 and list(table.columns[:5]) == RELEVANCE_COLUMNS
    # a few heads carry much more than the uniform 1/72 share (Voita: "the heavy lifting")
    assert table["relevance"].max() > 3 / 72


def test_heads_cli_and_page_on_the_second_real_model(tmp_path, monkeypatch):
    """minilm-l3 (3 x 12 heads): the `heads` CLI writes the report the Heads page then shows."""
    from streamlit.testing.v1 import AppTest

    from analysis.heads import report_dir
    from tests.conftest import link_prepared

    (tmp_path / "home").mkdir()
    home = link_prepared(tmp_path / "home")
    monkeypatch.setenv("HEADLAB_HOME", str(home))
    loaded, data = load_model("minilm-l3"), load_data("default", split="dev")
    folder = report_dir(loaded.fingerprint, data.fingerprint(), 100, None)
    proc = run_analysis("heads", "--model", "minilm-l3", "--limit", "100", "--out", str(folder), home=home)
    assert proc.returncode == 0, proc.stderr
    report = HeadsReport.load(folder)
    assert len(report.table) == 36 and report.meta["examples"] == 100
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.session_state["model_spec"] = "minilm-l3"
    at.session_state["heads_limit"] = 100
    at.switch_page("views/heads.py").run()
    assert not at.exception, at.exception
    assert "Model `minilm-l3`" in at.caption[0].value and len(at.get("plotly_chart")) >= 4
    assert sorted(at.selectbox(key="head_layer").options) == ["0", "1", "2"]


def test_model_without_attention_output_gets_a_clear_error(tiny_dir):
    from analysis.attention import capture_attention

    sdpa = load_model(str(tiny_dir), attn_implementation="sdpa")  # sdpa returns no attention maps
    with pytest.raises(ValueError, match="eager"):
        capture_attention(sdpa, ["a film"])
