"""Low-rank layers: a Linear stored as two thin matrices, y = (x Q^T) P^T + b, what FLOP (Wang et al. 2020,
`pruning.factorised`) exports where k (in + out) < in * out makes two GEMMs cheaper than one.

`LowRankLinear` has the `in_features` / `out_features` of the Linear it replaces and its `rank` k: code that
reads a layer's shape (`core.adapter.GateShape`, `core.size.encoder_flops`, `LoadedModel.architecture`) reads
those, so a model holding low-rank layers is measured like any other. `pruning.export.save_pruned` lists them
in pruning.json (`low_rank`: module name -> rank, their P, Q, bias in model.safetensors under
`<name>.p`, `<name>.q`, `<name>.bias`) and `core.pruned.load_pruned` rebuilds them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LowRankLinear(nn.Module):
    """x (..., in) -> (..., out) through P (out, k) and Q (k, in), plus bias (out,) when given."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.p = nn.Parameter(torch.empty(out_features, rank))
        self.q = nn.Parameter(torch.empty(rank, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def of(cls, p: torch.Tensor, q: torch.Tensor, bias: torch.Tensor | None) -> LowRankLinear:
        layer = cls(q.shape[1], p.shape[0], p.shape[1], bias is not None)
        with torch.no_grad():
            layer.p.copy_(p)
            layer.q.copy_(q)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.q), self.p, self.bias)

    def weight_count(self) -> int:
        """Entries of P and Q: k (in + out)."""
        return self.rank * (self.in_features + self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def weight_count(module: nn.Module) -> int:
    """Weight entries of a Linear (in * out) or a low-rank layer (k (in + out)): what it multiplies per token."""
    count = getattr(module, "weight_count", None)
    return count() if callable(count) else module.in_features * module.out_features


def low_rank_names(model: nn.Module) -> dict[str, int]:
    """Module name -> rank of every LowRankLinear in `model`."""
    return {name: m.rank for name, m in model.named_modules() if isinstance(m, LowRankLinear)}


def rebuild_low_rank(model: nn.Module, ranks: dict[str, int]) -> None:
    """Swap the Linear modules `ranks` names for empty LowRankLinear of those ranks (in place; weights to load).
    ValueError for a name that is no Linear of `model` or a rank that is no positive integer."""
    for name, rank in ranks.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            old = None
        if not isinstance(old, nn.Linear) or isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"low_rank names {name!r} (rank {rank!r}): not a Linear of the model with a rank >= 1")
        model.set_submodule(name, LowRankLinear(old.in_features, old.out_features, int(rank), old.bias is not None))


def low_rank_sparsity(adapter) -> float | None:
    """1 - sum weight_count / sum in * out over every layer's Q, K, V, attention output and FFN matrices of the
    model `adapter` reads, if any of them is low-rank (else None: the gate structure says it all)."""
    parts = ("query", "key", "value", "attention_output", "ffn_in", "ffn_gate", "ffn_out")
    modules = [m for layer in range(len(adapter.layers)) for m in (adapter.part(layer, p) for p in parts)
               if m is not None]
    if not any(isinstance(m, LowRankLinear) for m in modules):
        return None
    return 1 - sum(min(weight_count(m), m.in_features * m.out_features) for m in modules) / sum(
        m.in_features * m.out_features for m in modules)
