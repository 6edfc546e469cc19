"""Learnable hard-concrete gates (L0, Louizos et al. 2018) that produce a `pruning.gate_state.GateState`:

- `HardConcreteGates`: one tensor of gates, train-time sample, two eval-time rules (Voita, CoFi).
- `CoFiGates`: the five CoFi groups (Xia et al. 2022), `sample()` / `deterministic()` -> GateState.
- `L0HeadGates`: Voita et al. 2019, one gate per head only.

Why not `captum.module.BinaryConcreteStochasticGates`: it gates a given input tensor (one sample
per batch row) and has only 1-D gates, a fixed N(0, 0.01) init, no log_alpha clamp and only the
Voita eval rule. Here a gate value is needed *without* an input (hooks apply it inside the
model), one sample per step shared by the batch, per-group eval with CoFi's deterministic count,
and N(10, 0.01) init for groups that start open. The maths (stretch, P(z != 0)) is the same.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from core.adapter import GateShape
from pruning.gate_state import GROUPS, GateState

GAMMA, ZETA = -0.1, 1.1  # hard-concrete stretch interval
LOG_ALPHA_RANGE = (math.log(0.01), math.log(100.0))  # CoFi clamps log_alpha here after every step


# ----------------------------------------------------------------------------- hard-concrete gates


class HardConcreteGates(nn.Module):
    """A tensor of hard-concrete (stretched binary concrete) gates with learnable `log_alpha`.

    Train: u ~ U(eps, 1 - eps), s = sigmoid((log u - log(1 - u) + log_alpha) / beta),
    z = clamp(s (zeta - gamma) + gamma, 0, 1). Eval ("voita"): clamp(sigmoid(log_alpha)(zeta - gamma)
    + gamma, 0, 1). Eval ("cofi"): soft = sigmoid(0.8 log_alpha / beta), then in every group of
    `group_size` consecutive gates the round(n - E[#open]) smallest are set to 0, so the number kept
    is deterministic. `forward()` samples when training and is deterministic otherwise.

    Args:
        shape: shape of the gate tensor, e.g. (L, H).
        group_size: gates per group for the "cofi" rule (default: the last dimension, i.e. per layer
            for (L, n) gates; 1 makes every gate its own group, `numel` one group for all).
        beta: temperature (CoFi 2/3, Voita 0.33).
        init_mean, init_std: log_alpha ~ N(init_mean, init_std) (10 starts open, 0 undecided).
        eval_mode: "cofi" or "voita".
    """

    def __init__(self, shape: tuple[int, ...], *, group_size: int | None = None, beta: float = 2 / 3,
                 init_mean: float = 10.0, init_std: float = 0.01, eval_mode: str = "cofi", eps: float = 1e-6):
        super().__init__()
        if eval_mode not in ("cofi", "voita"):
            raise ValueError(f"The 'eval_mode' parameter must be 'cofi' or 'voita'. Got {eval_mode!r} instead.")
        if not 0 < beta < 1:
            raise ValueError(f"The 'beta' parameter must lie in (0, 1). Got {beta!r} instead.")
        shape = tuple(int(s) for s in shape)
        self.group_size = int(group_size or shape[-1])
        if math.prod(shape) % self.group_size:
            raise ValueError(f"group_size {self.group_size} does not divide the {math.prod(shape)} gates.")
        self.beta, self.eval_mode, self.eps = float(beta), eval_mode, float(eps)
        self.log_alpha = nn.Parameter(torch.empty(shape).normal_(init_mean, init_std))

    def sample(self) -> torch.Tensor:
        """One differentiable train-time sample z (shape of log_alpha), values in [0, 1]."""
        u = torch.empty_like(self.log_alpha).uniform_(self.eps, 1 - self.eps)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.beta)
        return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)

    def deterministic(self, mode: str | None = None) -> torch.Tensor:
        """Eval-time gates (no noise, no gradient) by `mode` ("cofi" / "voita", default `eval_mode`)."""
        mode = mode or self.eval_mode
        la = self.log_alpha.detach()
        if mode == "voita":
            return (torch.sigmoid(la) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)
        if mode != "cofi":
            raise ValueError(f"The 'mode' parameter must be 'cofi' or 'voita'. Got {mode!r} instead.")
        soft = torch.sigmoid(0.8 * la / self.beta).reshape(-1, self.group_size)  # (groups, n)
        expected_open = self.prob_open().detach().reshape(-1, self.group_size).sum(dim=1)  # (groups,)
        for g, open_ in enumerate(expected_open.tolist()):
            zeros = int(math.floor(self.group_size - open_ + 0.5))
            if zeros > 0:
                soft[g, torch.topk(soft[g], k=zeros, largest=False).indices] = 0.0
        return soft.reshape(la.shape)

    def forward(self) -> torch.Tensor:
        return self.sample() if self.training else self.deterministic()

    def prob_open(self) -> torch.Tensor:
        """P(z != 0) = sigmoid(log_alpha - beta log(-gamma / zeta)), differentiable, shape of log_alpha."""
        return torch.sigmoid(self.log_alpha - self.beta * math.log(-GAMMA / ZETA))

    @torch.no_grad()
    def clamp_(self, low: float = LOG_ALPHA_RANGE[0], high: float = LOG_ALPHA_RANGE[1]) -> None:
        """Clamp log_alpha in place to [low, high] (CoFi: after every optimizer step)."""
        self.log_alpha.clamp_(low, high)


class CoFiGates(nn.Module):
    """The five CoFi gate groups of an encoder, each a `HardConcreteGates`.

    Init (CoFi): log_alpha ~ N(10, 0.01) for head / mha / ffn / hidden (open), N(0, 0.01) for
    intermediate. Groups not in `groups` are not learned and stay fixed at 1.
    The CoFi eval rule keeps a deterministic count per layer for head and intermediate gates, per
    gate for mha and ffn, and over all dims for hidden.
    """

    def __init__(self, arch, *, groups: Iterable[str] = GROUPS, beta: float = 2 / 3, eval_mode: str = "cofi"):
        super().__init__()
        self.shape = GateShape.of(arch)
        self.groups = tuple(groups)
        unknown = set(self.groups) - set(GROUPS)
        if unknown:
            raise ValueError(f"The 'groups' parameter must name groups among {', '.join(GROUPS)}. "
                             f"Got {sorted(unknown)}.")
        s = self.shape
        spec = {"head": ((s.layers, s.heads), None, 10.0), "mha": ((s.layers,), 1, 10.0),
                "intermediate": ((s.layers, s.intermediate), None, 0.0), "ffn": ((s.layers,), 1, 10.0),
                "hidden": ((s.hidden,), None, 10.0)}
        self.gates = nn.ModuleDict({
            name: HardConcreteGates(size, group_size=group, beta=beta, init_mean=mean, eval_mode=eval_mode)
            for name, (size, group, mean) in spec.items() if name in self.groups
        })

    def _state(self, make) -> GateState:
        dense = GateState.dense(self.shape)
        return GateState(**{n: make(self.gates[n]) if n in self.gates else getattr(dense, n) for n in GROUPS})

    def sample(self) -> GateState:
        """A differentiable train-time sample of every learned group."""
        return self._state(lambda g: g.sample())

    def deterministic(self, mode: str | None = None) -> GateState:
        """Eval-time gates (detached); soft values in (0, 1] are meant to be folded by surgery."""
        return self._state(lambda g: g.deterministic(mode))

    def forward(self) -> GateState:
        return self.sample() if self.training else self.deterministic()

    def prob_open(self) -> GateState:
        """P(z != 0) of every gate as a (differentiable) GateState; fixed groups are 1."""
        return self._state(lambda g: g.prob_open())

    def clamp_(self) -> None:
        """Clamp every group's log_alpha to [ln 0.01, ln 100]."""
        for g in self.gates.values():
            g.clamp_()


class L0HeadGates(CoFiGates):
    """Voita et al. (2019): one hard-concrete gate per head (beta 0.33, Voita eval rule), others fixed at 1.

    Loss: L_task + lambda * `penalty()`, penalty = sum over heads of P(z_h != 0).
    """

    def __init__(self, arch, *, beta: float = 0.33, eval_mode: str = "voita"):
        super().__init__(arch, groups=("head",), beta=beta, eval_mode=eval_mode)

    def penalty(self) -> torch.Tensor:
        """Expected number of open heads, sum P(z != 0) (differentiable scalar)."""
        return self.gates["head"].prob_open().sum()
