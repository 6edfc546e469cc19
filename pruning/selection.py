"""Which heads and FFN units a one-shot method keeps at a keep fraction k, from its scores (higher = more
important; ties keep the lower index first). `pruning.sparsity_search.closest_state` then finds the k
whose exact sparsity is closest to the target.

    per_layer_state    round(k * H) heads and round(k * d_ff) FFN units in every layer (Wanda-sp)
    global_state       the round(k * N) best of all N heads and FFN units, ranked in one sort (FLAP's AL-AM)
"""

from __future__ import annotations

import torch

from core.adapter import GateShape
from pruning.gate_state import GateState
from pruning.sparsity_search import keep_count, keep_mask


def per_layer_state(shape: GateShape, heads: torch.Tensor, units: torch.Tensor, keep: float) -> GateState:
    """Keep the round(keep * H) best heads (`heads` (L, H)) and round(keep * d_ff) best units (`units`
    (L, d_ff)) of every layer, at least one of each."""
    h, u = keep_count(keep, shape.heads), keep_count(keep, shape.intermediate)
    return GateState.dense(shape).replace(head=torch.stack([keep_mask(row, h) for row in heads]),
                                          intermediate=torch.stack([keep_mask(row, u) for row in units]))


def global_state(shape: GateShape, heads: torch.Tensor, units: torch.Tensor, keep: float) -> GateState:
    """Keep the round(keep * N) best of all N = L * (H + d_ff) heads and units, ranked together (scores on
    one scale); a layer may lose all its heads or units (its sublayer then adds only its bias)."""
    flat = torch.cat([heads.reshape(-1), units.reshape(-1)]).float()
    mask = keep_mask(flat, keep_count(keep, flat.numel()))
    n = heads.numel()
    return GateState.dense(shape).replace(head=mask[:n].reshape(heads.shape),
                                          intermediate=mask[n:].reshape(units.shape))
