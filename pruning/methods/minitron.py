"""Minitron (Muralidharan et al., NeurIPS 2024; Sreenivas et al. 2024, "LLM Pruning and Distillation in
Practice"): forward-only activation importance on calibration examples, one-shot width and/or depth
pruning to a size, then retraining by logit distillation from the dense model.

    width  keep the same number of heads and of MLP neurons in every layer and a number of hidden
           (embedding) channels, each the top units of `pruning.activation_scores.width_scores`; under
           GQA (`gqa` heads) the heads are ranked within their group and every group keeps the same
           count (its K/V stay), or (`gqa` groups) whole KV groups go, ranked by the L2 norm of their heads
    depth  remove the layers of least importance (Block Influence or the loss with the layer dropped)
    both   width and depth at the same keep fraction

One keep fraction k for all of them is searched so that the exact sparsity is closest to
`target_sparsity` (`pruning.sparsity_search`), so width and depth can be compared at equal size (to
the granularity of a layer). Minitron searches the width of each axis among candidate architectures
and retrains each; one shared k is the simplification here. Retraining is the run's fine-tune with
distillation always on (`distills_always`): the paper's logit-only KD is `--alpha-ce 1`. Encoders and
decoders alike; hidden channels of a model with an embedding projection (ELECTRA) cannot be pruned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.adapter import GateShape
from core.loaded import LoadedModel
from pruning.activation_scores import LAYER_SCORES, WidthScores, layer_scores, width_scores
from pruning.calibration import batches
from pruning.gate_state import GateState
from pruning.methods.base import PruningMethod, register
from pruning.options import option
from pruning.sparsity_search import closest_state, keep_count, keep_mask

AXES = ("width", "depth", "both")
GQA_UNITS = ("heads", "groups")
CALIBRATION_BATCH = 8


@dataclass
class MinitronOptions:
    target_sparsity: float = option(0.5, "fraction of the layers' weights to remove (Minitron: 15B -> 8B, ~47%)",
                                    low=0.0, high=1.0, open_high=True)
    calibration_examples: int = option(64, "training examples of the forward passes (the paper: 1024)", low=1)
    axis: str = option("width", "width: heads, MLP neurons and hidden channels; depth: whole layers; both: width "
                       "and depth at the same keep fraction", choices=AXES)
    layer_score: str = option("bi", "depth: Block Influence 1 - cos(X_l, X_l+1) (one pass) or loss (the task "
                              "loss with the layer dropped, one pass per layer)", choices=LAYER_SCORES)
    gqa: str = option("heads", "GQA: heads (each group keeps its best heads, the same count; K/V stay) or groups "
                      "(whole KV groups go, a group scored by the L2 norm of its heads)", choices=GQA_UNITS)
    hidden: bool = option(True, "width: prune hidden (embedding) channels too")


def width_state(loaded: LoadedModel, scores: WidthScores, keep: float, gqa: str = "heads",
                hidden: bool = True) -> GateState:
    """Keep about `keep` of the heads (the same count per layer, or per KV group), of each layer's
    neurons and (if `hidden`) of the hidden channels, the best by `scores`."""
    shape = GateShape.of(loaded)
    g = shape.group_size
    if g == 1 or gqa == "groups":  # whole groups (heads without GQA), the same count per layer
        groups = scores.groups(g)
        kept = torch.stack([keep_mask(row, keep_count(keep, shape.kv_heads)) for row in groups])
        head = kept.repeat_interleave(g, dim=1)
    else:  # the best heads of every group, the same count in each
        per_group = scores.head.reshape(shape.layers, shape.kv_heads, g)
        count = keep_count(keep, g)
        head = torch.stack([torch.stack([keep_mask(row, count) for row in layer]) for layer in per_group])
        head = head.reshape(shape.layers, shape.heads)
    units = torch.stack([keep_mask(row, keep_count(keep, shape.intermediate)) for row in scores.intermediate])
    dims = keep_mask(scores.hidden, keep_count(keep, shape.hidden)) if hidden else torch.ones(shape.hidden)
    return GateState.dense(shape).replace(head=head, intermediate=units, hidden=dims)


def depth_state(loaded: LoadedModel, importance: torch.Tensor, keep: float) -> GateState:
    """Keep the round(keep * L) layers (at least one) of highest `importance` (L,); the others lose both sublayers."""
    shape = GateShape.of(loaded)
    layers = keep_mask(importance, keep_count(keep, shape.layers))
    return GateState.dense(shape).replace(mha=layers, ffn=layers)


@register
class Minitron(PruningMethod):
    name = "minitron"
    order = 21
    summary = ("Minitron (Muralidharan et al. 2024), encoders and decoders: forward-only activation importance, "
               "one-shot width (heads, neurons, hidden channels) or depth pruning to a size; retraining = the run's "
               "fine-tune, always distilled from the dense model (logit-only KD: --alpha-ce 1)")
    Options = MinitronOptions
    distills_always = True

    @classmethod
    def check_model(cls, options, loaded: LoadedModel) -> None:
        if options.axis != "depth" and options.hidden and hasattr(loaded.adapter.base, "embeddings_project"):
            raise ValueError(f"{loaded.source} projects its embeddings into the stream (ELECTRA), so its hidden "
                             "channels cannot be pruned: set hidden false or axis depth.")

    def prune(self) -> GateState:
        c, o = self.context, self.options
        c.progress(0, 1, f"activations on {o.calibration_examples} examples")
        calibration = batches(c.examples, o.calibration_examples, CALIBRATION_BATCH, c.seed)
        width = width_scores(c.base, c.examples, calibration) if o.axis != "depth" else None
        depth = layer_scores(c.base, c.examples, calibration, o.layer_score) if o.axis != "width" else None
        c.progress(1, 1, "activation importance done")

        def build(keep: float) -> GateState:
            state = width_state(c.base, width, keep, o.gqa, o.hidden) if width is not None \
                else GateState.dense(c.shape)
            if depth is None:
                return state
            layers = depth_state(c.base, depth, keep)
            return state.replace(mha=layers.mha, ffn=layers.ffn)

        return closest_state(build, c.sizes, o.target_sparsity)

    def target(self, step: int) -> float | None:
        return self.options.target_sparsity
