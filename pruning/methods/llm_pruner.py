"""LLM-Pruner (Ma, Fang, Wang, NeurIPS 2023; horseee/LLM-Pruner): one-shot removal of coupled structures
ranked by first-order Taylor importance, then a short recovery fine-tune.

1. one backward pass of the task loss (next-token CE on documents, classification CE on labelled rows)
   on `calibration_examples` training examples (the paper: 10) gives every weight's gradient;
2. every coupled group (`pruning.taylor`: a head, or under GQA a KV group with its query heads; an MLP
   channel) is scored by the element- or vector-wise Taylor importance of its members, aggregated;
3. block-wise (the paper's setting, scope "layer"): in every pruned layer the same fraction of
   attention groups and of MLP channels goes; the first `dense_first` and last `dense_last` fraction
   of the layers stay dense (the authors prune layers 4-29 of LLaMA-7B's 32: 4/32 = 0.125 at the start,
   2/32 = 0.0625 at the end); scope "global" ranks groups over all pruned layers instead (attention
   groups and MLP channels each in their own pool, at the same fraction: torch_pruning's global mode
   pools both in one ranking, whose scales differ). The fraction is searched so that the exact
   sparsity is closest to `target_sparsity` (`pruning.sparsity_search`);
4. recovery is the run's fine-tune (`finetune_steps`): LoRA for a decoder (`--lora`; the paper: r = 8,
   lr 1e-4, 2 epochs of 50K Alpaca samples), a full fine-tune for an encoder.

Encoders and decoders alike (BERT's query/key/value rows and attention output columns; FFN in rows and
FFN out columns); LLM-Pruner's channel-wise mode (hidden dims) is not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.adapter import GateShape
from core.loaded import LoadedModel
from pruning.calibration import batches
from pruning.gate_state import GateState
from pruning.methods.base import PruningMethod, register
from pruning.options import option
from pruning.sparsity_search import closest_state, keep_count, keep_mask
from pruning.taylor import AGGREGATIONS, IMPORTANCES, GroupScores, group_scores

SCOPES = ("layer", "global")
CALIBRATION_BATCH = 16  # examples per backward pass (the paper's 10 fit in one)


@dataclass
class LLMPrunerOptions:
    target_sparsity: float = option(0.2, "fraction of the layers' weights to remove (the paper: 20% of LLaMA-7B's "
                                    "parameters)", low=0.0, high=1.0, open_high=True)
    calibration_examples: int = option(10, "training examples of the one backward pass (the paper: 10)", low=1)
    importance: str = option("element", "Taylor importance of a group's member: element (sum_k |g_k W_k|, the "
                             "authors' default param_first) or vector (|g^T W|)", choices=IMPORTANCES)
    second_order: bool = option(False, "element: subtract 1/2 H_kk W_k^2 with the Fisher diagonal "
                                "(1/N) sum_n g_n^2, one extra backward pass per example (the code's param_mix)")
    aggregation: str = option("sum", "group importance from its members: sum (the paper's default), prod, max, "
                              "or last (the W_O / down-projection slice only)", choices=AGGREGATIONS)
    scope: str = option("layer", "layer: the same fraction of heads and channels in every pruned layer (the "
                        "paper's block-wise mode); global: ranked over all pruned layers", choices=SCOPES)
    dense_first: float = option(0.125, "fraction of the first layers kept dense (the paper: 4 of 32)", low=0.0,
                                high=1.0, open_high=True)
    dense_last: float = option(0.0625, "fraction of the last layers kept dense (the paper: 2 of 32)", low=0.0,
                               high=1.0, open_high=True)


def pruned_layers(layers: int, dense_first: float, dense_last: float) -> list[int]:
    """The layers LLM-Pruner prunes: all but round(dense_first * L) at the start, round(dense_last * L) at the end."""
    first, last = keep_count(dense_first, layers, 0), keep_count(dense_last, layers, 0)
    return list(range(first, layers - last))


def coupled_state(loaded: LoadedModel, scores: GroupScores, layers: list[int], keep: float,
                  scope: str = "layer") -> GateState:
    """Keep round(keep * n) of the attention groups and of the MLP channels of `layers` (per layer, or
    over all of them with scope "global"); a closed KV group closes all its query heads."""
    shape = GateShape.of(loaded)
    kept = {"attention": torch.ones(shape.layers, shape.kv_heads), "mlp": torch.ones(shape.layers, shape.intermediate)}
    for kind, mask in kept.items():
        s = scores.of(kind)[layers]  # (L', units)
        if scope == "global":
            mask[layers] = keep_mask(s, keep_count(keep, s.numel()))
        else:
            mask[layers] = torch.stack([keep_mask(row, keep_count(keep, row.numel())) for row in s])
    return GateState.dense(shape).replace(head=kept["attention"].repeat_interleave(shape.group_size, dim=1),
                                          intermediate=kept["mlp"])


@register
class LLMPruner(PruningMethod):
    name = "llm-pruner"
    order = 20
    summary = ("LLM-Pruner (Ma et al. 2023), encoders and decoders: one-shot removal of coupled heads / KV groups "
               "and MLP channels by first-order Taylor importance of one backward pass; recovery = the run's "
               "fine-tune (decoders: --lora, the paper's r 8 and lr 1e-4; encoders: a full fine-tune)")
    Options = LLMPrunerOptions

    @classmethod
    def check_config(cls, options, config) -> None:
        if options.second_order and options.importance != "element":
            raise ValueError("LLM-Pruner's second-order term applies to element-wise importance only: set "
                             "importance element or second_order false.")

    @classmethod
    def check_model(cls, options, loaded: LoadedModel) -> None:
        layers = GateShape.of(loaded).layers
        if not pruned_layers(layers, options.dense_first, options.dense_last):
            raise ValueError(f"LLM-Pruner keeps the first {options.dense_first} and last {options.dense_last} of "
                             f"{loaded.source}'s {layers} layers dense, which leaves no layer to prune; lower "
                             "dense_first / dense_last.")

    def prune(self) -> GateState:
        c, o = self.context, self.options
        layers = pruned_layers(c.shape.layers, o.dense_first, o.dense_last)
        c.progress(0, 1, f"Taylor importance on {o.calibration_examples} examples")
        calibration = batches(c.examples, o.calibration_examples, CALIBRATION_BATCH, c.seed)
        scores = group_scores(c.base, c.examples, calibration, importance=o.importance, aggregation=o.aggregation,
                              second_order=o.second_order, layers=layers)
        c.progress(1, 1, "Taylor importance done")
        return closest_state(lambda k: coupled_state(c.base, scores, layers, k, o.scope), c.sizes,
                             o.target_sparsity)

    def target(self, step: int) -> float | None:
        return self.options.target_sparsity
