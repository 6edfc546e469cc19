"""The `python -m core` command line, fine-tuning, and the background job store."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core import jobs
from core.data import read_table, split_dataset
from core.finetune import FinetuneConfig, finetune, save_classifier
from core.jobs import BACKGROUND_ENV, START, JobReporter, cancel_job, dead_reason, job_state, start_job, start_process
from core.models import load_model
from tests.conftest import make_tiny

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HEADLAB_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "core", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess, pattern: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and pattern in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_evaluate_json_on_a_file(tiny_dir, reviews_csv, tmp_path):
    out = tmp_path / "summary.json"
    proc = run_cli("evaluate", "--model", str(tiny_dir), "--data", str(reviews_csv), "--whole-file", "--json",
                   "--out", str(out), home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)
    assert row["examples"] == 40 and 0 <= row["accuracy"] <= 1
    assert row["latency_b1_ms"] > 0 and row["latency_b32_ms"] > 0 and row["threads"] >= 1
    record = json.loads(out.read_text())
    assert record["label_counts"] == {"neg": 20, "pos": 20} and len(record["predictions"]) == 12


def test_evaluate_table_output(tiny_dir, reviews_csv, tmp_path):
    proc = run_cli("evaluate", "--model", str(tiny_dir), "--data", str(reviews_csv), "--whole-file", "--limit", "10",
                   home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    table = dict(line.split(maxsplit=1) for line in proc.stdout.splitlines())
    assert table["examples"] == "10" and 0 <= float(table["accuracy"]) <= 1 and float(table["latency_b32_ms"]) > 0


@pytest.mark.parametrize("case", ["missing", "not_model", "bad_csv", "wrong_labels", "one_label", "not_utf8"])
def test_bad_input_exits_2_with_one_line(case, tiny_dir, tmp_path):
    model, data, pattern = str(tiny_dir), tmp_path / "d.csv", ""
    if case == "missing":
        model, pattern = str(tmp_path / "nowhere"), "does not exist"
        data.write_text("text,label\na,pos\nb,neg\n")
    elif case == "not_model":
        model, pattern = str(tmp_path), "no config.json"
        data.write_text("text,label\na,pos\nb,neg\n")
    elif case == "bad_csv":
        data.write_text("x\n1\n2\n")
        pattern = "column"
    elif case == "wrong_labels":
        data.write_text("text,label\na,fresh\nb,rotten\n")
        pattern = "fresh"
    elif case == "one_label":
        data.write_text("text,label\na,pos\nb,pos\n")
        pattern = "two labels"
    else:
        data.write_bytes("text,label\ncaf\u00e9,pos\nb,neg\n".encode("latin-1"))
        pattern = "UTF-8"
    assert_one_line_error(run_cli("evaluate", "--model", model, "--data", str(data), home=tmp_path), pattern)


def test_huge_single_line_is_truncated_with_a_warning(tiny_dir, tmp_path):
    data = tmp_path / "big.csv"
    data.write_text("text,label\n" + "word " * 200_000 + ",pos\nshort,neg\n")
    proc = run_cli("evaluate", "--model", str(tiny_dir), "--data", str(data), "--whole-file", "--json", home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "truncated" in proc.stderr
    assert json.loads(proc.stdout)["truncated"] == 1


def test_finetune_learns_and_saves_label_names(tmp_path):
    """A head-less encoder fine-tuned on an easy task must learn it; the folder keeps the label names."""
    rows = ["text,label"] + [f"{w} {i},{lab}" for i in range(150) for w, lab in (("great", "good"), ("awful", "bad"))]
    (tmp_path / "easy.csv").write_text("\n".join(rows) + "\n")
    splits = split_dataset(read_table(tmp_path / "easy.csv"))
    loaded = load_model(str(make_tiny(tmp_path / "enc", labels=None)), label_names=splits.train.label_names)
    result = finetune(loaded.model, loaded.tokenizer, splits, FinetuneConfig(epochs=6, lr=1e-3, batch_size=16))
    assert result.dev_accuracy >= 0.95 and result.steps == 6 * -(-len(splits.train) // 16)
    save_classifier(loaded.model, loaded.tokenizer, tmp_path / "out", result)
    again = load_model(str(tmp_path / "out"))
    assert again.has_classifier and again.label_names == ["bad", "good"]
    assert json.loads((tmp_path / "out" / "headlab_finetune.json").read_text())["dev_accuracy"] >= 0.95


def test_finetune_cli_refuses_existing_out(tiny_dir, reviews_csv, tmp_path):
    proc = run_cli("finetune", "--model", str(tiny_dir), "--data", str(reviews_csv), "--out", str(tiny_dir),
                   home=tmp_path)
    assert_one_line_error(proc, "already exists")


def test_job_store_reports_progress_and_detects_a_killed_job(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADLAB_HOME", str(tmp_path))
    reporter = JobReporter("unit")
    reporter(5, 10, "halfway")
    state = job_state("unit")
    assert (state.status, state.done, state.total, state.message) == ("running", 5, 10, "halfway")
    reporter.finish()
    assert job_state("unit").status == "done"

    code = ("from core.jobs import JobReporter; import time; "
            "r = JobReporter('victim'); r(1, 4, 'working'); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "HEADLAB_HOME": str(tmp_path)})
    deadline = time.time() + 30
    while (job_state("victim") is None or job_state("victim").done != 1) and time.time() < deadline:
        time.sleep(0.2)
    assert job_state("victim").status == "running"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    state = job_state("victim")
    assert state.status == "interrupted" and state.done == 1 and "ended" in state.error


def test_cancel_job_stops_the_process_and_forgets_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADLAB_HOME", str(tmp_path))
    proc = start_job("sleeper", ["http.server", "0", "--bind", "127.0.0.1"])
    assert job_state("sleeper").status == "running"
    assert cancel_job("sleeper")
    assert proc.wait(timeout=20) != 0 and job_state("sleeper") is None
    assert not cancel_job("sleeper")  # nothing left to stop


def test_dead_reason_is_the_one_rule_for_a_process_and_its_heartbeat(monkeypatch):
    now = time.time()
    assert dead_reason(os.getpid(), now - 1, now) is None
    assert "(pid 0) ended without finishing" in dead_reason(0, now, now)  # no process at all
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    assert "ended without finishing" in dead_reason(ended.pid, now, now)
    assert dead_reason(os.getpid(), now - jobs.STALE_S - 5, now) == (
        f"the job's process (pid {os.getpid()}) has not reported for {jobs.STALE_S + 5:.0f} s")
    monkeypatch.setattr(jobs, "STALE_S", 0.5)  # read at each call: one constant to change
    assert jobs.is_stale(now - 1, now) and dead_reason(os.getpid(), now - 1, now) is not None


def test_start_process_detaches_logs_and_marks_the_child(tmp_path):
    log = tmp_path / "deep" / "x.log"
    code = f"import os, sys; print(os.environ.get('{BACKGROUND_ENV}'), os.getcwd(), os.getsid(0) == os.getpid())"
    for _ in range(2):  # every start appends its own part, after a START line naming the command
        assert start_process([sys.executable, "-c", code], log).wait(timeout=30) == 0
    parts = log.read_text().split(START)[1:]
    assert len(parts) == 2
    for part in parts:
        header, output = part.strip().split("\n")
        assert header.endswith("python -c " + shlex.quote(code)) and output == f"1 {ROOT} True"
