"""One-shot baselines: close the least important heads and FFN units to a target sparsity, then the
loop fine-tunes the sliced model (`pruning.baselines` has the scores and the bisection).

    relevance   Voita et al. (2019): conservative-LRP head relevance
    importance  Michel et al. (2019): |dL/d gate| per head, normalised per layer
    random      a seeded random draw
"""

from __future__ import annotations

from dataclasses import dataclass

from pruning.baselines import baseline_state
from pruning.gate_state import GateState
from pruning.methods.base import PruningMethod, register
from pruning.options import option


@dataclass
class OneShotOptions:
    target_sparsity: float = option(0.6, "fraction of the encoder's weights to remove", low=0.0, high=1.0,
                                    open_low=True, open_high=True)
    score_examples: int = option(256, "training examples the head scores average over (relevance, importance)",
                                 low=0)


class OneShot(PruningMethod):
    """Rank heads by `criterion` (a `pruning.baselines.BASELINES` name), FFN units by magnitude."""

    criterion: str
    Options = OneShotOptions

    def prune(self) -> GateState:
        c = self.context
        c.progress(0, 1, f"scoring heads ({self.criterion})")
        rows = c.train.subset(self.options.score_examples, seed=c.seed)
        return baseline_state(self.criterion, c.base, rows.texts, rows.labels, self.options.target_sparsity,
                              seed=c.seed, progress=c.progress)

    def target(self, step: int) -> float | None:
        return self.options.target_sparsity


@register
class Relevance(OneShot):
    name = criterion = "relevance"
    order = 2
    summary = "one-shot: close the heads of least LRP relevance (Voita et al. 2019) and the smallest FFN units"


@register
class Importance(OneShot):
    name = criterion = "importance"
    order = 3
    summary = "one-shot: close the heads of least Michel importance |dL/dgate| and the smallest FFN units"


@register
class Random(OneShot):
    name = criterion = "random"
    order = 4
    summary = "one-shot: close random heads and FFN units (the baseline every method must beat)"
