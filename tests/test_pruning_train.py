"""Training backend: the Lagrangian controller, distillation losses, the training loop on tiny configs."""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from core.data import load_splits
from core.models import load_model
from core.pruned import load_pruned
from core.structure import pruning_info
from pruning.__main__ import main
from pruning.baselines import BASELINES, baseline_state, head_scores
from pruning.checkpoints import CHECKPOINT, load_checkpoint
from pruning.config import TrainConfig
from pruning.distill import LayerMatcher, align_layers, logit_kl, masked_mse, teacher_layers
from pruning.gates import GROUPS, CoFiGates, GateShape, GateState
from pruning.lagrangian import LagrangianController, TargetSchedule, lagrangian_loss
from pruning.launch import launch
from pruning.loop import run_job
from pruning.record import StepRecord
from pruning.runs import RunStore
from pruning.size import exact_sparsity, expected_sparsity
from tests.conftest import make_tiny

torch.set_num_threads(1)
TINY_SHAPE = GateShape(layers=2, heads=4, head_dim=8, intermediate=64, hidden=32)  # conftest's tiny BERT

# ----------------------------------------------------------------------------- Lagrangian


def test_target_schedule_ramps_after_the_plain_finetune():
    s = TargetSchedule(0.6, start=10, warmup=20)
    assert [s.at(i) for i in (0, 9)] == [0.0, 0.0] and not s.pruning(9) and s.pruning(10)
    assert s.at(10) == pytest.approx(0.03) and s.at(19) == pytest.approx(0.3)
    assert s.at(29) == pytest.approx(0.6) and s.at(500) == pytest.approx(0.6)
    assert TargetSchedule(0.5).at(0) == 0.5
    for bad in (dict(final=1.0), dict(final=-0.1), dict(final=0.5, warmup=-1), dict(final=0.5, start=1.5)):
        with pytest.raises(ValueError, match="TargetSchedule"):
            TargetSchedule(**bad)


def test_lagrangian_loss_and_ascent_direction():
    s = torch.tensor(0.2)
    assert float(lagrangian_loss(s, 0.5, torch.tensor(2.0), torch.tensor(3.0))) == pytest.approx(2 * -0.3 + 3 * 0.09)
    c = LagrangianController()
    ascent = c.optimizer(lr=0.1)
    loss = c(torch.tensor(0.2), 0.5)  # below target: ascent makes lambda_1 negative, lambda_2 positive
    loss.backward()
    ascent.step()
    l1, l2 = c.values()
    assert l1 < 0 < l2
    with pytest.raises(ValueError, match="'lr'"):
        c.optimizer(lr=-0.1)


@pytest.mark.parametrize("target", [0.3, 0.6])
def test_lagrangian_alone_moves_expected_sparsity_to_the_target(target):
    """Only L_c, on the tiny model's CoFi gates: s-hat reaches the target within a few hundred steps."""
    torch.manual_seed(0)
    gates = CoFiGates(TINY_SHAPE)
    controller = LagrangianController()
    descent, ascent = torch.optim.Adam(gates.parameters(), lr=0.1), controller.optimizer(lr=0.1)
    schedule = TargetSchedule(target, start=0, warmup=100)
    start = float(expected_sparsity(gates).detach())
    for step in range(300):
        loss = controller(expected_sparsity(gates), schedule.at(step))
        descent.zero_grad()
        ascent.zero_grad()
        loss.backward()
        descent.step()
        ascent.step()
        gates.clamp_()
    end = float(expected_sparsity(gates).detach())
    assert start < 0.2
    assert abs(end - target) < 0.02, (start, end)


# ----------------------------------------------------------------------------- distillation


def test_logit_kl_by_hand():
    # teacher logits / T = [ln 3, 0] -> p_t = [3/4, 1/4]; student [0, 0] -> p_s = [1/2, 1/2]
    teacher = torch.tensor([[2 * math.log(3.0), 0.0]])
    student = torch.zeros(1, 2, requires_grad=True)
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert float(logit_kl(student, teacher, 2.0).detach()) == pytest.approx(4 * kl, rel=1e-6)
    assert float(logit_kl(teacher.clone(), teacher, 2.0)) == pytest.approx(0.0, abs=1e-7)
    # batch mean: a second identical row leaves the value unchanged
    assert float(logit_kl(student.repeat(2, 1), teacher.repeat(2, 1)).detach()) == pytest.approx(4 * kl, rel=1e-6)
    logit_kl(student, teacher).backward()
    assert student.grad is not None and student.grad[0, 0] < 0  # student moves towards class 0
    with pytest.raises(ValueError, match="differ"):
        logit_kl(torch.zeros(1, 3), teacher)


def test_masked_mse_by_hand():
    s = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # (B=1, T=2, d=2)
    t = torch.tensor([[[1.0, 1.0], [0.0, 1.0]]])
    assert float(masked_mse(s, t)) == pytest.approx(0.25)  # one error of 1 among 4 numbers
    assert float(masked_mse(s, t, torch.tensor([[1, 0]]))) == pytest.approx(0.5)  # 2 numbers count
    assert float(masked_mse(s, t, torch.tensor([[0, 1]]))) == pytest.approx(0.0)


def test_alignment_is_the_closest_surviving_layer_and_monotone():
    losses = torch.tensor([[1.0, 5.0, 9.0], [4.0, 0.5, 2.0]])  # 2 teacher layers x 3 student layers
    assert align_layers(losses) == [0, 1]
    assert align_layers(losses, torch.tensor([True, False, True])) == [0, 2]
    # the first teacher layer prefers student layer 1, but the second took it: monotone -> 0
    assert align_layers(torch.tensor([[9.0, 1.0, 5.0], [4.0, 0.5, 2.0]])) == [0, 1]
    # one survivor: both teacher layers share it; none: no match
    assert align_layers(losses, torch.tensor([False, True, False])) == [1, 1]
    assert align_layers(losses, torch.tensor([False, False, False])) == [None, None]
    assert teacher_layers(12) == [2, 5, 8, 11] and teacher_layers(6) == [1, 3, 5] and teacher_layers(2) == [0, 1]


def test_layer_matcher_by_hand():
    matcher = LayerMatcher(hidden=2, layers=[0])
    assert torch.equal(matcher.transform.weight, torch.eye(2))
    s = [torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])]
    t = [torch.tensor([[[1.0, 1.0], [0.0, 1.0]]])]
    loss, alignment = matcher(s, t)
    assert loss.item() == pytest.approx(0.25) and alignment == [0]
    loss, _ = matcher(s, t, mask=torch.tensor([[1, 0]]))
    assert loss.item() == pytest.approx(0.5)
    # W is learned: with W = [[1, 0], [1, 1]] the student maps exactly onto the teacher
    with torch.no_grad():
        matcher.transform.weight.copy_(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    assert matcher(s, t)[0].item() == pytest.approx(0.0)
    # two student layers, the teacher's last layer equals the student's first: matched there
    two = LayerMatcher(hidden=2, layers=[1])
    loss, alignment = two([t[0], s[0]], [s[0], t[0]])
    assert alignment == [0] and loss.item() == pytest.approx(0.0)
    loss, alignment = two([t[0], s[0]], [s[0], t[0]], alive=torch.tensor([False, True]))
    assert alignment == [1] and loss.item() == pytest.approx(0.25)


# ----------------------------------------------------------------------------- training runs (tiny model)

ROOT = Path(__file__).resolve().parent.parent
SMALL = dict(batch_size=8, eval_every=10, eval_budget=1.0, eval_examples=8, checkpoint_every=1)
ONE_SHOT = dict(score_examples=16)  # an option of the one-shot methods


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_model(str(tiny_dir))


def run_config(store: RunStore, tiny, progress=None, **overrides) -> tuple[int, str]:
    config = TrainConfig.build(**{**SMALL, **overrides})
    run_id = store.create(config.to_dict())
    return run_id, run_job(store, run_id, progress, teacher=tiny)


def test_config_validation_names_the_field():
    assert TrainConfig().check().total_steps == TrainConfig().steps + TrainConfig().finetune_steps
    with pytest.raises(ValueError, match="'target_sparsity' parameter of method cofi"):
        TrainConfig.build(target_sparsity=1.2).check()
    with pytest.raises(ValueError, match="'method' parameter must be one of cofi, l0"):
        TrainConfig(method="magic").check()
    for bad, field_name in (
                            (dict(batch_size=0), "batch_size"), (dict(lr=-1.0), "lr"), (dict(steps=0), "steps"),
                            (dict(distill="yes"), "distill"), (dict(alpha_ce=1.5), "alpha_ce")):
        with pytest.raises(ValueError, match=f"'{field_name}' parameter of TrainConfig"):
            TrainConfig.build(**bad).check()
    with pytest.raises(ValueError, match="must not exceed steps"):
        TrainConfig.build(steps=10, prefinetune_steps=5, warmup_steps=6).check()
    with pytest.raises(ValueError, match="Method cofi has no option.* stepz"):
        TrainConfig.from_dict({"stepz": 3})
    with pytest.raises(ValueError, match="Method l0 has no option.* target_sparsity"):
        TrainConfig.build(method="l0", target_sparsity=0.5).check()
    flat = {**TrainConfig().to_dict(), "target_sparsity": 0.4}  # a run recorded before methods had options
    del flat["options"]
    assert TrainConfig.from_dict(flat) == TrainConfig.build(target_sparsity=0.4)
    assert TrainConfig.from_dict(TrainConfig(method="l0").to_dict()) == TrainConfig(method="l0")


def test_cofi_run_reaches_the_target_and_exports(tiny, tiny_dir, reviews, tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    run_id, status = run_config(store, tiny, model=str(tiny_dir), data=str(reviews), method="cofi",
                                target_sparsity=0.5, steps=120, prefinetune_steps=5, warmup_steps=50,
                                finetune_steps=10)
    run = store.get(run_id)
    assert status == "done" and run.status == "done" and run.step == run.total == 130
    rows = store.metrics(run_id)
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)) and steps[0] == 0 and steps[-1] == 130 and 120 in steps
    records = [StepRecord.from_dict(r) for r in rows]
    gate_end = next(r for r in records if r.step == 120)
    assert gate_end.phase == "gates" and gate_end.target == pytest.approx(0.5)
    assert abs(gate_end.expected_sparsity - 0.5) < 0.1  # the Lagrangian, with distillation on, got there
    assert gate_end.method_figures["lambda_2"] > 0 and set(gate_end.losses) == {"distill_ce", "distill_layer",
                                                                               "lagrangian"}
    # at every eval step the logged total is the sum of the terms (each a mean over the same steps)
    trained = [r for r in records if r.loss is not None]
    assert len(trained) == len(records) - 1 and records[0].loss is None  # step 0: nothing trained yet
    for r in trained:
        assert r.loss == pytest.approx(sum(r.losses.values()), rel=1e-5), r.step
        assert all(math.isfinite(v) for v in r.losses.values()), r.step
        if r.phase == "finetune":
            assert r.losses.keys() == {"task", "distill_ce"} and r.method_figures == {}, r.step
            assert r.losses["task"] > 0 and r.losses["distill_ce"] >= 0, r.step
    assert 0 < records[-1].eval_fraction < 1 and len(records[-1].heads_alive) == 2
    final = run.result
    assert final["final"] and final["examples"] == 12 and final["phase"] == "finetune"
    assert final["sparsity"] > 0.2 and final["parameters"] < final["dense_parameters"]
    assert len(store.gate_steps(run_id)) == len(rows)
    exported = load_pruned(final["export"])
    assert [len(h) for h in pruning_info(exported.model).plan.heads] == final["heads_alive"]
    assert exported.architecture().encoder_parameters < tiny.architecture().encoder_parameters


def test_l0_gates_close_under_a_large_lambda(tiny, tiny_dir, reviews, tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    common = dict(model=str(tiny_dir), data=str(reviews), method="l0", steps=160, finetune_steps=0, gate_lr=0.2,
                  distill=False, eval_every=40)
    closing, _ = run_config(store, tiny, l0_lambda=5.0, **common)
    keeping, _ = run_config(store, tiny, l0_lambda=0.0, **common)
    closed = store.get(closing).result
    assert sum(closed["heads_alive"]) <= 2, closed["heads_alive"]  # of 8
    assert closed["expected_sparsity"] > 0.3 and closed["losses"]["l0"] > 0
    assert sum(store.get(keeping).result["heads_alive"]) == 8
    assert store.gates(closing).closed_heads()  # the snapshot has them closed too


def test_l0_record_holds_lambda_times_expected_open_heads(tiny, tiny_dir, reviews, tmp_path):
    """The l0 term of an eval step's record is lambda * sum_h P(z_h != 0) of the gates that step trained
    with: with an eval after every step, the final record's terms are those of the last step alone, whose
    gates are the checkpoint of the step before (log_alpha; Voita's deterministic gates are the stored
    snapshot of that step)."""
    store = RunStore(tmp_path / "runs.sqlite")
    lam, beta = 0.3, 0.33  # beta: L0HeadGates' temperature
    run_id, status = run_config(store, tiny, model=str(tiny_dir), data=str(reviews), method="l0", steps=6,
                                finetune_steps=0, eval_every=1, l0_lambda=lam, gate_lr=0.2)
    records = store.records(run_id)
    assert status == "done" and [r.step for r in records] == list(range(7))
    payload = load_checkpoint(store.get(run_id).run_dir)
    assert payload["step"] == 5 and payload["phase"] == "gates"
    log_alpha = payload["method"]["modules"][0]["gates.head.log_alpha"]  # (layers, heads) after 5 updates
    assert log_alpha.shape == (2, 4)
    gamma, zeta = -0.1, 1.1  # the hard-concrete stretch
    p_open = torch.sigmoid(log_alpha - beta * math.log(-gamma / zeta))
    voita = (torch.sigmoid(log_alpha) * (zeta - gamma) + gamma).clamp(0, 1)
    assert torch.allclose(store.gates(run_id, 5).head, voita, atol=1e-6)
    final = records[-1]
    assert final.final and final.losses.keys() == {"task", "distill_ce", "l0"}
    assert final.losses["l0"] == pytest.approx(lam * float(p_open.sum()), rel=1e-5)
    assert final.loss == pytest.approx(sum(final.losses.values()), rel=1e-5)
    for r in records[1:]:  # every step: lambda times at most 8 open heads, and the sum of the terms
        assert 0 < r.losses["l0"] <= lam * 8 and r.loss == pytest.approx(sum(r.losses.values()), rel=1e-5)
    assert records[1].losses["l0"] == pytest.approx(lam * 8, rel=1e-3)  # step 1: log_alpha ~ N(10, 0.01), all open


@pytest.mark.parametrize("method", ["relevance", "importance", "random"])
def test_baselines_prune_to_the_target_then_finetune(method, tiny, tiny_dir, reviews, tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    run_id, status = run_config(store, tiny, model=str(tiny_dir), data=str(reviews), method=method,
                                target_sparsity=0.6, finetune_steps=10, **ONE_SHOT)
    rows = store.metrics(run_id)
    assert status == "done" and [r["step"] for r in rows] == [0, 10]
    assert rows[0]["sparsity"] == pytest.approx(0.6, abs=0.05) and rows[0]["phase"] == "finetune"
    first, last = store.records(run_id)
    assert first.loss is None and first.losses == {}  # pruned, not trained yet
    # a one-shot method adds no term of its own: CE (times 1 - alpha_ce) and the distillation term only
    assert last.losses.keys() == {"task", "distill_ce"} and last.method_figures == {}
    assert last.loss == pytest.approx(last.losses["task"] + last.losses["distill_ce"], rel=1e-5)
    assert last.losses["task"] > 0 and last.losses["distill_ce"] >= 0


def test_dense_method_finetunes_a_separate_student_against_its_teacher(tiny, tiny_dir, reviews, tmp_path):
    """`dense`: no pruning; the student (another model with the same labels and vocabulary) is fine-tuned
    with distillation from the teacher, and timed against it."""
    student_dir = make_tiny(tmp_path / "student", seed=1)
    store = RunStore(tmp_path / "runs.sqlite")
    run_id, status = run_config(store, tiny, model=str(student_dir), teacher=str(tiny_dir), data=str(reviews),
                                method="dense", finetune_steps=10)
    final = store.get(run_id).result
    assert status == "done" and final["sparsity"] == pytest.approx(exact_sparsity(GateState.dense(TINY_SHAPE)))
    assert final["heads_alive"] == [4, 4] and final["losses"]["distill_ce"] > 0
    start = load_model(str(student_dir)).model.state_dict()
    trained = load_pruned(final["export"]).model.state_dict()
    assert any(not torch.equal(start[k], trained[k]) for k in start)  # fine-tuned, not the teacher's copy
    assert not torch.equal(trained["classifier.weight"], tiny.model.state_dict()["classifier.weight"])
    other = make_tiny(tmp_path / "three", labels=["a", "b", "c"])
    run_id = store.create(TrainConfig.build(**{**SMALL, "model": str(student_dir), "teacher": str(other),
                                         "data": str(reviews), "method": "dense", "finetune_steps": 2}).to_dict())
    with pytest.raises(ValueError, match="teacher's labels"):
        run_job(store, run_id)
    assert "teacher's labels" in store.get(run_id).error


def test_baseline_states_follow_their_scores(tiny, reviews):
    data = load_splits(str(reviews), tiny.label_names).train
    states = {m: baseline_state(m, tiny, data.texts[:16], data.labels[:16], 0.4) for m in BASELINES}
    for state in states.values():
        assert abs(exact_sparsity(state) - 0.4) < 0.05
    scores = head_scores("importance", tiny, data.texts[:16], data.labels[:16])
    kept = states["importance"].head > 0
    assert scores[kept].min() >= scores[~kept].max()  # the most important heads survive
    with pytest.raises(ValueError, match="'method' parameter of head_scores"):
        head_scores("taylor", tiny, [], [])


def stop_at(store: RunStore, run_id: int, step: int):
    """A progress callback requesting a stop after `step` steps."""
    def progress(done, total, message):
        if done == step:
            store.request_stop(run_id)
            time.sleep(1.1)  # the loop looks at the stop flag at most once a second
    return progress


def test_stop_then_resume_continues_the_step_count(tiny, tiny_dir, reviews, tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    config = TrainConfig.build(**{**SMALL, "model": str(tiny_dir), "data": str(reviews), "method": "cofi",
                            "target_sparsity": 0.4, "steps": 60, "prefinetune_steps": 5, "warmup_steps": 20,
                            "finetune_steps": 20})
    run_id = store.create(config.to_dict())

    assert run_job(store, run_id, stop_at(store, run_id, 25), teacher=tiny) == "stopped"
    run = store.get(run_id)
    assert run.status == "stopped" and run.step == 25 and load_checkpoint(run.run_dir)["step"] == 25
    assert run_job(store, run_id, teacher=tiny) == "done"
    rows = store.metrics(run_id)
    assert [r["step"] for r in rows] == [0, 10, 20, 30, 40, 50, 60, 70, 80]
    assert [r["attempt"] for r in rows] == [1, 1, 1, 2, 2, 2, 2, 2, 2] and store.get(run_id).step == 80

    # the same config without the stop: the resumed run is the same run (checkpointed weights, gates,
    # multipliers, optimizer moments and RNG state; batches and gate noise are drawn from (seed, step))
    whole = store.create(config.to_dict())
    assert run_job(store, whole, teacher=tiny) == "done"
    for a, b in zip(store.metrics(whole), rows, strict=True):
        assert a["step"] == b["step"] and a["phase"] == b["phase"]
        if a["loss"] is not None:
            assert b["loss"] == pytest.approx(a["loss"], abs=1e-5), a["step"]
        assert b["losses"] == pytest.approx(a["losses"], abs=1e-5) and b["accuracy"] == a["accuracy"], a["step"]
        gates_a, gates_b = store.gates(whole, a["step"]), store.gates(run_id, a["step"])
        assert all(torch.allclose(getattr(gates_a, g), getattr(gates_b, g), atol=1e-5) for g in GROUPS), a["step"]
    assert store.gates(whole) == store.gates(run_id)  # the final structure: the same units, the same values


def run_cli(*args: str, home: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pruning", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "HEADLAB_HOME": str(home)})


def test_kill_9_then_resume_continues_the_step_count(tiny_dir, reviews, tmp_path, monkeypatch, capsys):
    """A real `python -m pruning train` killed with SIGKILL is detected; `runs resume` finishes it."""
    monkeypatch.setenv("HEADLAB_HOME", str(tmp_path))
    proc = run_cli("train", "--model", str(tiny_dir), "--data", str(reviews), "--method", "cofi",
                   "--target-sparsity", "0.4", "--steps", "200", "--prefinetune-steps", "5", "--warmup-steps", "50",
                   "--finetune-steps", "20", "--batch-size", "8", "--eval-every", "20", "--eval-budget", "1",
                   "--eval-examples", "8", "--checkpoint-every", "1", "--run-dir", str(tmp_path / "run"), home=tmp_path)
    store = RunStore(tmp_path / "runs.sqlite")
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None:
        listed = store.list()
        if listed and listed[0].step >= 45 and len(store.metrics(listed[0].id)) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    run = store.list()[0]
    assert run.status == "interrupted" and "ended without finishing" in run.error
    checkpoint_step = load_checkpoint(run.run_dir)["step"]
    before = [r["step"] for r in store.metrics(run.id)]
    assert 0 < checkpoint_step <= run.step < 220

    assert main(["runs", "resume", str(run.id)]) == 0
    assert "done" in capsys.readouterr().out
    run = store.get(run.id)
    assert (run.status, run.step, run.total, run.attempt) == ("done", 220, 220, 2)
    rows = store.metrics(run.id)
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)) and steps[-1] == 220
    assert [s for s in steps if s <= checkpoint_step] == [s for s in before if s <= checkpoint_step]  # kept
    assert all(r["attempt"] == 2 for r in rows if r["step"] > checkpoint_step)  # the curve continues there
    assert min(r["step"] for r in rows if r["attempt"] == 2) > checkpoint_step
    assert (run.run_dir / "model" / "pruning.json").is_file()
    assert main(["runs", "list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[0].split()[:3] == ["id", "status", "method"]
    assert listed[1].split()[:3] == [str(run.id), "done", "cofi"]
    out = tmp_path / "exported"
    assert main(["runs", "export", str(run.id), "--out", str(out), "--onnx"]) == 0
    assert (out / "model.onnx").is_file()
    again, trained = load_model(str(out)), load_pruned(run.run_dir / "model")
    batch = trained.tokenizer(["a great film", "an awful film"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(again.model(**batch).logits, trained.model(**batch).logits)
    assert main(["runs", "export", str(run.id), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["runs", "delete", str(run.id)]) == 0
    assert not run.run_dir.exists() and store.list() == []


def test_corrupt_checkpoint_gives_a_clear_error(tiny, tiny_dir, reviews, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HEADLAB_HOME", str(tmp_path))
    store = RunStore()
    config = TrainConfig.build(**{**SMALL, **ONE_SHOT, "model": str(tiny_dir), "data": str(reviews), "method": "random",
                            "target_sparsity": 0.3, "finetune_steps": 30})
    run_id = store.create(config.to_dict())
    assert run_job(store, run_id, stop_at(store, run_id, 5), teacher=tiny) == "stopped"
    path = store.get(run_id).run_dir / CHECKPOINT
    path.write_bytes(path.read_bytes()[:1000])
    assert main(["runs", "resume", str(run_id)]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: The checkpoint") and "corrupt or unreadable" in err
    assert "Traceback" not in err
    assert store.get(run_id).status == "failed" and "corrupt" in store.get(run_id).error
    path.unlink()
    assert main(["runs", "resume", str(run_id)]) == 0  # no checkpoint: the run starts over from step 0
    assert store.get(run_id).status == "done" and store.get(run_id).attempt == 3


@pytest.mark.parametrize("args, message", [
    (["train", "--target-sparsity", "1.2"], "'target_sparsity' parameter"),
    (["train", "--method", "magic"], "invalid choice"),
    (["train", "--run", "3", "--steps", "5"], "drop --steps"),
    (["runs", "stop", "42"], "no run 42"),
    (["runs", "resume"], "needs a run ID"),
])
def test_cli_bad_input_exits_2_with_one_line(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HEADLAB_HOME", str(tmp_path))
    try:
        rc = main(args)
    except SystemExit as exc:
        rc = exc.code
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and re.search(message, err), err


def test_background_runs_queue_one_at_a_time(tiny_dir, reviews, tmp_path, monkeypatch):
    """`pruning.launch.launch` (what the app calls): two jobs started together train one after the other."""
    monkeypatch.setenv("HEADLAB_HOME", str(tmp_path))
    store = RunStore()
    config = TrainConfig.build(**{**SMALL, **ONE_SHOT, "model": str(tiny_dir), "data": str(reviews), "method": "random",
                            "target_sparsity": 0.3, "finetune_steps": 40})
    first, second = store.create(config.to_dict()), store.create(config.to_dict())
    procs = [launch(store, first), launch(store, second)]
    assert {store.get(first).status, store.get(second).status} <= {"queued", "running"}
    seen = set()
    deadline = time.time() + 120
    while time.time() < deadline and any(p.poll() is None for p in procs):
        seen.add((store.get(first).status, store.get(second).status))
        time.sleep(0.05)
    assert [p.wait() for p in procs] == [0, 0], (store.get(first).error, store.get(second).error)
    assert ("running", "queued") in seen and ("running", "running") not in seen
    assert store.get(first).status == store.get(second).status == "done"
    assert store.get(second).attempt == 1 and "train.log" in os.listdir(store.get(second).run_dir)
    with pytest.raises(ValueError, match="already done"):
        launch(store, first)
