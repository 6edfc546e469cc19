"""The keep fraction whose structure's exact sparsity is closest to a target: the search every one-shot
method that scores units and keeps a fraction of them shares.

`closest_state(build, sizes, target)` bisects on the keep fraction k in (0, 1]: `build(k)` is the
method's `GateState` keeping about k of its prunable units (`keep_count`, `keep_mask`: the top units;
the sparsity falls as k grows), measured by `pruning.size.exact_sparsity` with the model's size model.
Counts are discrete, so the closest state seen is returned; a target at or below the dense model's
sparsity gives the dense state.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from pruning.gate_state import GateState
from pruning.size import SizeModel, exact_sparsity


def check_target(target: float, where: str) -> None:
    """ValueError unless `target` is a fraction in [0, 1)."""
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 <= target < 1:
        raise ValueError(f"The 'target' parameter of {where} must be a fraction in [0, 1). Got {target!r} instead.")


def keep_count(keep: float, total: int, least: int = 1) -> int:
    """round(keep * total) clamped to [least, total] (half rounds up, as `pruning.gate_state`)."""
    return max(least, min(total, int(math.floor(keep * total + 0.5))))


def keep_mask(scores: torch.Tensor, count: int) -> torch.Tensor:
    """0/1 float mask of the `count` largest entries of `scores` (any shape; ties: lower index first)."""
    order = torch.argsort(-scores.reshape(-1), stable=True)[:count]
    mask = torch.zeros(scores.numel())
    mask[order] = 1.0
    return mask.reshape(scores.shape)


def closest_state(build: Callable[[float], GateState], sizes: SizeModel, target: float,
                  iterations: int = 30) -> GateState:
    """The state `build(k)` (k in (0, 1]) whose exact sparsity is closest to `target` (a fraction)."""
    check_target(target, "closest_state()")
    dense = build(1.0)
    if target <= exact_sparsity(dense, model=sizes):
        return dense
    best, best_gap = dense, float("inf")
    low, high = 1e-4, 1.0  # sparsity falls as the keep fraction grows
    for _ in range(iterations):
        mid = (low + high) / 2
        state = build(mid)
        sparsity = exact_sparsity(state, model=sizes)
        if abs(sparsity - target) < best_gap:
            best, best_gap = state, abs(sparsity - target)
        if sparsity > target:
            low = mid
        else:
            high = mid
    return best
