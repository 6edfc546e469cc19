"""From per-unit scores to a `GateState` at a target sparsity, shared by the one-shot methods.

    closest_state      bisection on a keep fraction k in (0, 1] until the state's exact sparsity
                       (`pruning.size.exact_sparsity`, a fraction of the layers' weights) is closest to the target
    per_layer_state    keep round(k * H) heads and round(k * d_ff) FFN units in every layer (Wanda-sp)
    global_state       keep the round(k * N) best of all N heads and FFN units in one sort (FLAP's AL-AM)

Scores are "higher = more important"; ties keep the lower index first.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from core.adapter import GateShape
from pruning.gate_state import GateState
from pruning.size import SizeModel, exact_sparsity


def check_target(target, where: str) -> None:
    """ValueError unless `target` is a fraction in [0, 1)."""
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 <= target < 1:
        raise ValueError(f"The 'target' parameter of {where} must be a fraction in [0, 1). Got {target!r}.")


def closest_state(make: Callable[[float], GateState], target: float, sizes: SizeModel, shape: GateShape,
                  iterations: int = 30) -> GateState:
    """The state `make(k)` whose exact sparsity is closest to `target`, k found by bisection in [1e-4, 1]
    (`make` must close fewer units as k grows); the dense state if `target` is at or below its sparsity."""
    best, best_gap = None, float("inf")
    low, high = 1e-4, 1.0  # keep fraction; sparsity falls as keep grows
    for _ in range(iterations):
        mid = (low + high) / 2
        state = make(mid)
        sparsity = exact_sparsity(state, model=sizes)
        if abs(sparsity - target) < best_gap:
            best, best_gap = state, abs(sparsity - target)
        if sparsity > target:
            low = mid
        else:
            high = mid
    dense = GateState.dense(shape)
    return dense if target <= exact_sparsity(dense, model=sizes) else best


def top_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """0/1 float mask of the `k` largest entries of the 1-D `scores` (ties: lower index first)."""
    mask = torch.zeros(scores.numel())
    mask[torch.argsort(-scores.reshape(-1), stable=True)[:k]] = 1.0
    return mask.reshape(scores.shape)


def keep_count(keep: float, total: int, least: int = 1) -> int:
    """round(keep * total), clamped to [least, total]."""
    return max(least, min(total, int(keep * total + 0.5)))


def per_layer_state(shape: GateShape, heads: torch.Tensor, units: torch.Tensor, keep: float) -> GateState:
    """Keep the round(keep * H) best heads (`heads` (L, H)) and round(keep * d_ff) best units (`units`
    (L, d_ff)) of every layer, at least one of each."""
    h, u = keep_count(keep, shape.heads), keep_count(keep, shape.intermediate)
    return GateState.dense(shape).replace(head=torch.stack([top_mask(row, h) for row in heads]),
                                          intermediate=torch.stack([top_mask(row, u) for row in units]))


def global_state(shape: GateShape, heads: torch.Tensor, units: torch.Tensor, keep: float) -> GateState:
    """Keep the round(keep * N) best of all N = L * (H + d_ff) heads and units, ranked together (scores on
    one scale); a layer may lose all its heads or units (its sublayer then adds only its bias)."""
    flat = torch.cat([heads.reshape(-1), units.reshape(-1)]).float()
    mask = top_mask(flat, keep_count(keep, flat.numel()))
    n = heads.numel()
    return GateState.dense(shape).replace(head=mask[:n].reshape(heads.shape),
                                          intermediate=mask[n:].reshape(units.shape))
