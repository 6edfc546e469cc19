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

`compact` folds the gates into P and keeps the k open components: two thin matrices (a FactorisedLinear without
gates: x Q^T then P^T, two GEMMs) where k (in + out) < in * out, else the dense product P Q as an nn.Linear.
`save_factorised` / `load_factorised`: the pruned-model folder (`pruning.export.save_pruned`) with the thin
matrices in factorised.safetensors (`<module>.p` (out, k), `<module>.q` (k, in), `<module>.bias`) instead of
model.safetensors; loading rebuilds the FactorisedLinear modules.

Not wired into the training loop (`pruning.loop`): its eval snapshots, surgery and export read nn.Linear weights;
`train_flop` runs the gate phase on its own.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from core.loaded import LoadedModel
from pruning.export import save_pruned
from pruning.gates import HardConcreteGates
from pruning.kmeans_share import WEIGHTS_FILE, load_with_weights
from pruning.lagrangian import LagrangianController, TargetSchedule

FACTORISED_FILE = "factorised.safetensors"


class FactorisedLinear(nn.Module):
    """y = ((x Q^T) * z) P^T + b: x (..., in) -> (..., out); P (out, r), Q (r, in), z (r,) from `gates` (sampled
    in train mode, deterministic in eval mode), all ones without gates."""

    def __init__(self, p: torch.Tensor, q: torch.Tensor, bias: torch.Tensor | None, gated: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.rank = q.shape[1], p.shape[0], p.shape[1]
        self.p, self.q = nn.Parameter(p.detach().clone()), nn.Parameter(q.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self.gates = HardConcreteGates((self.rank,)) if gated else None

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
        k (in + out) < in * out (two thin GEMMs are cheaper), else the dense nn.Linear of P diag(z) Q."""
        with torch.no_grad():
            z = self.gates.deterministic() if self.gates is not None else torch.ones(self.rank)
            keep = torch.nonzero(z > 0).flatten()
            p, q = self.p[:, keep] * z[keep], self.q[keep]
            if len(keep) * (self.in_features + self.out_features) < self.in_features * self.out_features:
                return FactorisedLinear(p, q, self.bias, gated=False)
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


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def factorise(model: nn.Module, names: list[str], rank: int | None = None) -> dict[str, FactorisedLinear]:
    """Replace the Linear modules `names` of `model` (in place) by gated SVD factorisations. Returns them."""
    layers = {}
    for name in names:
        layers[name] = FactorisedLinear.from_linear(model.get_submodule(name), rank)
        _set(model, name, layers[name])
    return layers


def expected_sparsity(layers: dict[str, FactorisedLinear]) -> torch.Tensor:
    """s-hat = 1 - sum E[#open] (in + out) / sum in * out over the factorised matrices (differentiable)."""
    kept = sum(m.expected_open() * (m.in_features + m.out_features) for m in layers.values())
    total = sum(m.in_features * m.out_features for m in layers.values())
    return 1 - kept / total


def compact(model: nn.Module, layers: dict[str, FactorisedLinear]) -> dict[str, int]:
    """Swap every factorised layer of `model` for its `compact()` form (in place). Returns {name: kept rank,
    or -1 where the dense product was kept}."""
    ranks = {}
    for name, layer in layers.items():
        small = layer.compact()
        _set(model, name, small)
        ranks[name] = small.rank if isinstance(small, FactorisedLinear) else -1
    return ranks


@dataclass
class FlopResult:
    """What `train_flop` reached: the expected and the exported sparsity of the factorised matrices (exported
    counts min(k (in + out), in * out) per matrix), the kept rank per matrix, the multipliers."""

    expected_sparsity: float
    exported_sparsity: float
    ranks: dict[str, int]
    lambdas: tuple[float, float]


def exported_sparsity(layers: dict[str, FactorisedLinear]) -> float:
    """1 - sum min(k (in + out), in * out) / sum in * out with the deterministic kept ranks k."""
    kept = sum(min(m.kept_rank() * (m.in_features + m.out_features), m.in_features * m.out_features)
               for m in layers.values())
    return 1 - kept / sum(m.in_features * m.out_features for m in layers.values())


def train_flop(loaded: LoadedModel, batches: list[tuple[dict[str, torch.Tensor], torch.Tensor]], target: float, *,
               steps: int, warmup: int = 0, lr: float = 2e-5, gate_lr: float = 0.1, lambda_lr: float = 0.1,
               rank: int | None = None) -> tuple[dict[str, FactorisedLinear], FlopResult]:
    """FLOP's gate phase on `loaded.model` (changed in place: its layer Linears factorised): `steps` steps cycling
    over `batches` ((inputs, class ids)) of CE + the Lagrangian on s-hat towards `target` (ramped over `warmup`).
    The model's weights (P, Q, biases, everything else) by Adam at `lr`, the gates' log_alpha at `gate_lr`, the
    multipliers by ascent at `lambda_lr`. Returns the factorised layers (still gated; `compact` them) and figures."""
    model = loaded.model
    layers = factorise(model, layer_linears(loaded), rank)
    gates = [m.gates.log_alpha for m in layers.values()]
    weights = [p for p in model.parameters() if all(p is not g for g in gates)]
    controller, schedule = LagrangianController(), TargetSchedule(target, warmup=warmup)
    optimisers = [torch.optim.Adam(weights, lr=lr), torch.optim.Adam(gates, lr=gate_lr),
                  controller.optimizer(lambda_lr)]
    model.train()
    for step in range(steps):
        inputs, labels = batches[step % len(batches)]
        loss = F.cross_entropy(model(**inputs).logits, labels) + controller(expected_sparsity(layers),
                                                                          schedule.at(step))
        for opt in optimisers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in optimisers:
            opt.step()
        for m in layers.values():
            m.gates.clamp_()
    model.eval()
    with torch.no_grad():
        figures = FlopResult(float(expected_sparsity(layers)), exported_sparsity(layers),
                             {n: m.kept_rank() for n, m in layers.items()}, controller.values())
    return layers, figures


# ----------------------------------------------------------------------------- saving


def save_factorised(loaded: LoadedModel, out: str | Path, **kwargs) -> Path:
    """Save the pruned `loaded` whose model holds compact (ungated) FactorisedLinear modules: `save_pruned`'s
    folder (keyword arguments passed on) with their P, Q and bias in factorised.safetensors (ranks in its metadata)
    and the other tensors in model.safetensors."""
    model = loaded.model
    thin = {n: m for n, m in model.named_modules() if isinstance(m, FactorisedLinear)}
    if any(m.gates is not None for m in thin.values()):
        raise ValueError("save_factorised() needs compact layers: call pruning.factorised.compact() first.")
    for name, layer in thin.items():  # save_pruned writes the architecture's shapes: a dense stand-in first
        stand_in = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        with torch.no_grad():
            stand_in.weight.copy_(layer.p @ layer.q)
            if layer.bias is not None:
                stand_in.bias.copy_(layer.bias)
        _set(model, name, stand_in)
    try:
        out = save_pruned(loaded, out, **kwargs)
    finally:
        for name, layer in thin.items():
            _set(model, name, layer)
    weights = load_file(str(out / WEIGHTS_FILE))
    tensors = {}
    for name, layer in thin.items():
        for part in ("weight", "bias"):
            weights.pop(f"{name}.{part}", None)
        tensors[f"{name}.p"], tensors[f"{name}.q"] = layer.p.detach().contiguous(), layer.q.detach().contiguous()
        if layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias.detach().contiguous()
    ranks = json.dumps({name: layer.rank for name, layer in thin.items()})
    for file, content, meta in ((FACTORISED_FILE, tensors, {"ranks": ranks}), (WEIGHTS_FILE, weights, {})):
        partial = out / f".{file}.partial"
        save_file(content, str(partial), metadata={"format": "pt", **meta})
        os.replace(partial, out / file)
    return out


def load_factorised(folder: str | Path) -> LoadedModel:
    """Load a folder `save_factorised` wrote, its factorised layers as FactorisedLinear (P, Q of the saved rank)."""
    folder = Path(folder).expanduser()
    thin = load_file(str(folder / FACTORISED_FILE))
    names = sorted({k.rsplit(".", 1)[0] for k in thin})
    weights = load_file(str(folder / WEIGHTS_FILE))
    for name in names:  # the dense stand-ins load_pruned expects, replaced right after
        weights[f"{name}.weight"] = thin[f"{name}.p"] @ thin[f"{name}.q"]
        if f"{name}.bias" in thin:
            weights[f"{name}.bias"] = thin[f"{name}.bias"]
    loaded = load_with_weights(folder, weights, skip=(FACTORISED_FILE,))
    for name in names:
        _set(loaded.model, name, FactorisedLinear(thin[f"{name}.p"], thin[f"{name}.q"], thin.get(f"{name}.bias"),
                                                  gated=False))
    return loaded
