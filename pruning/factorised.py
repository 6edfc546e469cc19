"""FLOP (Wang, Wohlwend, Lei, EMNLP 2020): factorised low-rank pruning of every Linear of the layers.

Each weight W (out, in) is written W = P diag(z) Q = sum_k z_k p_k q_k^T from its SVD (W = U S V^T, P = U sqrt(S),
Q = sqrt(S) V^T: Sigma split evenly, the paper's split is unverified), at full rank r = min(in, out) so the
factorised model starts exactly as the dense one (the paper's default r = in*out/(in+out) keeps the parameter count
but truncates a trained W). z are hard-concrete gates (`pruning.gates.HardConcreteGates`, beta 2/3 and
log_alpha ~ N(10, 0.01) as HeadLab's other gates start open, where FLOP's code uses beta 1 and N(0, 0.01) for
training from scratch), trained with the task loss and the augmented Lagrangian (`pruning.lagrangian`) on the
expected sparsity of the factorised weights, s-hat = 1 - sum E[#open](in + out) / sum in*out, with the target
ramped linearly. Eval: the round(r - E[#open]) smallest sigma(0.8 log_alpha / beta) are zeroed per matrix, the
others keep that value (CoFi's rule, as in FLOP's code).

`compact` folds the gates into P and keeps the k open components: a `core.lowrank.LowRankLinear` (two thin
GEMMs) where k (in + out) < in * out, else the dense product P Q as an nn.Linear; `pruning.export.save_pruned`
and `core.pruned.load_pruned` store and rebuild the thin layers. The method `flop` (`pruning.methods.flop`)
trains the gates in the loop (`pruning.loop`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from core.loaded import LoadedModel
from core.lowrank import LowRankLinear
from pruning.gates import HardConcreteGates


class FactorisedLinear(nn.Module):
    """y = ((x Q^T) * z) P^T + b: x (..., in) -> (..., out); P (out, r), Q (r, in), z (r,) from `gates` (sampled
    in train mode, deterministic in eval mode), all ones without gates."""

    def __init__(self, p: torch.Tensor, q: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features, self.rank = q.shape[1], p.shape[0], p.shape[1]
        self.p, self.q = nn.Parameter(p.detach().clone()), nn.Parameter(q.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self.gates: HardConcreteGates | None = HardConcreteGates((self.rank,))

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int | None = None) -> FactorisedLinear:
        """The SVD factorisation of `linear` at `rank` (default min(in, out): exact)."""
        w = linear.weight.detach().double()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        r = rank or s.numel()
        root = s[:r].sqrt()
        dtype = linear.weight.dtype
        return cls((u[:, :r] * root).to(dtype), (root[:, None] * vh[:r]).to(dtype), linear.bias)

    def z(self) -> torch.Tensor | None:
        return self.gates() if self.gates is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.q)
        z = self.z()
        return F.linear(h * z if z is not None else h, self.p, self.bias)

    def weight_product(self) -> torch.Tensor:
        """(out, in) P diag(z) Q with the deterministic gates (the dense weight this layer computes in eval)."""
        z = self.gates.deterministic() if self.gates is not None else torch.ones(self.rank)
        return (self.p * z) @ self.q

    def expected_open(self) -> torch.Tensor:
        """E[number of open components] (differentiable)."""
        return self.gates.prob_open().sum() if self.gates is not None else torch.tensor(float(self.rank))

    def kept_rank(self) -> int:
        """Components the deterministic gates keep (nonzero)."""
        return self.rank if self.gates is None else int((self.gates.deterministic() > 0).sum())

    def compact(self) -> nn.Module:
        """The k kept components, gates folded into P: an ungated FactorisedLinear of rank k when
        k (in + out) < in * out (a LowRankLinear: two thin GEMMs are cheaper), else the dense nn.Linear of
        P diag(z) Q."""
        with torch.no_grad():
            z = self.gates.deterministic() if self.gates is not None else torch.ones(self.rank)
            keep = torch.nonzero(z > 0).flatten()
            p, q = self.p[:, keep] * z[keep], self.q[keep]
            if len(keep) * (self.in_features + self.out_features) < self.in_features * self.out_features:
                return LowRankLinear.of(p, q, self.bias)
            dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
            dense.weight.copy_(p @ q)
            if self.bias is not None:
                dense.bias.copy_(self.bias)
            return dense


def layer_linears(loaded: LoadedModel) -> list[str]:
    """Module names of every Linear of the layers FLOP factorises: Q, K, V, attention output, FFN in (and a
    decoder's gate), FFN out."""
    a = loaded.adapter
    names = {id(m): n for n, m in loaded.model.named_modules()}
    out = []
    for layer in range(len(a.layers)):
        for m in (a.query(layer), a.key(layer), a.value(layer), a.attention_output(layer), a.ffn_in(layer),
                  a.ffn_gate(layer), a.ffn_out(layer)):
            if isinstance(m, nn.Linear):
                out.append(names[id(m)])
    return out


def factorise(model: nn.Module, names: list[str], rank: int | None = None) -> dict[str, FactorisedLinear]:
    """Replace the Linear modules `names` of `model` (in place) by gated SVD factorisations. Returns them."""
    layers = {}
    for name in names:
        layers[name] = FactorisedLinear.from_linear(model.get_submodule(name), rank)
        model.set_submodule(name, layers[name])
    return layers


def expected_sparsity(layers: dict[str, FactorisedLinear]) -> torch.Tensor:
    """s-hat = 1 - sum E[#open] (in + out) / sum in * out over the factorised matrices (differentiable)."""
    kept = sum(m.expected_open() * (m.in_features + m.out_features) for m in layers.values())
    total = sum(m.in_features * m.out_features for m in layers.values())
    return 1 - kept / total


def compact(model: nn.Module, layers: dict[str, FactorisedLinear]) -> dict[str, int]:
    """Swap every factorised layer `layers` of `model` for its `compact()` form (in place). Returns {name: kept
    rank, or -1 where the dense product was kept}."""
    ranks = {}
    for name, layer in layers.items():
        small = layer.compact()
        model.set_submodule(name, small)
        ranks[name] = small.rank if isinstance(small, LowRankLinear) else -1
    return ranks


def exported_sparsity(layers: dict[str, FactorisedLinear]) -> float:
    """1 - sum min(k (in + out), in * out) / sum in * out with the deterministic kept ranks k."""
    kept = sum(min(m.kept_rank() * (m.in_features + m.out_features), m.in_features * m.out_features)
               for m in layers.values())
    return 1 - kept / sum(m.in_features * m.out_features for m in layers.values())
