"""Structured Optimal Brain Surgeon (OBS) for one linear layer, as ZipLM (Kurtic, Frantar, Alistarh 2023)
and OBC / SparseGPT use it: remove groups of input columns one at a time and update the remaining
weights so that the layer's output on the calibration inputs changes as little as possible.

For a layer y = W x with weight W (out, in) and calibration inputs X (N, in) (N tokens), the Hessian of
the reconstruction error ||W Xᵀ − W' Xᵀ||² with respect to each row of W' is H = 2 XᵀX (in, in). A
structure M is a set of `size` consecutive input columns (a head's d_head columns of the attention
output projection, or one FFN unit's column of the FFN output projection). Then

    saliency   ρ_M = Σ_i W_{i,M} ((H⁻¹)_{M,M})⁻¹ W_{i,M}ᵀ
    update     δW  = −W_{:,M} ((H⁻¹)_{M,M})⁻¹ (H⁻¹)_{M,:}          (zeroes W_{:,M}, moves the rest)
    inverse    H⁻¹ ← H⁻¹ − H⁻¹_{:,M} ((H⁻¹)_{M,M})⁻¹ H⁻¹_{M,:}    (the inverse on the columns left)

and the least-squares error the removal adds is ρ_M / 2 (with H = 2 XᵀX undamped: the update is the
exact least-squares refit of the remaining columns). The structure of lowest ρ goes first; repeating
gives the layer's solution at every count of removed structures.

Dampening: H + λ·mean(diag H)·I with λ = `damp` (0.01 by default, SparseGPT's and OBC's `percdamp` /
ZipLM's `rel_damp`) before inverting, so a rank-deficient Gram (fewer tokens than columns, dead
features) stays invertible. Input columns that never fire (diag H = 0) get a unit diagonal first, as
in the authors' code. Everything runs in float64.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

DAMP = 0.01  # λ: relative dampening of the Hessian's diagonal


@dataclass
class ObsPath:
    """One layer's OBS solutions: `order[k]` is the k-th structure removed (indices of `size`-column
    groups), `errors[k]` the predicted reconstruction error after removing k structures (ρ/2 summed,
    in squared output units summed over the calibration tokens; errors[0] = 0), `weights[k]` the updated
    weight (out, in) after k removals, for the counts asked for (float64, removed columns zero)."""

    size: int
    order: list[int]
    errors: torch.Tensor  # (count + 1,) float64, non-decreasing
    weights: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def count(self) -> int:
        """Structures in the layer (in // size)."""
        return len(self.order)

    def removed(self, k: int) -> list[int]:
        """The structures removed after k steps."""
        return sorted(self.order[:k])


def hessian(gram: torch.Tensor) -> torch.Tensor:
    """H = 2 XᵀX (in, in) from the Gram matrix XᵀX (`pruning.calibration.InputStats.gram`)."""
    return 2.0 * gram.double()


def dampened(h: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """H + damp·mean(diag H)·I (in, in) float64, dead inputs (diag 0) given a unit diagonal first."""
    h = h.double().clone()
    diag = torch.diagonal(h)
    diag[diag == 0] = 1.0
    diag += damp * diag.mean()
    return h


def dampened_inverse(h: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """The inverse of `dampened(h, damp)`."""
    return torch.cholesky_inverse(torch.linalg.cholesky(dampened(h, damp)))


def saliencies(w: torch.Tensor, hinv: torch.Tensor, size: int,
               alive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ρ of every structure listed in `alive` (K,) and the matching ((H⁻¹)_{M,M})⁻¹ blocks (K, size, size):
    w (out, in), hinv (in, in)."""
    if size == 1:  # single columns: the blocks are the diagonal (no batched inverse)
        inverse = 1.0 / torch.diagonal(hinv)[alive]
        return (w[:, alive] ** 2).sum(0) * inverse, inverse.view(-1, 1, 1)
    count = hinv.shape[0] // size
    blocks = hinv.view(count, size, count, size)[alive, :, alive, :]  # (K, size, size): (H⁻¹)_{M,M}
    inverse = torch.linalg.inv(blocks)
    w_m = w.view(w.shape[0], count, size)[:, alive].transpose(0, 1)  # (K, out, size)
    return ((w_m @ inverse) * w_m).sum(dim=(1, 2)), inverse


def remove(w: torch.Tensor, hinv: torch.Tensor, m: int, size: int, inverse: torch.Tensor) -> None:
    """Remove structure `m` (columns m*size ... (m+1)*size−1) in place: the OBS update of `w` (out, in)
    and of `hinv` (in, in); `inverse` is its ((H⁻¹)_{M,M})⁻¹ (size, size)."""
    cols = slice(m * size, (m + 1) * size)
    rows = hinv[cols, :].clone()  # (H⁻¹)_{M,:}  (size, in)
    w -= (w[:, cols] @ inverse) @ rows
    w[:, cols] = 0.0
    hinv -= rows.T @ inverse @ rows
    hinv[cols, :] = 0.0
    hinv[:, cols] = 0.0


def obs_path(weight: torch.Tensor, h: torch.Tensor, size: int, keep_weights: Iterable[int] = (),
             damp: float = DAMP) -> ObsPath:
    """Remove the `in // size` structures of `weight` (out, in) one at a time, lowest ρ first, with the
    OBS update after each (see the module docstring). `h` (in, in) is the Hessian 2 XᵀX; `keep_weights`
    the counts of removed structures at which to keep the updated weight."""
    out_features, in_features = weight.shape
    if in_features % size:
        raise ValueError(f"A layer of {in_features} input columns has no structures of {size} columns.")
    count = in_features // size
    keep = set(keep_weights)
    w = weight.detach().double().clone()
    hinv = dampened_inverse(h, damp)
    alive = torch.arange(count)
    order: list[int] = []
    errors = torch.zeros(count + 1, dtype=torch.float64)
    weights = {0: w.clone()} if 0 in keep else {}
    for k in range(1, count + 1):
        rho, inverse = saliencies(w, hinv, size, alive)
        best = int(torch.argmin(rho))
        m = int(alive[best])
        remove(w, hinv, m, size, inverse[best])
        errors[k] = errors[k - 1] + rho[best].clamp_min(0) / 2
        order.append(m)
        alive = torch.cat([alive[:best], alive[best + 1:]])
        if k in keep:
            weights[k] = w.clone()
    return ObsPath(size=size, order=order, errors=errors, weights=weights)


def reconstruction_error(weight: torch.Tensor, changed: torch.Tensor, gram: torch.Tensor) -> float:
    """||W Xᵀ − W' Xᵀ||² summed over the tokens, from the Gram matrix XᵀX: tr(ΔW XᵀX ΔWᵀ)."""
    delta = (weight.double() - changed.double())
    return float(((delta @ gram.double()) * delta).sum())


def refit(weight: torch.Tensor, h: torch.Tensor, removed: list[int], size: int, damp: float = DAMP) -> torch.Tensor:
    """The weight (out, in) float64 an OBS path reaches after removing the structures `removed`, in closed
    form: the minimiser of tr(ΔW H ΔWᵀ) with those columns zero is W'_R = W H_{:,R} (H_{R,R})⁻¹ over the
    remaining columns R (H dampened as in `obs_path`). Every OBS step is this exact constrained
    minimiser, so the sequence ends here whatever the order; it lets a caller keep only the order and
    the errors of a path and rebuild the weight of the one count it picks."""
    w = weight.detach().double()
    h = dampened(h, damp)
    gone = torch.zeros(w.shape[1], dtype=torch.bool)
    for m in removed:
        gone[m * size:(m + 1) * size] = True
    kept = (~gone).nonzero().squeeze(1)
    out = torch.zeros_like(w)
    if kept.numel():
        # W'_R (H_RR) = W H_{:,R}; H_RR is symmetric positive definite
        out[:, kept] = torch.linalg.solve(h[kept][:, kept], (w @ h[:, kept]).T).T
    return out
