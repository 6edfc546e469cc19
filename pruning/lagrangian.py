"""CoFi's Lagrangian controller: drive the expected sparsity s-hat to a target t (Xia et al. 2022).

    L_c = lambda_1 (s-hat - t) + lambda_2 (s-hat - t)^2

The model and the gates' log_alpha *minimise* L_c (with the task or distillation loss); lambda_1 and
lambda_2 *maximise* it (gradient ascent: `LagrangianController.optimizer` is an Adam with
`maximize=True`, CoFi's "negative learning rate"). While s-hat < t, lambda_1 turns negative, and the
gates are pushed to close; lambda_2 only grows, penalising any gap in either direction.

The target ramps linearly (`TargetSchedule`): 0 during a short plain fine-tune (CoFi: 100 steps),
then 0 -> final over a warm-up, then held. s-hat comes from `pruning.size.expected_sparsity`.
A final target of 0 never starts pruning: there is nothing to remove, and gates trained towards it
would still close units (s-hat cannot reach 0: the FFN unit gates start at P(open) = 0.83, and
log_alpha's clamp at ln 100 leaves every gate P(closed) >= 0.2%, which CoFi's deterministic count
rounds up to closed units in wide groups), so the model stays whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class TargetSchedule:
    """Target sparsity (fraction) at each optimizer step (0-based).

    `start`: steps of plain fine-tuning before pruning starts (target 0, no Lagrangian);
    `warmup`: steps over which the target rises linearly from 0 to `final`; afterwards `final`.
    With `final` 0 pruning never starts (every step is plain fine-tuning).
    """

    final: float
    start: int = 0
    warmup: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.final, bool) or not isinstance(self.final, (int, float)) or not 0 <= self.final < 1:
            raise ValueError(f"The 'final' parameter of TargetSchedule must be a fraction in [0, 1). "
                             f"Got {self.final!r} instead.")
        for name in ("start", "warmup"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"The '{name}' parameter of TargetSchedule must be an integer >= 0. "
                                 f"Got {value!r} instead.")

    def pruning(self, step: int) -> bool:
        """True once pruning has started (step >= start) towards a final target above 0."""
        return self.final > 0 and step >= self.start

    def at(self, step: int) -> float:
        """Target at `step`: 0 before `start`, then linear to `final` over `warmup` steps (step start+warmup
        and later give `final`)."""
        if step < self.start:
            return 0.0
        if self.warmup == 0:
            return float(self.final)
        return float(self.final) * min(1.0, (step - self.start + 1) / self.warmup)


def lagrangian_loss(expected: torch.Tensor, target: float, lambda_1: torch.Tensor,
                    lambda_2: torch.Tensor) -> torch.Tensor:
    """L_c = lambda_1 (expected - target) + lambda_2 (expected - target)^2 (a scalar tensor).

    `expected` is the differentiable expected sparsity s-hat (fraction), `target` t (fraction).
    """
    gap = expected - target
    return lambda_1 * gap + lambda_2 * gap * gap


class LagrangianController(nn.Module):
    """The two Lagrange multipliers (scalars, start at 0) and their ascent optimizer.

        controller = LagrangianController()
        ascent = controller.optimizer(lr=0.05)
        loss = task_loss + controller(expected_sparsity(gates), schedule.at(step))
        loss.backward(); gate_opt.step(); ascent.step()

    Keep `controller.parameters()` out of the model's (descent) optimizer.
    """

    def __init__(self) -> None:
        super().__init__()
        self.lambda_1 = nn.Parameter(torch.zeros(()))
        self.lambda_2 = nn.Parameter(torch.zeros(()))

    def forward(self, expected: torch.Tensor, target: float) -> torch.Tensor:
        """L_c for expected sparsity `expected` (differentiable scalar) and target `target` (fraction)."""
        return lagrangian_loss(expected, target, self.lambda_1, self.lambda_2)

    def optimizer(self, lr: float) -> torch.optim.Optimizer:
        """Adam *maximising* L_c over lambda_1, lambda_2 (gradient ascent), learning rate `lr` > 0."""
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise ValueError(f"The 'lr' parameter of LagrangianController.optimizer() must be > 0. Got {lr!r}.")
        return torch.optim.Adam(self.parameters(), lr=lr, maximize=True)

    def values(self) -> tuple[float, float]:
        """(lambda_1, lambda_2) as floats, for logging."""
        return float(self.lambda_1.detach()), float(self.lambda_2.detach())


class LagrangianFigures:
    """What a method trained towards a ramped target by a `LagrangianController` reports (CoFi, FLOP): its
    target and multipliers. The method holds `schedule` (a `TargetSchedule`) and `controller`."""

    schedule: TargetSchedule
    controller: LagrangianController

    def target(self, step: int) -> float | None:
        return self.schedule.at(max(0, step - 1))

    def record(self, step: int) -> dict[str, float | None]:
        lambda_1, lambda_2 = self.controller.values()
        return {"lambda_1": lambda_1, "lambda_2": lambda_2}
