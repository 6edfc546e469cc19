"""pruning.runs: the SQLite run store (status, queue, stop, dead-process detection, delete) and checkpoints."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from core.folders import MARKER
from pruning import runs
from pruning.gates import GateShape, GateState
from pruning.runs import RunStore, load_checkpoint, rng_state, save_checkpoint, set_rng_state

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
    monkeypatch.setattr(runs, "STALE_S", -1.0)  # every heartbeat is now too old
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
    path = tmp_path / runs.CHECKPOINT
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
