"""pruning.runs: the SQLite run store (status, queue, stop, dead-process detection, delete, process count,
old stores); pruning.checkpoints; and the background-work layer (core.jobs) shared by app jobs and training
runs: one launcher, one liveness check, one stale rule."""

from __future__ import annotations

import contextlib
import math
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from core import jobs
from core.folders import MARKER
from core.jobs import STALE_S, JobReporter, job_log, job_state, pid_alive, start_job
from pruning import checkpoints, launch, runs
from pruning.checkpoints import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from pruning.gates import GateShape, GateState
from pruning.record import StepRecord
from pruning.runs import RunStore

torch.set_num_threads(1)
SHAPE = GateShape(layers=2, heads=4, head_dim=8, intermediate=64, hidden=32)


@pytest.fixture
def store(tmp_path) -> RunStore:
    return RunStore(tmp_path / "runs.sqlite")


def dead_pid() -> int:
    """The pid of a process that has ended (and was reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_create_get_list_round_trip(store, tmp_path):
    a = store.create({"method": "cofi", "target_sparsity": 0.6})
    b = store.create({"method": "l0"}, tmp_path / "mine")
    run = store.get(a)
    assert (run.status, run.config, run.step, run.attempt, run.stop_requested) == (
        "queued", {"method": "cofi", "target_sparsity": 0.6}, 0, 1, False)
    assert run.run_dir.is_dir() and (run.run_dir / MARKER).is_file()
    assert store.get(b).run_dir == (tmp_path / "mine").resolve()
    assert [r.id for r in store.list()] == [b, a]
    with pytest.raises(ValueError, match="no run 99"):
        store.get(99)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        store.create({}, tmp_path / "full")


def test_metrics_and_gate_snapshots_round_trip(store):
    run_id = store.create({})
    store.add_metrics(run_id, 0, {"accuracy": 0.8, "heads_alive": [4, 3], "lambda_1": None}, attempt=1)
    store.add_metrics(run_id, 10, {"accuracy": 0.7, "speedup_b32": math.nan}, attempt=1)
    rows = store.metrics(run_id)
    assert [r["step"] for r in rows] == [0, 10]
    assert rows[0]["heads_alive"] == [4, 3] and rows[1]["speedup_b32"] is None  # NaN is not JSON: stored as null
    state = GateState.from_closed_heads(SHAPE, [(0, 1)]).replace(ffn=torch.tensor([0.25, 1.0]))
    store.add_gates(run_id, 0, GateState.dense(SHAPE), attempt=1)
    store.add_gates(run_id, 10, state, attempt=1)
    assert store.gate_steps(run_id) == [0, 10]
    assert store.gates(run_id) == state and store.gates(run_id, 0).is_dense()
    with pytest.raises(ValueError, match="no gate snapshot at step 5"):
        store.gates(run_id, 5)
    # a resume from step 0: later rows are kept but superseded; the new attempt's rows replace them
    store.supersede_after(run_id, 0)
    store.add_metrics(run_id, 12, {"accuracy": 0.9}, attempt=2)
    assert [(r["step"], r["attempt"]) for r in store.metrics(run_id)] == [(0, 1), (12, 2)]
    every = store.metrics(run_id, superseded=True)
    assert [(r["step"], r["superseded"]) for r in every] == [(0, False), (10, True), (12, False)]
    assert store.gate_steps(run_id) == [0]


def record(step: int, **changes) -> StepRecord:
    """A StepRecord of the tiny shape with plausible figures."""
    values = dict(step=step, phase="gates", final=False, method="cofi", examples=8, accuracy=0.75, dense_accuracy=0.8,
                  latency_b1_ms=1.0, latency_b32_ms=8.0, dense_latency_b1_ms=2.0, dense_latency_b32_ms=20.0,
                  speedup_b1=2.0, speedup_b32=2.5, flop_speedup=2.2, parameters=900, dense_parameters=1000,
                  sparsity=0.4, expected_sparsity=0.42, target=0.4, lr=1e-4, loss=0.6,
                  losses={"distill_ce": 0.5, "lagrangian": 0.1}, method_figures={"lambda_1": -0.2, "lambda_2": 0.3},
                  heads_alive=[4, 2], units_alive=[64, 32], hidden_alive=32, heads_total=4, units_total=64,
                  hidden_total=32, note="kept 6/8 heads.", device="cpu", threads=1, processes=1,
                  replica_checksums=None, clock={"train_s": 3.0, "eval_s": 1.0})
    return StepRecord(**{**values, **changes})


def test_records_and_the_final_result_read_by_attribute(store):
    run_id = store.create({"method": "cofi"})
    assert store.get(run_id).final is None and store.records(run_id) == []
    for r in (record(0), record(10, loss=0.4)):
        store.add_metrics(run_id, r.step, r.to_dict(), attempt=1)
    assert store.records(run_id) == [record(0), record(10, loss=0.4)]
    final = record(12, final=True, phase="finetune", export="/somewhere/model")
    store.finish(run_id, "done", result=final.to_dict())
    assert store.get(run_id).final == final and store.get(run_id).final.export == "/somewhere/model"
    assert record(0).row()["loss_distill_ce"] == 0.5 and record(0).row()["lambda_2"] == 0.3


def test_a_record_of_a_store_older_than_step_records_reads_too(store):
    """Before StepRecord the store kept flat rows: loss_<term>, lambda_1/2 and the clock beside the figures."""
    flat = {k: v for k, v in record(10).to_dict().items() if k not in ("losses", "method_figures", "clock", "step")}
    flat.update(loss_distill_ce=0.5, loss_lagrangian=0.1, loss_task=None, lambda_1=-0.2, lambda_2=0.3, train_s=3.0,
                eval_s=1.0, an_unknown_key=1)
    run_id = store.create({"method": "cofi"})
    store.add_metrics(run_id, 10, flat, attempt=1)
    assert store.records(run_id) == [record(10)]
    store.finish(run_id, "done", result=flat)  # the final result had no step either
    assert store.get(run_id).final == record(None)


def test_queue_lets_one_run_train_at_a_time(store):
    first, second = store.create({}), store.create({})
    store.enqueue(first)
    store.enqueue(second)
    assert not store.claim(second)  # the older queued run goes first
    assert store.claim(first)
    assert store.get(first).status == "running"
    assert not store.claim(second)  # first is running
    assert store.claim(second, exclusive=False)
    store.finish(first, "done", result={"accuracy": 0.5})
    assert store.get(first).result == {"accuracy": 0.5}
    with pytest.raises(ValueError, match="already done"):
        store.enqueue(first)
    with pytest.raises(ValueError, match="already running"):
        store.enqueue(second, pid=1)  # another process cannot take a running run


def test_dead_process_and_stale_heartbeat_read_as_interrupted(store, monkeypatch):
    run_id = store.create({})
    store.enqueue(run_id, pid=dead_pid())
    run = store.get(run_id)
    assert run.status == "interrupted" and "ended without finishing" in run.error
    # a dead waiting run does not block the queue
    other = store.create({})
    store.enqueue(other)
    assert store.claim(other)
    # resuming starts a new attempt
    again = store.enqueue(run_id)
    assert (again.status, again.attempt, again.error) == ("queued", 2, None)
    monkeypatch.setattr(jobs, "STALE_S", -1.0)  # every heartbeat is now too old (one constant for jobs and runs)
    assert store.get(other).status == "interrupted" and "not reported" in store.get(other).error


def test_stop_request_while_queued_and_running(store):
    waiting = store.create({})
    store.enqueue(waiting)
    store.request_stop(waiting)
    assert store.stop_requested(waiting)
    assert store.wait_turn(waiting, poll_s=0.01) is False
    assert store.get(waiting).status == "stopped"
    with pytest.raises(ValueError, match="only a queued or running run"):
        store.request_stop(waiting)
    again = store.enqueue(waiting)  # a stopped run can be resumed; the stop flag is cleared
    assert not again.stop_requested and store.wait_turn(waiting, poll_s=0.01)


def test_delete_removes_rows_and_only_its_own_folder(store, tmp_path):
    run_id = store.create({})
    folder = store.get(run_id).run_dir
    store.add_metrics(run_id, 0, {"a": 1}, attempt=1)
    store.enqueue(run_id)
    with pytest.raises(ValueError, match="stop it before deleting"):
        store.delete(run_id)
    store.finish(run_id, "stopped")
    store.delete(run_id)
    assert not folder.exists() and store.list() == [] and store.metrics(run_id) == []
    # a folder whose marker names another run survives
    other = store.create({}, tmp_path / "keep")
    (tmp_path / "keep" / MARKER).write_text('{"run_id": 12345}')
    store.finish(other, "failed", error="x")
    store.delete(other)
    assert (tmp_path / "keep").is_dir()


def test_checkpoint_round_trip_with_rng(tmp_path):
    torch.manual_seed(3)
    payload = {"step": 7, "model": {"w": torch.arange(6.0).reshape(2, 3)}, "fixed_state": None,
               "optimizers": {"model": torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))]).state_dict()},
               "rng": rng_state(), "losses": {"loss": [0.5, 0.25]}}
    expected = torch.rand(3)
    save_checkpoint(tmp_path, payload)
    back = load_checkpoint(tmp_path)
    assert back["step"] == 7 and torch.equal(back["model"]["w"], payload["model"]["w"])
    assert back["losses"] == {"loss": [0.5, 0.25]} and back["fixed_state"] is None
    set_rng_state(back["rng"])
    assert torch.equal(torch.rand(3), expected)  # the same draws after restoring the RNG
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_missing_corrupt_and_foreign_checkpoints_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="No checkpoint in"):
        load_checkpoint(tmp_path)
    save_checkpoint(tmp_path, {"step": 1, "model": {"w": torch.ones(1000)}})
    path = tmp_path / checkpoints.CHECKPOINT
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ValueError, match="corrupt or unreadable"):
        load_checkpoint(tmp_path)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="corrupt or unreadable"):
        load_checkpoint(tmp_path)
    torch.save({"step": 1, "bad": GateShape(1, 1, 1, 1, 1)}, path)  # a pickled object: refused by weights_only
    with pytest.raises(ValueError, match="corrupt or unreadable"):
        load_checkpoint(tmp_path)
    torch.save({"weights": torch.ones(2)}, path)
    with pytest.raises(ValueError, match="not a HeadLab training checkpoint"):
        load_checkpoint(tmp_path)


# ----------------------------------------------------------------------------- process count, old stores


def test_the_process_count_is_stored_with_the_run(store):
    run_id = store.create({})
    run = store.get(run_id)
    assert (run.processes, run.store) == (1, store.db)
    store.enqueue(run_id, pid=os.getpid(), processes=4)  # e.g. rank 0 under torchrun with 4 workers
    assert store.get(run_id).processes == 4 and store.list()[0].processes == 4
    store.finish(run_id, "stopped")
    store.enqueue(run_id, processes=2)  # resumed in another number of processes
    assert RunStore(store.db).get(run_id).processes == 2  # read back by a fresh store object


OLD_RUNS = """CREATE TABLE runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, config TEXT NOT NULL, status TEXT NOT NULL, pid INTEGER,
    heartbeat REAL, error TEXT, created REAL NOT NULL, run_dir TEXT NOT NULL, step INTEGER DEFAULT 0,
    total INTEGER DEFAULT 0, message TEXT DEFAULT '', stop INTEGER DEFAULT 0, attempt INTEGER DEFAULT 1,
    result TEXT)"""  # the runs table before it had the processes column


def test_a_store_of_the_old_schema_opens_and_gains_the_column(tmp_path):
    db = tmp_path / "runs.sqlite"
    with contextlib.closing(sqlite3.connect(db)) as con:
        con.execute(OLD_RUNS)
        con.execute("INSERT INTO runs (config, status, created, run_dir, step, total, result) "
                    "VALUES (?, 'done', 1.0, ?, 5, 5, ?)", ('{"method": "cofi"}', str(tmp_path / "old"),
                                                             '{"accuracy": 0.8}'))
        con.commit()
    store = RunStore(db)
    (old,) = store.list()
    assert (old.status, old.config, old.result, old.processes) == ("done", {"method": "cofi"}, {"accuracy": 0.8}, 1)
    new = store.create({})
    store.enqueue(new, processes=3)
    assert RunStore(db).get(new).processes == 3 and RunStore(db).get(old.id).processes == 1  # opens again


# ----------------------------------------------------------------------------- one background-work layer


def set_heartbeat(db: Path, table: str, key: str, value, when: float) -> None:
    with contextlib.closing(sqlite3.connect(db)) as con:
        con.execute(f"UPDATE {table} SET heartbeat=? WHERE {key}=?", (when, value))
        con.commit()


@pytest.mark.parametrize("age", [STALE_S - 30, STALE_S + 30])
def test_one_stale_rule_judges_an_app_job_and_a_training_run_alike(tmp_path, monkeypatch, age):
    monkeypatch.setenv("HEADLAB_HOME", str(tmp_path))
    assert not hasattr(runs, "STALE_S")  # one constant: core.jobs.STALE_S
    JobReporter("app-job")  # running in this (live) process
    store = RunStore(tmp_path / "runs.sqlite")
    run_id = store.create({})
    store.enqueue(run_id)  # queued in this (live) process
    then = time.time() - age
    set_heartbeat(tmp_path / "jobs.sqlite", "jobs", "name", "app-job", then)
    set_heartbeat(store.db, "runs", "id", run_id, then)
    job, run = job_state("app-job"), store.get(run_id)
    stale = age > STALE_S
    assert jobs.is_stale(then) == stale
    assert (job.status == "interrupted", run.status == "interrupted") == (stale, stale)
    if stale:
        assert f"has not reported for {age:.0f} s" in job.error and f"has not reported for {age:.0f} s" in run.error
    else:
        assert (job.status, run.status) == ("running", "queued")


def test_one_launcher_starts_an_app_job_and_a_training_run(tmp_path, monkeypatch):
    """Both go through core.jobs.start_process: own session, cwd the repository, a log with the START line
    and the process's output; both read as alive while the process runs and as dead after it ends."""
    monkeypatch.setenv("HEADLAB_HOME", str(tmp_path))
    asked = {}

    def sleeper_command(run_id, **kwargs):  # instead of `python -m pruning train --run-id ID`: no torch here
        asked.update(kwargs)
        return [sys.executable, "-c", "import time; print('run says hi', flush=True); time.sleep(3)"]

    monkeypatch.setattr(launch, "launch_command", sleeper_command)
    store = RunStore(tmp_path / "runs.sqlite")
    run_id = store.create({})
    job_proc = start_job("sleepy", ["timeit", "-n", "1", "-r", "1", "import time; time.sleep(3)"])
    run_proc = launch.launch(store, run_id, processes=2)
    assert asked == {"parallel": False, "processes": 2, "executable": True}
    for proc in (job_proc, run_proc):
        assert pid_alive(proc.pid) and os.getsid(proc.pid) == proc.pid  # its own session
        assert Path(f"/proc/{proc.pid}/cwd").resolve() == jobs.REPO
    run = store.get(run_id)
    assert job_state("sleepy").status == "running"
    assert (run.status, run.pid, run.processes) == ("queued", run_proc.pid, 2)
    assert job_proc.wait(timeout=60) == 0 and run_proc.wait(timeout=60) == 0
    assert not pid_alive(job_proc.pid) and not pid_alive(run_proc.pid)
    job, run = job_state("sleepy"), store.get(run_id)
    assert job.status == "interrupted" and "ended without finishing" in job.error  # it never reported "done"
    assert run.status == "interrupted" and "ended without finishing" in run.error
    job_text, run_text = job_log("sleepy").read_text(), (run.run_dir / launch.LOG).read_text()
    assert jobs.START in job_text and "python -m timeit" in job_text and "1 loop" in job_text
    assert jobs.START in run_text and "run says hi" in run_text
