"""Minitron's forward-only importance (Muralidharan et al., NeurIPS 2024; NVIDIA ModelOpt's aggregation).

On calibration batches of the unpruned model, every recorded activation a (B, T, n) is reduced the
ModelOpt way: mean of |a| over each example's real tokens (padding left out), then the L2 norm over
all examples of all batches, giving (n,). Then

    head       the input of W_O (the per-head attention output, H x d_h): the L2 norm over d_h (L, H)
    neuron     the input of the FFN output dense (down_proj): each unit's value (L, d_ff)
    channel    every norm output that the layers read or write, summed: a decoder's pre-norms (ModelOpt
               hooks input_layernorm and pre_mlp_layernorm), an encoder's embedding and sublayer
               LayerNorms (their outputs are the stream) (d,)
    group      (GQA) the L2 norm of its query heads' scores (L, H_kv)

Layers (depth pruning), higher = more important:

    bi         Block Influence 1 - cos(X_l, X_{l+1}) of each layer's input and output, averaged over
               the real tokens (ModelOpt sums its per-batch means)
    loss       the task loss with the layer dropped (its mha and ffn gates 0: a decoder's residual
               passes through; a post-LN encoder keeps the layer's two LayerNorms, as the gate state does)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from core.adapter import GateShape
from core.loaded import LoadedModel
from pruning.calibration import Batch, run, stream
from pruning.examples import Examples
from pruning.gate_state import GateState
from pruning.hooks import gated
from pruning.losses import TaskLoss

LAYER_SCORES = ("bi", "loss")


class Aggregate:
    """Sum over examples of (mean over real tokens of |a|)^2, per feature; `value` is its square root."""

    def __init__(self) -> None:
        self.squares: torch.Tensor | None = None

    def add(self, a: torch.Tensor, mask: torch.Tensor) -> None:
        """`a` (B, T, n) activations, `mask` (B, T) 1 on real tokens."""
        m = mask.to(torch.float64)[..., None]  # (B, T, 1)
        mean = (a.detach().abs().double() * m).sum(1) / m.sum(1).clamp_min(1)  # (B, n)
        part = (mean ** 2).sum(0)
        self.squares = part if self.squares is None else self.squares + part

    @property
    def value(self) -> torch.Tensor:
        return self.squares.sqrt().float()


@dataclass
class WidthScores:
    """Minitron's width importance: head (L, H), intermediate (L, d_ff), hidden (d,)."""

    head: torch.Tensor
    intermediate: torch.Tensor
    hidden: torch.Tensor

    def groups(self, group_size: int) -> torch.Tensor:
        """(L, H_kv) importance of each KV group: the L2 norm of its `group_size` query heads' scores."""
        L, H = self.head.shape
        return self.head.reshape(L, H // group_size, group_size).norm(dim=2)


def stream_norms(loaded: LoadedModel) -> list[torch.nn.Module]:
    """The norms whose outputs score the hidden channels (see the module docstring)."""
    a = loaded.adapter
    layers = range(len(a.layers))
    norms = [a.attention_norm(layer) for layer in layers] + [a.ffn_norm(layer) for layer in layers]
    return norms if a.is_decoder else [a.embedding_norm, *norms]


def width_scores(loaded: LoadedModel, examples: Examples, calibration: Sequence[Batch]) -> WidthScores:
    """Head, neuron and channel importance of `loaded` (eval mode, unchanged) on the `calibration` batches."""
    a, shape = loaded.adapter, GateShape.of(loaded)
    heads = [Aggregate() for _ in range(shape.layers)]
    neurons = [Aggregate() for _ in range(shape.layers)]
    channels = [Aggregate() for _ in stream_norms(loaded)]
    current: dict[str, torch.Tensor] = {}

    def pre(acc: Aggregate):
        def hook(module, args):
            acc.add(args[0], current["mask"])
        return hook

    def post(acc: Aggregate):
        def hook(module, args, output):
            acc.add(output, current["mask"])
        return hook

    handles = [a.attention_output(layer).register_forward_pre_hook(pre(heads[layer])) for layer in range(shape.layers)]
    handles += [a.ffn_out(layer).register_forward_pre_hook(pre(neurons[layer])) for layer in range(shape.layers)]
    handles += [norm.register_forward_hook(post(acc)) for norm, acc in zip(stream_norms(loaded), channels)]
    try:
        with torch.no_grad():
            for batch in calibration:
                current["mask"] = batch[0]["attention_mask"]
                run(loaded, examples, batch)
    finally:
        for handle in handles:
            handle.remove()
    head = torch.stack([h.value.reshape(shape.heads, shape.head_dim).norm(dim=1) for h in heads])
    return WidthScores(head=head, intermediate=torch.stack([n.value for n in neurons]),
                       hidden=torch.stack([c.value for c in channels]).sum(0))


def block_influence(loaded: LoadedModel, examples: Examples, calibration: Sequence[Batch]) -> torch.Tensor:
    """(L,) 1 - cos(X_l, X_{l+1}) of each layer's input and output, averaged over the real tokens."""
    total, tokens = None, 0
    for batch in calibration:
        states = stream(loaded, examples, batch)  # L + 1 of (B, T, d)
        mask = batch[0]["attention_mask"].bool()
        part = torch.stack([(1 - F.cosine_similarity(x.double(), y.double(), dim=-1))[mask].sum()
                            for x, y in zip(states[:-1], states[1:])])
        total = part if total is None else total + part
        tokens += int(mask.sum())
    return (total / tokens).float()


def dropped_layer_loss(loaded: LoadedModel, examples: Examples, calibration: Sequence[Batch]) -> torch.Tensor:
    """(L,) the mean task loss over the `calibration` batches with each layer dropped in turn."""
    shape = GateShape.of(loaded)
    task = TaskLoss(0.0, 1.0)
    losses = torch.zeros(shape.layers)
    dense = GateState.dense(shape)
    for layer in range(shape.layers):
        closed = torch.ones(shape.layers)
        closed[layer] = 0.0
        with torch.no_grad(), gated(loaded, dense.replace(mha=closed, ffn=closed)):
            losses[layer] = sum(float(task(run(loaded, examples, b).logits, b[1])["task"]) for b in calibration)
    return losses / len(calibration)


def layer_scores(loaded: LoadedModel, examples: Examples, calibration: Sequence[Batch], how: str) -> torch.Tensor:
    """(L,) depth importance by `how` ("bi" or "loss"), higher = more important."""
    if how == "bi":
        return block_influence(loaded, examples, calibration)
    if how == "loss":
        return dropped_layer_loss(loaded, examples, calibration)
    raise ValueError(f"The 'layer_score' parameter must be one of {', '.join(LAYER_SCORES)}. Got {how!r} instead.")
