"""Training backend: the Lagrangian controller, distillation losses, the training loop on tiny configs."""

from __future__ import annotations

import math

import pytest
import torch

from pruning.distill import LayerMatcher, align_layers, logit_kl, masked_mse, teacher_layers
from pruning.gates import CoFiGates, GateShape
from pruning.lagrangian import LagrangianController, TargetSchedule, lagrangian_loss
from pruning.size import expected_sparsity

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
    start = float(expected_sparsity(gates))
    for step in range(300):
        loss = controller(expected_sparsity(gates), schedule.at(step))
        descent.zero_grad()
        ascent.zero_grad()
        loss.backward()
        descent.step()
        ascent.step()
        gates.clamp_()
    end = float(expected_sparsity(gates))
    assert start < 0.2
    assert abs(end - target) < 0.02, (start, end)


# ----------------------------------------------------------------------------- distillation


def test_logit_kl_by_hand():
    # teacher logits / T = [ln 3, 0] -> p_t = [3/4, 1/4]; student [0, 0] -> p_s = [1/2, 1/2]
    teacher = torch.tensor([[2 * math.log(3.0), 0.0]])
    student = torch.zeros(1, 2, requires_grad=True)
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert float(logit_kl(student, teacher, 2.0)) == pytest.approx(4 * kl, rel=1e-6)
    assert float(logit_kl(teacher.clone(), teacher, 2.0)) == pytest.approx(0.0, abs=1e-7)
    # batch mean: a second identical row leaves the value unchanged
    assert float(logit_kl(student.repeat(2, 1), teacher.repeat(2, 1))) == pytest.approx(4 * kl, rel=1e-6)
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
    assert float(loss) == pytest.approx(0.25) and alignment == [0]
    loss, _ = matcher(s, t, mask=torch.tensor([[1, 0]]))
    assert float(loss) == pytest.approx(0.5)
    # W is learned: with W = [[1, 0], [1, 1]] the student maps exactly onto the teacher
    with torch.no_grad():
        matcher.transform.weight.copy_(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    assert float(matcher(s, t)[0]) == pytest.approx(0.0)
    # two student layers, the teacher's last layer equals the student's first: matched there
    two = LayerMatcher(hidden=2, layers=[1])
    loss, alignment = two([t[0], s[0]], [s[0], t[0]])
    assert alignment == [0] and float(loss) == pytest.approx(0.0)
    loss, alignment = two([t[0], s[0]], [s[0], t[0]], alive=torch.tensor([False, True]))
    assert alignment == [1] and float(loss) == pytest.approx(0.25)
