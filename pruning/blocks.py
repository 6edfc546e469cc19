"""Whole-block (layer) removal: the state that removes blocks, how many to remove for a target, and the
three block scores of the depth-pruning papers, each over calibration batches (`pruning.calibration`).

    block_state        GateState with mha = ffn = 0 for the removed layers (surgery drops their weights)
    removal_count      how many of a ranked list of blocks to remove so that the exact sparsity
                       (`pruning.size.exact_sparsity`) is closest to a target
    block_influence    ShortGPT (Men et al. 2024): BI_i = 1 - E_{X,t} cos(X_i,t, X_i+1,t), the mean over
                       the real (unpadded) tokens of the cosine between block i's input and output
    removal_losses     Shortened LLaMA's PPL criterion (Kim et al. 2024): the task loss with each block
                       removed alone (next-token CE, i.e. log perplexity, for language modelling; the
                       class CE for labelled data)
    taylor_scores      Shortened LLaMA's Taylor criterion: sum over the block's weights of
                       |sum_batches W * dL/dW| (the authors' code: every parameter named *weight of the
                       block, its norms' scales included; biases left out)
    protected_blocks   Taylor+'s heuristic: the first 4 and last 2 blocks are never removed

What a removed block computes is what `pruning.hooks.gated` / `pruning.surgery.prune` make of
mha = ffn = 0: in a pre-norm decoder the block is the identity (x + 0 + 0); in a post-LayerNorm encoder
its two LayerNorms still act, x -> LN_ffn(LN_attn(x)). The sliced model keeps the block's module with
zero-width projections (no attention, no FFN matmuls; only the norms run).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from core.adapter import GateShape
from core.loaded import LoadedModel
from pruning.calibration import Batch, run, stream
from pruning.examples import Examples
from pruning.gate_state import GateState
from pruning.hooks import gated
from pruning.losses import IGNORE
from pruning.size import SizeModel, exact_sparsity


def block_state(shape: GateShape, removed) -> GateState:
    """The dense state of `shape` with blocks `removed` (layer indices) closed: mha = ffn = 0."""
    keep = torch.ones(shape.layers)
    keep[list(removed)] = 0.0
    return GateState.dense(shape).replace(mha=keep, ffn=keep.clone())


def removal_count(order: list[int], shape: GateShape, sizes: SizeModel, target: float) -> int:
    """How many of `order` (blocks, least important first) to remove for an exact sparsity closest to
    `target` (a fraction); ties go to the smaller count."""
    gaps = [abs(exact_sparsity(block_state(shape, order[:n]), model=sizes) - target) for n in range(len(order) + 1)]
    return min(range(len(gaps)), key=lambda n: (gaps[n], n))


def protected_blocks(layers: int, first: int = 4, last: int = 2) -> list[int]:
    """Taylor+'s kept blocks: the first `first` and the last `last` of `layers`, clipped so that at least
    one block stays removable (the first count is cut to layers - 1, then the last to what is left)."""
    first = min(first, layers - 1)
    last = min(last, layers - 1 - first)
    return sorted({*range(first), *range(layers - last, layers)})


def summed_ce(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The summed cross-entropy of (B, C) logits with (B,) class ids, or of (B, T, V) logits with (B, T)
    next-token targets (IGNORE not scored), and how many targets it sums over."""
    if logits.dim() == 3:
        scored = int((targets != IGNORE).sum())
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE,
                               reduction="sum"), scored
    return F.cross_entropy(logits.float(), targets, reduction="sum"), targets.numel()


@torch.no_grad()
def task_loss(loaded: LoadedModel, examples: Examples, calibration: list[Batch]) -> float:
    """The mean task CE of `loaded` over every scored target of the `calibration` batches (nats; exp of it
    is the perplexity for language modelling)."""
    total, count = 0.0, 0
    for batch in calibration:
        nll, n = summed_ce(run(loaded, examples, batch).logits, batch[1])
        total, count = total + float(nll), count + n
    return total / max(count, 1)


def block_influence(loaded: LoadedModel, examples: Examples, calibration: list[Batch]) -> torch.Tensor:
    """(L,) float64 Block Influence of every block over the real tokens of `calibration` (higher: the
    block changes its input more)."""
    layers = GateShape.of(loaded).layers
    sums, tokens = torch.zeros(layers, dtype=torch.float64), 0
    for batch in calibration:
        states = stream(loaded, examples, batch)  # L + 1 tensors (B, T, d)
        real = batch[0]["attention_mask"].bool()
        for i in range(layers):
            sums[i] += F.cosine_similarity(states[i][real].double(), states[i + 1][real].double(), dim=-1).sum()
        tokens += int(real.sum())
    return 1 - sums / tokens


def removal_losses(loaded: LoadedModel, examples: Examples, calibration: list[Batch],
                   progress=None) -> torch.Tensor:
    """(L,) float64: the task loss (`task_loss`) of `loaded` with block i removed alone, for every i."""
    shape = GateShape.of(loaded)
    losses = torch.zeros(shape.layers, dtype=torch.float64)
    with gated(loaded, GateState.dense(shape)) as hooks:
        for layer in range(shape.layers):
            if progress is not None:
                progress(layer, shape.layers, f"loss without block {layer}")
            hooks.update(block_state(shape, [layer]))
            losses[layer] = task_loss(loaded, examples, calibration)
    return losses


def block_weights(loaded: LoadedModel) -> list[list[torch.nn.Parameter]]:
    """Per block, its parameters named *weight (projections and norm scales), as the Taylor score reads them."""
    return [[p for name, p in layer.named_parameters() if name.endswith("weight")] for layer in loaded.adapter.layers]


def taylor_scores(loaded: LoadedModel, examples: Examples, calibration: list[Batch]) -> torch.Tensor:
    """(L,) float64 Taylor block importance: per block, sum over its weights (`block_weights`) of
    |sum over the calibration batches of W * dL_batch/dW|, L_batch the batch's mean task CE. The model's
    weights are not changed (no .grad is left behind)."""
    per_block = block_weights(loaded)
    params = [p for block in per_block for p in block]
    salience = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    trainable = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        for batch in calibration:
            with torch.enable_grad():
                nll, n = summed_ce(run(loaded, examples, batch).logits, batch[1])
                grads = torch.autograd.grad(nll / max(n, 1), params, allow_unused=True)
            for s, p, g in zip(salience, params, grads):
                if g is not None:
                    s += p.detach().double() * g.double()
    finally:
        for p, flag in zip(params, trainable):
            p.requires_grad_(flag)
    scores, i = torch.zeros(len(per_block), dtype=torch.float64), 0
    for layer, block in enumerate(per_block):
        scores[layer] = sum(float(s.abs().sum()) for s in salience[i:i + len(block)])
        i += len(block)
    return scores
