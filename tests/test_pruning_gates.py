"""Gate states, hard-concrete gates and CoFi's expected size (no model forward needed, fast)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from core.models import load_model
from pruning.gates import CoFiGates, GateShape, GateState, HardConcreteGates, L0HeadGates
from pruning.size import exact_sparsity, expected_sparsity, prunable_size, remaining_size

SHAPE = GateShape(layers=2, heads=4, head_dim=8, intermediate=64, hidden=32)  # the tiny test model


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_model(str(tiny_dir))


# ----------------------------------------------------------------------------- GateState


def test_dense_state_has_the_model_shape(tiny):
    state = GateState.dense(tiny)
    assert GateShape.of(tiny) == SHAPE
    assert state.shape == (2, 4, 64, 32)
    assert state.is_dense() and state.is_binary()
    assert state.counts() == {"head": (8, 8), "mha": (2, 2), "intermediate": (128, 128), "ffn": (2, 2),
                              "hidden": (32, 32)}


def test_closed_heads_round_trip_and_equality():
    state = GateState.from_closed_heads(SHAPE, [(0, 1), (1, 3)])
    assert state.closed_heads() == [(0, 1), (1, 3)]
    assert state.counts()["head"] == (6, 8)
    assert state == GateState.from_closed_heads(SHAPE, [(1, 3), (0, 1)])
    assert state != GateState.dense(SHAPE)
    assert GateState.from_json(state.to_json()) == state


def test_soft_values_survive_json_exactly():
    torch.manual_seed(0)
    dense = GateState.dense(SHAPE)
    soft = dense.replace(head=torch.rand(2, 4), hidden=torch.rand(32))
    back = GateState.from_json(soft.to_json())
    assert back == soft and not back.is_binary()


@pytest.mark.parametrize("pairs, message", [([(2, 0)], "2:0 does not exist"), ([(0, 4)], "0:4 does not exist"),
                                            ([(-1, 0)], "does not exist")])
def test_out_of_range_heads_are_refused(pairs, message):
    with pytest.raises(ValueError, match=message):
        GateState.from_closed_heads(SHAPE, pairs)


@pytest.mark.parametrize("group, value, message", [
    ("head", np.full((2, 4), 1.5), r"in \[0, 1\]"),
    ("hidden", np.full(32, np.nan), "finite"),
    ("mha", np.ones(3), "2 layers"),
    ("intermediate", np.ones(64), "2 dimension"),
])
def test_bad_gate_values_are_refused(group, value, message):
    data = GateState.dense(SHAPE).to_dict()
    data[group] = value.tolist()
    with pytest.raises(ValueError, match=message):
        GateState.from_dict(data)


def test_from_dict_names_missing_group():
    data = GateState.dense(SHAPE).to_dict()
    del data["ffn"]
    with pytest.raises(ValueError, match="ffn"):
        GateState.from_dict(data)
    with pytest.raises(ValueError, match="not valid JSON"):
        GateState.from_json("{")


def test_ffn_keep_by_magnitude_keeps_the_largest_units(tiny):
    adapter = tiny.adapter
    with torch.no_grad():
        saved = adapter.ffn_out(1).weight[:, 5].clone()
        adapter.ffn_out(1).weight[:, 5] *= 100  # unit 5 of layer 1 becomes the largest
    try:
        state = GateState.dense(tiny).with_ffn_keep(adapter, 0.25)
    finally:
        with torch.no_grad():
            adapter.ffn_out(1).weight[:, 5] = saved
    assert state.counts()["intermediate"] == (32, 128)
    assert (state.intermediate.sum(dim=1) == 16).all()  # the same count in every layer
    assert state.intermediate[1, 5] == 1


def test_hidden_and_head_keep_counts_and_random_is_seeded(tiny):
    dense = GateState.dense(tiny)
    assert dense.with_hidden_keep(tiny.adapter, 0.75).counts()["hidden"] == (24, 32)
    assert dense.with_head_keep(tiny.adapter, 0.5).counts()["head"] == (4, 8)
    a = dense.with_hidden_keep(tiny.adapter, 0.5, criterion="random", seed=3)
    assert a == dense.with_hidden_keep(tiny.adapter, 0.5, criterion="random", seed=3)
    assert a != dense.with_hidden_keep(tiny.adapter, 0.5, criterion="random", seed=4)


@pytest.mark.parametrize("frac", [0, -0.1, 1.5, "half", True])
def test_keep_fraction_must_lie_in_unit_interval(tiny, frac):
    with pytest.raises(ValueError, match=r"fraction in \(0, 1\]"):
        GateState.dense(tiny).with_ffn_keep(tiny.adapter, frac)


def test_unknown_criterion_is_named(tiny):
    with pytest.raises(ValueError, match="magnitude, random"):
        GateState.dense(tiny).with_hidden_keep(tiny.adapter, 0.5, criterion="taylor")


# ----------------------------------------------------------------------------- hard-concrete


def test_prob_open_formula_and_sample_range():
    gates = HardConcreteGates((3, 5), init_mean=0.0)
    with torch.no_grad():
        gates.log_alpha.copy_(torch.linspace(-3, 3, 15).view(3, 5))
    expected = torch.sigmoid(gates.log_alpha - (2 / 3) * math.log(0.1 / 1.1))
    assert torch.allclose(gates.prob_open(), expected)
    torch.manual_seed(0)
    z = torch.stack([gates.sample() for _ in range(2000)])
    assert z.min() >= 0 and z.max() <= 1
    # empirical P(z != 0) matches the closed form
    assert torch.allclose((z > 0).float().mean(0), expected, atol=0.04)


def test_sample_is_differentiable():
    gates = HardConcreteGates((4,), init_mean=0.0)
    gates.sample().sum().backward()
    assert gates.log_alpha.grad is not None and gates.log_alpha.grad.abs().sum() > 0


def test_voita_eval_rule():
    gates = HardConcreteGates((3,), eval_mode="voita")
    with torch.no_grad():
        gates.log_alpha.copy_(torch.tensor([-5.0, 0.0, 5.0]))
    gates.eval()
    z = gates()
    assert z[0] == 0 and z[2] == 1
    assert z[1] == pytest.approx(0.5 * 1.2 - 0.1)


def test_cofi_eval_keeps_a_deterministic_count_per_group():
    gates = HardConcreteGates((2, 10), beta=2 / 3)
    with torch.no_grad():
        gates.log_alpha.copy_(torch.tensor([[5.0] * 7 + [-5.0] * 3, [0.3] * 10]))
    z = gates.deterministic()
    expected_open = gates.prob_open().detach().sum(dim=1)
    zeros = (z == 0).sum(dim=1)
    assert zeros.tolist() == [round(10 - e) for e in expected_open.tolist()]
    assert zeros[0] == 3 and (z[0, :7] > 0.99).all()
    kept = z[1][z[1] > 0]
    assert torch.allclose(kept, torch.sigmoid(torch.tensor(0.8 * 0.3 / (2 / 3))))


def test_clamp():
    gates = HardConcreteGates((2,))
    gates.clamp_()
    assert torch.allclose(gates.log_alpha, torch.full((2,), math.log(100.0)))


def test_cofi_gates_init_and_state():
    gates = CoFiGates(SHAPE)
    assert gates.gates["head"].log_alpha.mean().item() == pytest.approx(10, abs=0.05)
    assert gates.gates["intermediate"].log_alpha.mean().item() == pytest.approx(0, abs=0.05)
    gates.eval()
    state = gates()
    assert state.shape == (2, 4, 64, 32)
    assert state.counts()["head"] == (8, 8) and state.counts()["hidden"] == (32, 32)
    # int gates start at P(open) = sigmoid(0 - 2/3 ln(1/11)) = 0.83: ~17% closed per layer
    assert 0.7 < state.counts()["intermediate"][0] / 128 < 0.95
    gates.train()
    sample = gates.sample()
    assert sample.head.requires_grad


def test_l0_head_gates_learn_heads_only():
    gates = L0HeadGates(SHAPE)
    assert set(gates.gates) == {"head"}
    assert gates.gates["head"].beta == pytest.approx(0.33)
    state = gates.sample()
    assert state.head.requires_grad
    assert torch.equal(state.intermediate, torch.ones(2, 64))
    assert gates.penalty().item() == pytest.approx(8, abs=1e-3)


# ----------------------------------------------------------------------------- expected size


def test_expected_size_hand_computed():
    # L=1, H=2, d=4 (d_h=2), d_ff=3
    z = GateState(head=[[0.5, 1.0]], mha=[1.0], intermediate=[[1.0, 0.0, 0.5]], ffn=[1.0],
                  hidden=[1.0, 1.0, 0.5, 0.5])
    # attention: 4 * d_h * sum(hid) * sum(mha*head) = 4*2*3*1.5 = 36; FFN: 2 * 3 * 1.5 = 9
    assert remaining_size(z).item() == pytest.approx(45)
    # M = L(4d^2 + 4d) + L(2 d d_ff + 5d) = (64 + 16) + (24 + 20) = 124
    assert prunable_size(1, 4, 3) == 124
    assert expected_sparsity(z).item() == pytest.approx(1 - 45 / 124)
    # exact sparsity counts every non-zero gate as kept: S = 4*2*4*2 + 2*4*2 = 64 + 16 = 80
    assert exact_sparsity(z) == pytest.approx(1 - 80 / 124)


def test_dense_sparsity_is_only_the_bias_share():
    shape = GateShape(layers=6, heads=12, head_dim=32, intermediate=1536, hidden=384)  # MiniLM-L6
    s = exact_sparsity(GateState.dense(shape))
    assert 0 < s < 0.01


def test_expected_sparsity_of_learnable_gates_is_differentiable():
    gates = CoFiGates(SHAPE)
    sparsity = expected_sparsity(gates)
    sparsity.backward()
    assert gates.gates["intermediate"].log_alpha.grad is not None
