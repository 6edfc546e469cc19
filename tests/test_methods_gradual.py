"""Zhu & Gupta's gradual pruning, SMP and CAP: each method's defining rule on tiny models, and short real runs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from core.models import load_model
from core.pruned import load_pruned
from pruning.__main__ import main
from pruning.config import TrainConfig
from pruning.contrastive import ContrastiveTerms, bank_terms, contrastive_loss, pooled
from pruning.distributed import Dist
from pruning.methods.gradual import GradualOptions, magnitude_mask
from pruning.methods.smp import TopKMasked, top_mask
from pruning.runs import RunStore
from pruning.schedule import CubicSchedule
from pruning.session import Job, TrainSession
from pruning.size import exact_sparsity
from pruning.surgery import prune
from tests.conftest import make_tiny

torch.set_num_threads(1)
SMALL = ["--batch-size", "8", "--eval-every", "10", "--eval-budget", "1", "--eval-examples", "8"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("gradual") / "model")


def session(folder: Path, reviews: Path, tmp_path: Path, method: str, steps: int, **options) -> TrainSession:
    config = TrainConfig.build(model=str(folder), data=str(reviews), method=method, batch_size=8, steps=steps,
                               finetune_steps=0, **options).check()
    job = Job(run_id=1, config=config.to_dict(), run_dir=tmp_path, attempt=1, resume=False)
    return TrainSession(config, job, None, None, load_model(str(folder)), Dist())


def gate_phase(s: TrainSession, watch=None) -> None:
    """The loop's gate phase, `watch(step)` after every step."""
    s.setup_gates()
    while s.step < s.c.gate_steps:
        s.train_step()
        if watch is not None:
            watch(s.step)
        s.step += 1


# ----------------------------------------------------------------------------- the cubic schedule


def test_the_schedule_hits_its_final_sparsity_at_t0_plus_n_dt_and_never_falls():
    sched = CubicSchedule(final=0.8, initial=0.1, start=10, interval=5, updates=4)
    values = [sched.at(t) for t in range(60)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert values[9] == 0.1 and values[10] == 0.1 and values[30] == 0.8 and values[29] < 0.8
    # by the formula at t0 + 2 dt, held until the next update
    expected = 0.8 + (0.1 - 0.8) * (1 - 10 / 20) ** 3
    assert math.isclose(sched.at(20), expected) and sched.at(24) == sched.at(20)
    assert [t for t in range(60) if sched.updates_at(t)] == [10, 15, 20, 25, 30]
    fitted = CubicSchedule.fitted(0.5, 0.0, 0, 25, 0, steps=300)
    assert fitted.updates == 11 and fitted.end == 275
    with pytest.raises(ValueError, match="must come before the end"):
        CubicSchedule.fitted(0.5, 0.0, 0, 25, 20, steps=300)
    with pytest.raises(ValueError, match="initial <= final"):
        CubicSchedule(final=0.2, initial=0.5)


def test_magnitude_masks_close_the_smallest_weights_and_only_grow():
    w = torch.tensor([[0.5, -0.1, 0.3], [-0.9, 0.2, 0.05]])
    first = magnitude_mask(w, 0.5)
    assert first.tolist() == [[1, 0, 1], [1, 0, 0]]
    moved = torch.tensor([[0.5, 0.8, 0.3], [-0.9, 0.01, 0.05]])  # a closed weight grew, an open one shrank
    second = magnitude_mask(moved, 4 / 6, first)
    assert second.sum() == 2 and (second <= first).all()  # closed ones stay closed
    assert second.tolist() == [[1, 0, 0], [1, 0, 0]]


# ----------------------------------------------------------------------------- gradual pruning


def test_gradual_weights_follow_the_schedule_in_every_linear(tiny, reviews, tmp_path):
    s = session(tiny, reviews, tmp_path, "gradual", 12, target_sparsity=0.75, interval=3, updates=3,
                initial_sparsity=0.0)
    seen = {}

    def watch(step):
        method = s.method
        if method.schedule.updates_at(step):
            expect = method.schedule.at(step)
            for name, mask in method.masks.items():
                w = s.student.model.get_parameter(name)
                assert int((mask == 0).sum()) == round(expect * mask.numel()), (step, name)
                assert (w[mask == 0] == 0).all()
                if name in seen:
                    assert (mask <= seen[name]).all()
                seen[name] = mask.clone()

    gate_phase(s, watch)
    assert s.method.schedule.end == 9 and s.method.expected_sparsity(12) == pytest.approx(0.75, abs=1e-3)
    s.setup_finetune(s.current_state())
    assert s.masks.keys() == seen.keys()
    for name, mask in s.masks.items():  # the dense structure keeps the names: the masks hold in the sliced model
        assert (s.student.model.get_parameter(name)[mask == 0] == 0).all()


@pytest.mark.parametrize("score", ["magnitude", "importance", "relevance"])
def test_gradual_heads_ffn_close_more_on_the_schedule_and_gated_equals_pruned(score, tiny, reviews, tmp_path):
    s = session(tiny, reviews, tmp_path, "gradual", 6, target_sparsity=0.5, unit="heads-ffn", score=score,
                interval=2, updates=2, score_examples=8)
    states = []
    gate_phase(s, lambda step: states.append(s.method.gate_state(step)))
    for a, b in zip(states, states[1:]):
        assert (b.head <= a.head).all() and (b.intermediate <= a.intermediate).all()
    final = s.current_state()
    assert exact_sparsity(final, model=s.method.context.sizes) == pytest.approx(0.5, abs=0.05)
    assert not final.is_dense() and (final.head.sum(dim=1) >= 1).all()
    batch = s.examples.batch(list(range(8)))[0]
    s.student.model.eval()
    with torch.no_grad():
        s.hooks.update(final)
        gated_logits = s.student.model(**batch).logits
        s.hooks.remove()
        sliced = prune(s.student, final)
        torch.testing.assert_close(sliced.model(**batch).logits, gated_logits, rtol=1e-4, atol=1e-5)


def test_gradual_refuses_what_does_not_fit(tiny, reviews, tmp_path, monkeypatch):
    monkeypatch.setenv("HEADLAB_HOME", str(tmp_path))
    base = ["train", "--model", str(tiny), "--data", str(reviews), "--method", "gradual", *SMALL]
    assert main([*base, "--score", "importance"]) == 2  # weights are ranked by |w|
    assert main([*base, "--lora"]) == 2
    assert main([*base, "--steps", "20", "--interval", "10", "--updates", "5"]) == 2  # last update past the end


def test_a_gradual_run_exports_its_masks_and_loads_back(tiny, reviews, tmp_path, monkeypatch):
    monkeypatch.setenv("HEADLAB_HOME", str(tmp_path))
    assert main(["train", "--model", str(tiny), "--data", str(reviews), "--method", "gradual", "--steps", "8",
                 "--interval", "3", "--target-sparsity", "0.6", "--finetune-steps", "3", *SMALL]) == 0
    run = RunStore().list()[0]
    assert run.status == "done", run.error
    back = load_pruned(run.result["export"])
    linear = back.adapter.ffn_in(0).weight
    assert float((linear == 0).float().mean()) == pytest.approx(0.6, abs=1e-3)
    assert "Weight masks" in run.final.note


# ----------------------------------------------------------------------------- SMP


def test_topk_mask_passes_the_straight_through_gradient():
    weight = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    scores = torch.tensor([[0.2, -0.1], [0.4, 0.0]], requires_grad=True)
    masked = TopKMasked(scores, lambda n: 2)(weight)
    assert masked.tolist() == [[1.0, 0.0], [3.0, 0.0]]
    upstream = torch.tensor([[1.0, 2.0], [-1.0, 4.0]])
    (masked * upstream).sum().backward()
    assert torch.equal(scores.grad, upstream * weight)  # dL/dS = dL/dW' (.) W
    assert top_mask(torch.zeros(5), 3).tolist() == [1, 1, 1, 0, 0]


def test_smp_learns_masks_only_the_backbone_stays_as_it_was(tiny, reviews, tmp_path):
    s = session(tiny, reviews, tmp_path, "smp", 8, target_sparsity=0.5, interval=2, updates=3)
    base = {n: p.detach().clone() for n, p in s.base.model.named_parameters()}
    gate_phase(s)
    assert s.method.sparsity == 0.5
    s.setup_finetune(s.current_state())
    moved = {n for n, p in s.student.model.named_parameters() if p.requires_grad}
    assert moved and all(n.startswith("classifier") or ".pooler." in n for n in moved)
    for name, p in s.student.model.named_parameters():
        mask = s.masks.get(name)
        expected = base[name] if mask is None else base[name] * mask
        if not (name.startswith("classifier") or ".pooler." in name):
            assert torch.equal(p.detach(), expected), name
    for mask in s.masks.values():
        assert int((mask == 0).sum()) == round(0.5 * mask.numel())
    scores = next(iter(s.method.scores.values()))
    assert scores.abs().sum() > 0  # the scores learned


def test_smp_refuses_a_decoder(tiny_decoders, reviews, tmp_path, monkeypatch):
    monkeypatch.setenv("HEADLAB_HOME", str(tmp_path))
    assert main(["train", "--model", str(tiny_decoders["llama"]), "--data", str(reviews), "--method", "smp",
                 "--label-map", "pos=fresh,neg=rotten", *SMALL]) == 2


# ----------------------------------------------------------------------------- CAP


def test_the_contrastive_loss_is_the_formula_by_hand():
    a = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8]]), dim=1)
    c = torch.nn.functional.normalize(torch.tensor([[1.0, 0.2], [0.0, 1.0], [-1.0, 0.0]]), dim=1)
    positives = torch.tensor([[True, False, False], [True, True, False]])
    tau = 0.5
    got = contrastive_loss(a, positives, c, tau)
    sims = (a @ c.T / tau).tolist()
    by_hand = []
    for i, row in enumerate(sims):
        denominator = sum(math.exp(x) for x in row)
        ps = [j for j in range(3) if positives[i, j]]
        by_hand.append(-sum(math.log(math.exp(row[j]) / denominator) for j in ps) / len(ps))
    assert got.item() == pytest.approx(sum(by_hand) / 2, rel=1e-6)
    # the bank form: the anchor itself is no candidate, the bank's row i is i's unsupervised positive
    z = a.clone()
    bank = c[:2]
    unsup, sup = bank_terms(z, torch.tensor([0, 1]), bank, torch.tensor([0, 0]), True, tau)
    rows = [[(z[i] @ z[1 - i]).item() / tau, *(z[i] @ bank.T / tau).tolist()] for i in range(2)]
    lse = [math.log(sum(math.exp(x) for x in r)) for r in rows]
    assert unsup.item() == pytest.approx(((lse[0] - rows[0][1]) + (lse[1] - rows[1][2])) / 2, rel=1e-6)
    # supervised: anchor 0 (label 0) has both bank rows; anchor 1 (label 1) has none and is left out
    assert sup.item() == pytest.approx(lse[0] - (rows[0][1] + rows[0][2]) / 2, rel=1e-6)


def test_cap_terms_and_queue():
    terms = ContrastiveTerms(GradualOptions(contrastive=True, cap_bank=3), False, torch.device("cpu"))

    class Out:
        def __init__(self, h):
            self.hidden_states = (h,)

    h = torch.randn(2, 4, 8)
    mask = torch.ones(2, 4)
    first = terms(Out(h), Out(h + 0.1), torch.tensor([0, 1]), mask)
    assert set(first) == {"cap_fic"} and len(terms.queue) == 2
    second = terms(Out(h), Out(h), torch.tensor([1, 1]), mask)
    assert set(second) == {"cap_fic", "cap_snc"} and len(terms.queue) == 3
    assert torch.allclose(pooled(h, mask, False).norm(dim=1), torch.ones(2))
    last = pooled(h, torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]), True)  # a decoder's last attended token
    assert torch.allclose(last[0], torch.nn.functional.normalize(h[0, 1], dim=0))


@pytest.mark.parametrize("method", ["gradual", "cofi"])
def test_a_contrastive_run_trains_with_the_cap_terms(method, tiny, reviews, tmp_path, monkeypatch):
    monkeypatch.setenv("HEADLAB_HOME", str(tmp_path))
    extra = ["--unit", "heads-ffn", "--interval", "2"] if method == "gradual" else ["--warmup-steps", "4",
                                                                                      "--prefinetune-steps", "0"]
    s = session(tiny, reviews, tmp_path, method, 6, contrastive=True,
                **({"unit": "heads-ffn", "interval": 2} if method == "gradual" else
                   {"warmup_steps": 4, "prefinetune_steps": 0}))
    gate_phase(s)
    assert "cap_fic" in s.losses and "cap_snc" in s.losses and all(math.isfinite(x) for x in s.losses["cap_fic"])
    assert main(["train", "--model", str(tiny), "--data", str(reviews), "--method", method, "--steps", "6",
                 "--contrastive", "--finetune-steps", "0", *extra, *SMALL]) == 0


@pytest.mark.parametrize("unit", ["weights", "heads-ffn"])
def test_gradual_runs_on_a_decoder(unit, tiny_decoders, reviews, tmp_path, monkeypatch):
    monkeypatch.setenv("HEADLAB_HOME", str(tmp_path))
    assert main(["train", "--model", str(tiny_decoders["llama"]), "--data", str(reviews), "--method", "gradual",
                 "--unit", unit, "--steps", "6", "--interval", "2", "--target-sparsity", "0.4",
                 "--finetune-steps", "0", "--label-map", "pos=fresh,neg=rotten", *SMALL]) == 0
    run = RunStore().list()[0]
    assert run.status == "done", run.error
    back = load_pruned(run.result["export"])
    if unit == "weights":
        assert float((back.adapter.ffn_gate(0).weight == 0).float().mean()) == pytest.approx(0.4, abs=1e-3)
    else:
        assert sum(p.numel() for p in back.model.parameters()) < sum(
            p.numel() for p in load_model(str(tiny_decoders["llama"])).model.parameters())


def test_gradual_with_protected_roles_closes_role_free_heads_first(tiny, reviews, tmp_path):
    def closed_heads(protected=None) -> torch.Tensor:
        s = session(tiny, reviews, tmp_path, "gradual", 6, target_sparsity=0.4, unit="heads-ffn", interval=2,
                    updates=2)
        s.setup_gates()
        s.method.protected = protected  # the roles themselves are found by analysis.roles (tested there)
        while s.step < s.c.gate_steps:
            s.train_step()
            s.step += 1
        return s.current_state().head == 0

    plain = closed_heads()
    assert plain.any()
    protected = closed_heads(plain)  # protect exactly the heads the plain run closes
    assert protected.sum() == plain.sum() and not (protected & plain).any()  # as many closed, none of them
    with pytest.raises(ValueError, match="heads-ffn"):
        TrainConfig.build(model=str(tiny), data=str(reviews), method="gradual", protect_roles=True).check()
