"""Data-parallel training under torchrun: 2 CPU processes (gloo) against 1 process, same global batch.

The tiny 2-layer BERT of conftest, with dropout switched off: then the only randomness is the gate
noise, which every rank draws from (seed, step), so a 2-process step computes the gradient of the same
global batch as a 1-process step, summed in a different order. The runs may differ only by float
rounding, which Adam and the hard-concrete gates amplify a little over the steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

from pruning.checkpoints import load_checkpoint
from pruning.config import TrainConfig
from pruning.distributed import Dist, resolve_device, torchrun_command
from pruning.gate_state import GROUPS
from pruning.launch import launch, launch_command
from pruning.loop import run_job
from pruning.runs import RunStore
from tests.conftest import make_tiny

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent
# 60 gate steps (CoFi: 5 plain, target ramped over 30) + 20 fine-tune steps, global batch 8, an eval every
# 10 steps (eval_budget 1 keeps that cadence fixed), a checkpoint at every eval.
CONFIG = dict(method="cofi", target_sparsity=0.5, steps=60, prefinetune_steps=5, warmup_steps=30, finetune_steps=20,
              batch_size=8, eval_every=10, eval_budget=1.0, eval_examples=8, checkpoint_every=1, device="cpu",
              threads=1)
# Tolerances (absolute) between the 2-process and the 1-process curves at every eval step. Both runs
# see the same examples, gate samples and initial weights, so they differ only in summation order
# (two half-batch gradients averaged vs one batch gradient): ~1e-7 relative per step, grown by Adam
# (which divides by sqrt(v)) and by the gates' sigmoid over 80 steps; measured on 2 CPU cores: loss
# 4e-7, expected sparsity, lambdas and gates equal to 1e-7. A rank-dependent step (unaveraged gate
# gradients, per-rank gate noise) would instead make the replicas differ: the checksums catch that.
LOSS_TOL = 1e-4
SPARSITY_TOL = 1e-4
LAMBDA_TOL = 1e-4
GATE_TOL = 1e-4  # deterministic (soft) gate values


@pytest.fixture(scope="module")
def no_dropout(tmp_path_factory) -> Path:
    folder = make_tiny(tmp_path_factory.mktemp("tiny") / "model")
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def torchrun(args: list[str], home: Path) -> subprocess.Popen:
    return subprocess.Popen(torchrun_command(["pruning", *args], 2, executable=True), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HEADLAB_HOME": str(home), "OMP_NUM_THREADS": "1"})


def test_shards_cover_the_batch_once():
    for n in (1, 7, 8, 9):
        rows = [list(range(n))[Dist(rank=r, world=3).shard(n)] for r in range(3)]
        assert sum(rows, []) == list(range(n)) and max(map(len, rows)) - min(map(len, rows)) <= 1
    assert Dist().shard(5) == slice(0, 5) and Dist().broadcast("x") == "x" and Dist().gather(3) == [3]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_one_clear_error():
    assert resolve_device("auto") == resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="'device' parameter is 'cuda' but this torch build sees no CUDA"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="'device' parameter must be one of auto, cpu, cuda"):
        resolve_device("gpu")


def test_two_processes_follow_one_and_resume_on_the_same_curve(no_dropout, reviews, tmp_path, monkeypatch):
    """A 2-process CoFi run (torchrun by hand, stopped after step 10, resumed by `pruning.launch` with 2
    processes) against an uninterrupted 1-process run of the same config."""
    config = TrainConfig.build(model=str(no_dropout), data=str(reviews), **CONFIG).check()
    single = RunStore(tmp_path / "one" / "runs.sqlite")
    one = single.create(config.to_dict())
    assert run_job(single, one) == "done"

    home = tmp_path / "two"
    monkeypatch.setenv("HEADLAB_HOME", str(home))
    proc = torchrun(["train", *config.cli_args()], home)
    deadline, db = time.time() + 60, home / "runs.sqlite"
    while time.time() < deadline and proc.poll() is None:
        runs = RunStore(db).list() if db.exists() else []
        if runs and runs[0].step >= 10:
            RunStore(db).request_stop(runs[0].id)
            break
        time.sleep(0.05)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    store = RunStore(home / "runs.sqlite")
    run = store.list()[0]
    stopped_at = load_checkpoint(run.run_dir)["step"]
    assert run.status == "stopped" and 10 <= stopped_at == run.step < 80, (run.status, run.step)
    assert run.pid == proc.pid and run.processes == 2  # the store watched the torchrun agent, knows its 2 workers

    resumed = launch(store, run.id, processes=2)  # what the app runs: torchrun ... train --run-id ID
    assert resumed.wait(timeout=90) == 0, (run.run_dir / "train.log").read_text()[-3000:]
    assert launch_command(run.id, processes=2) == ["torchrun", "--standalone", "--nproc_per_node=2", "-m",
                                                   "pruning", "train", "--run-id", str(run.id)]
    run = store.get(run.id)
    assert (run.status, run.step, run.attempt) == ("done", 80, 2)

    # CoFi's multipliers are its figures while its gates learn (None once the structure is fixed)
    a, b = ([{"lambda_1": None, "lambda_2": None, **r, **r["method_figures"]} for r in s.metrics(i)]
            for s, i in ((single, one), (store, run.id)))
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 10, 20, 30, 40, 50, 60, 70, 80]
    assert {r["attempt"] for r in b if r["step"] > stopped_at} == {2}
    worst = {key: max(abs(x[key] - y[key]) for x, y in zip(a, b) if x[key] is not None)
             for key in ("loss", "expected_sparsity", "lambda_1", "lambda_2")}
    print(f"largest 2-process vs 1-process differences: {worst}")
    for x, y in zip(a, b):
        assert (x["processes"], y["processes"], y["device"], y["threads"]) == (1, 2, "cpu", 1)
        assert x["replica_checksums"] is None and len(set(y["replica_checksums"])) == 1  # ranks identical
        if x["loss"] is not None:
            assert y["loss"] == pytest.approx(x["loss"], abs=LOSS_TOL), x["step"]
        assert y["expected_sparsity"] == pytest.approx(x["expected_sparsity"], abs=SPARSITY_TOL), x["step"]
        for key in ("lambda_1", "lambda_2"):
            if x[key] is not None:
                assert y[key] == pytest.approx(x[key], abs=LAMBDA_TOL), (x["step"], key)
        g1, g2 = single.gates(one, x["step"]), store.gates(run.id, x["step"])
        for name in GROUPS:  # the same units open, soft values close
            t1, t2 = getattr(g1, name), getattr(g2, name)
            assert torch.equal(t1 > 0, t2 > 0) and (t1 - t2).abs().max() <= GATE_TOL, (x["step"], name)
    assert b[-1]["accuracy"] == a[-1]["accuracy"] and b[-1]["heads_alive"] == a[-1]["heads_alive"]
