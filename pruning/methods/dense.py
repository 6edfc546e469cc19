"""No pruning: fine-tune the model as it is, e.g. a small dense model distilled from a bigger teacher
with the same budget (the small-dense side of Zhu & Gupta 2017)."""

from __future__ import annotations

from pruning.gate_state import GateState
from pruning.methods.base import PruningMethod, register


@register
class Dense(PruningMethod):
    name = "dense"
    order = 5
    summary = "fine-tune without pruning (e.g. a small model distilled from the teacher)"

    @classmethod
    def check_config(cls, options, config) -> None:
        if config.finetune_steps < 1:
            raise ValueError("The 'finetune_steps' parameter of TrainConfig must be at least 1 for method dense. "
                             f"Got {config.finetune_steps!r} instead.")

    def prune(self) -> GateState:
        return GateState.dense(self.context.shape)
