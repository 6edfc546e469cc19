"""CoFi's size model: expected remaining size and sparsity from gate probabilities (Xia et al. 2022).

With z-hat the probability that a gate is open (or an indicator 1[z > 0] for a fixed state), head
dim d_h, hidden size d, FFN width d_ff and L layers, for a BERT-family encoder:

    S-hat = 4 d_h (sum_k zhat_hid,k) (sum_{l,h} zhat_mha,l zhat_head,l,h)
          + 2 (sum_k zhat_hid,k) (sum_{l,i} zhat_ffn,l zhat_int,l,i)
    M     = L (4 d^2 + 4 d) + L (2 d d_ff + 5 d)        (embeddings and classifier excluded)
    s-hat = 1 - S-hat / M

S-hat counts weight matrices only while M also counts biases and LayerNorms, so an untouched
model has a small positive sparsity (0.4% for MiniLM-L6).

A Llama-family decoder (`SizeModel` with `decoder=True`) has H query heads in groups of g sharing
one of H_kv KV heads, and SwiGLU's three FFN matrices:

    S-hat = (sum_k zhat_hid,k) [ 2 d_h sum_{l,h} zhat_mha,l zhat_head,l,h                       (Q, O)
          + 2 d_h sum_{l,j} zhat_mha,l (1 - prod_{h in group j} (1 - zhat_head,l,h))              (K, V)
          + 3 sum_{l,i} zhat_ffn,l zhat_int,l,i ]                                       (gate, up, down)
    M     = L (2 H d_h d + 2 H_kv d_h d + 3 d d_ff)     (the layers' weight matrices)

A KV head survives when any head of its group does (`core.structure`): with independent gates its
probability is 1 - prod(1 - zhat). M counts the same matrices as S-hat, so a dense decoder has
sparsity exactly 0 (its norms and Qwen2's Q/K/V biases, ~0.1%, are left out of both). Everything is a
differentiable torch expression in the gate values, for the Lagrangian (`pruning.lagrangian`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.adapter import GateShape, as_adapter
from core.structure import pruning_info
from pruning.gate_state import GROUPS, GateState
from pruning.gates import CoFiGates


@dataclass(frozen=True)
class SizeModel:
    """What the size model needs beyond a gate state's sizes: the unpruned model's `shape` (head dim,
    KV heads) and whether it is a decoder. None in the functions below means an encoder with
    d_h = `head_dim` (default d / H)."""

    shape: GateShape
    decoder: bool

    @classmethod
    def of(cls, arch) -> SizeModel:
        """Of a LoadedModel, Adapter or transformers model, pruned (its original sizes) or not."""
        adapter = as_adapter(arch)
        info = pruning_info(adapter.model)
        return cls(shape=info.original if info is not None else GateShape.of(adapter), decoder=adapter.is_decoder)


def _probs(gates: GateState | CoFiGates) -> GateState:
    return gates.prob_open() if isinstance(gates, CoFiGates) else gates


def _head_dim(z: GateState, head_dim: int | None) -> int:
    return head_dim if head_dim is not None else z.hidden.shape[0] // z.head.shape[1]


def prunable_size(layers: int, hidden: int, intermediate: int, model: SizeModel | None = None) -> int:
    """M: parameters of the layers that the size model counts (see the module docstring)."""
    d = hidden
    if model is not None and model.decoder:
        s = model.shape
        return layers * (2 * (s.heads + s.kv_heads) * s.head_dim * d + 3 * d * intermediate)
    return layers * (4 * d * d + 4 * d) + layers * (2 * d * intermediate + 5 * d)


def remaining_size(z: GateState, head_dim: int | None = None, model: SizeModel | None = None) -> torch.Tensor:
    """S-hat for gate values `z` (probabilities or 0/1 indicators); scalar tensor, parameters.

    `head_dim` (encoders) defaults to d / H (true for BERT-family models).
    """
    hidden = z.hidden.sum()
    heads = z.mha[:, None] * z.head  # (L, H)
    units = (z.ffn[:, None] * z.intermediate).sum()
    if model is not None and model.decoder:
        s = model.shape
        closed = (1 - z.head).reshape(z.head.shape[0], s.kv_heads, s.group_size).prod(dim=2)  # (L, H_kv)
        kv = z.mha[:, None] * (1 - closed)
        return hidden * (2 * s.head_dim * (heads.sum() + kv.sum()) + 3 * units)
    return 4 * _head_dim(z, head_dim) * hidden * heads.sum() + 2 * hidden * units


def expected_sparsity(gates: GateState | CoFiGates, head_dim: int | None = None,
                      model: SizeModel | None = None) -> torch.Tensor:
    """s-hat = 1 - S-hat / M: a differentiable scalar fraction in [0, 1]."""
    z = _probs(gates)
    layers, _, d_ff, d = z.shape
    return 1 - remaining_size(z, head_dim, model) / prunable_size(layers, d, d_ff, model)


def exact_sparsity(state: GateState, head_dim: int | None = None, model: SizeModel | None = None) -> float:
    """Sparsity of a fixed state: the same formula with indicators 1[z > 0] (soft values count as kept)."""
    s = state.detach()
    indicators = GateState(**{name: (getattr(s, name) > 0).float() for name in GROUPS})
    return float(expected_sparsity(indicators, head_dim, model))
