"""`depth`: one-shot removal of whole blocks (layers), ranked by one of three block scores
(`pruning.blocks`), then the run's fine-tune (`finetune_steps`; LoRA with `lora` on decoders) as recovery.

    bi      ShortGPT (Men et al. 2024): Block Influence 1 - mean cos(block input, block output)
    ppl     Shortened LLaMA (Kim et al. 2024): the task loss with the block removed alone (perplexity
            for language modelling; the class CE for labelled data)
    taylor  Shortened LLaMA's Taylor+: sum over the block's weights of |sum_batches W dL/dW|; the first
            `protect_first` and last `protect_last` blocks are never removed

The lowest-scoring blocks go: `blocks` of them, or (blocks = 0) the count whose removal gives the exact
sparsity closest to `target_sparsity`. Encoders and decoders alike; a removed decoder block is the
identity, a removed post-LayerNorm encoder block still applies its two LayerNorms (what mha = ffn = 0
means there; the ppl criterion measures exactly that model).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.loaded import LoadedModel
from pruning.blocks import (
    block_influence,
    block_state,
    protected_blocks,
    removal_count,
    removal_losses,
    taylor_scores,
)
from pruning.calibration import batches
from pruning.gate_state import GateState
from pruning.methods.base import PruningMethod, register
from pruning.options import option

CRITERIA = ("bi", "ppl", "taylor")
CALIBRATION_BATCH = 4


@dataclass
class DepthOptions:
    depth_criterion: str = option("bi", "block score: bi (ShortGPT's Block Influence), ppl (the task loss without "
                                  "the block: perplexity for text, class CE for labelled data), taylor "
                                  "(Taylor+: |sum W dL/dW| over the block's weight matrices and norm scales; "
                                  "biases left out, as in the authors' code)", choices=CRITERIA)
    target_sparsity: float = option(0.25, "fraction of the layers' weights to remove, as whole blocks (the count "
                                    "whose exact sparsity is closest); unused when blocks > 0",
                                    low=0.0, high=1.0, open_low=True, open_high=True)
    blocks: int = option(0, "number of blocks to remove (0: from target_sparsity)", low=0)
    calibration_examples: int = option(10, "training examples the block scores average over (Shortened LLaMA: 10)",
                                       low=1)
    protect_first: int = option(4, "taylor: first blocks never removed (Taylor+: 4; clipped so one block stays "
                                "removable)", low=0)
    protect_last: int = option(2, "taylor: last blocks never removed (Taylor+: 2; clipped likewise)", low=0)


def removable_blocks(options: DepthOptions, layers: int) -> list[int]:
    """Blocks the criterion may remove (Taylor+'s protected ones excluded)."""
    if options.depth_criterion != "taylor":
        return list(range(layers))
    kept = set(protected_blocks(layers, options.protect_first, options.protect_last))
    return [i for i in range(layers) if i not in kept]


@register
class Depth(PruningMethod):
    name = "depth"
    order = 20
    summary = ("one-shot: remove whole blocks of lowest ShortGPT Block Influence, Shortened LLaMA's removal "
               "loss, or Taylor+ score; recovery is the run's fine-tune (LoRA for decoders)")
    Options = DepthOptions

    @classmethod
    def check_model(cls, options: DepthOptions, loaded: LoadedModel) -> None:
        layers = len(loaded.adapter.layers)
        if layers < 2:
            raise ValueError(f"depth removes whole blocks; {loaded.source} has {layers} layer, none to spare.")
        removable = len(removable_blocks(options, layers))
        limit = min(removable, layers - 1)
        if options.blocks > limit:
            raise ValueError(f"depth cannot remove {options.blocks} blocks of {loaded.source}: it has {layers} "
                             f"layers and at most {limit} may go (one must stay; taylor protects its first and "
                             "last blocks).")

    def scores(self) -> torch.Tensor:
        """(L,) the criterion's score of every block (higher = more important)."""
        c = self.context
        calibration = batches(c.examples, self.options.calibration_examples, CALIBRATION_BATCH, c.seed)
        criterion = self.options.depth_criterion
        c.progress(0, 1, f"scoring blocks ({criterion})")
        if criterion == "bi":
            return block_influence(c.base, c.examples, calibration)
        if criterion == "ppl":
            return removal_losses(c.base, c.examples, calibration, c.progress)
        return taylor_scores(c.base, c.examples, calibration)

    def prune(self) -> GateState:
        c = self.context
        scores = self.scores()
        layers = len(scores)
        order = sorted(removable_blocks(self.options, layers), key=lambda i: (float(scores[i]), i))[:layers - 1]
        count = self.options.blocks or removal_count(order, c.shape, c.sizes, self.options.target_sparsity)
        return block_state(c.shape, order[:count])

    def target(self, step: int) -> float | None:
        return None if self.options.blocks else self.options.target_sparsity
