"""CoFi's size model: expected remaining size and sparsity from gate probabilities (Xia et al. 2022).

With z-hat the probability that a gate is open (or an indicator 1[z > 0] for a fixed state), head
dim d_h, hidden size d, FFN width d_ff and L layers:

    S-hat = 4 d_h (sum_k zhat_hid,k) (sum_{l,h} zhat_mha,l zhat_head,l,h)
          + 2 (sum_k zhat_hid,k) (sum_{l,i} zhat_ffn,l zhat_int,l,i)
    M     = L (4 d^2 + 4 d) + L (2 d d_ff + 5 d)        (embeddings and classifier excluded)
    s-hat = 1 - S-hat / M

S-hat counts weight matrices only while M also counts biases and LayerNorms, so an untouched
model has a small positive sparsity (0.4% for MiniLM-L6). Everything is a differentiable torch
expression in the gate values, for the Lagrangian (`pruning.lagrangian`).
"""

from __future__ import annotations

import torch

from pruning.gate_state import GROUPS, GateState
from pruning.gates import CoFiGates


def _probs(gates: GateState | CoFiGates) -> GateState:
    return gates.prob_open() if isinstance(gates, CoFiGates) else gates


def _head_dim(z: GateState, head_dim: int | None) -> int:
    return head_dim if head_dim is not None else z.hidden.shape[0] // z.head.shape[1]


def prunable_size(layers: int, hidden: int, intermediate: int) -> int:
    """M = L (4 d^2 + 4 d) + L (2 d d_ff + 5 d): parameters of the encoder layers (counted)."""
    d = hidden
    return layers * (4 * d * d + 4 * d) + layers * (2 * d * intermediate + 5 * d)


def remaining_size(z: GateState, head_dim: int | None = None) -> torch.Tensor:
    """S-hat for gate values `z` (probabilities or 0/1 indicators); scalar tensor, parameters.

    `head_dim` defaults to d / H (true for BERT-family models).
    """
    dh = _head_dim(z, head_dim)
    hidden = z.hidden.sum()
    attention = 4 * dh * hidden * (z.mha[:, None] * z.head).sum()
    ffn = 2 * hidden * (z.ffn[:, None] * z.intermediate).sum()
    return attention + ffn


def expected_sparsity(gates: GateState | CoFiGates, head_dim: int | None = None) -> torch.Tensor:
    """s-hat = 1 - S-hat / M: a differentiable scalar fraction in (0, 1]."""
    z = _probs(gates)
    layers, _, d_ff, d = z.shape
    return 1 - remaining_size(z, head_dim) / prunable_size(layers, d, d_ff)


def exact_sparsity(state: GateState, head_dim: int | None = None) -> float:
    """Sparsity of a fixed state: the same formula with indicators 1[z > 0] (soft values count as kept)."""
    s = state.detach()
    indicators = GateState(**{name: (getattr(s, name) > 0).float() for name in GROUPS})
    return float(expected_sparsity(indicators, head_dim))
