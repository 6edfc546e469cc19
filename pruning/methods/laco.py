"""`laco`: LaCo (Yang, Cao, Zhao 2024), one-shot layer collapse: the RDSC merge of C consecutive layers
into the lowest of them, kept when the merged model's last hidden states stay similar to the original's
(`pruning.layer_merge`). The slice starts from the merged copy; the merged layers' blocks are closed.
The paper fine-tunes nothing; the run's `finetune_steps` (0 for the paper's setting) may add recovery.
Encoders and decoders alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.loaded import LoadedModel
from pruning.blocks import block_state
from pruning.calibration import batches
from pruning.layer_merge import Search, search
from pruning.methods.base import OneShotResult, PruningMethod, register
from pruning.options import option

CALIBRATION_BATCH = 4


@dataclass
class LacoOptions:
    merge_layers: int = option(7, "C: layers merged at once (the lowest and the C - 1 above it; notebook: 7); "
                               "attention and FFN weights and biases are merged, norms stay the lowest layer's",
                               low=2)
    merge_interval: int = option(1, "I: layers to step down after an accepted merge (notebook: 1)", low=1)
    lowest_layer: int = option(0, "L: the loop stops below this layer (notebook: 0)", low=0)
    highest_layer: int = option(-1, "H: the loop starts merging at layer H - C, so layer H itself is never merged "
                                "into (-1: the last layer, as in the notebook)", low=-1)
    similarity_threshold: float = option(0.45, "T: accept a merge when the mean cosine of the last hidden states "
                                         "(original vs merged) exceeds it (notebook: 0.45)", low=-1.0, high=1.0)
    target_sparsity: float = option(0.25, "stop once this fraction of the layers' weights is removed, the last "
                                    "merge taking only the layers needed (0: run the loop to the end, as the paper)",
                                    low=0.0, high=1.0, open_high=True)
    calibration_examples: int = option(5, "training examples of the similarity check (notebook: 5 sentences)", low=1)


@register
class Laco(PruningMethod):
    name = "laco"
    order = 21
    summary = ("one-shot: LaCo's layer collapse, RDSC-merge C layers into one while the last hidden states stay "
               "similar (cosine > T); no retraining in the paper (finetune_steps optional)")
    Options = LacoOptions

    @classmethod
    def check_model(cls, options: LacoOptions, loaded: LoadedModel) -> None:
        layers = len(loaded.adapter.layers)
        highest = layers - 1 if options.highest_layer < 0 else options.highest_layer
        if highest > layers - 1:
            raise ValueError(f"laco's highest_layer {highest} does not exist: {loaded.source} has layers "
                             f"0..{layers - 1}.")
        if highest - options.merge_layers < options.lowest_layer:
            raise ValueError(f"laco starts at layer H - C = {highest} - {options.merge_layers}, below lowest_layer "
                             f"{options.lowest_layer}: {loaded.source} has {layers} layers; lower merge_layers "
                             "or lowest_layer.")

    def settings(self) -> Search:
        o = self.options
        return Search(merge_layers=o.merge_layers, interval=o.merge_interval, lowest=o.lowest_layer,
                      highest=o.highest_layer, threshold=o.similarity_threshold, target=o.target_sparsity)

    def prune(self) -> OneShotResult:
        c = self.context
        calibration = batches(c.examples, self.options.calibration_examples, CALIBRATION_BATCH, c.seed)
        merged = search(c.base, c.examples, calibration, self.settings(), c.progress)
        merged.source.notes.append(f"LaCo merged {len(merged.removed)} layer(s) ({merged.removed}) into the ones "
                                   "below them.")
        return OneShotResult(state=block_state(c.shape, merged.removed), source=merged.source)

    def target(self, step: int) -> float | None:
        return self.options.target_sparsity or None
