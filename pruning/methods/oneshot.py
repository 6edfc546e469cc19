"""One-shot baselines: close the least important heads and FFN units to a target sparsity, then the
loop fine-tunes the sliced model (`pruning.baselines` has the scores and the bisection).

    relevance   Voita et al. (2019): conservative-LRP head relevance
    importance  Michel et al. (2019): |dL/d gate| per head, normalised per layer
    random      a seeded random draw

`protect_roles`: the dense model's head roles (`analysis.roles.head_roles`: Voita's positional, syntactic,
rare-word; a decoder's also previous-token, duplicate-token, induction) on the same scored examples; every
head with a role gets its score raised above every role-free head's (`analysis.roles.survival.protect_scores`),
so role-free heads are closed first and a role head only once none is left.
"""

from __future__ import annotations

from dataclasses import dataclass

from pruning.baselines import baseline_state
from pruning.gate_state import GateState
from pruning.methods.base import PruningMethod, register
from pruning.options import option

ROLE_EXAMPLES = 20  # fewest sentences roles are found on (`analysis.roles.score_heads` needs 10 for rare-word)


@dataclass
class OneShotOptions:
    target_sparsity: float = option(0.6, "fraction of the encoder's weights to remove", low=0.0, high=1.0,
                                    open_low=True, open_high=True)
    score_examples: int = option(256, "training examples the head scores average over (relevance, importance)",
                                 low=0)
    protect_roles: bool = option(False, "rank every head with a Voita / Olsson role (found on the scored "
                                 "examples, at least 20: spaCy parses, attention) above every role-free head: "
                                 "role-free heads are closed first")


def role_heads(context, examples: int):
    """(L, H) bool: the dense model's heads with a Voita / Olsson role (`analysis.roles.head_roles`), found on
    max(`examples`, ROLE_EXAMPLES) seeded training texts."""
    from analysis.roles import head_roles
    from analysis.roles.survival import role_mask

    context.progress(0, 1, "finding head roles (protect_roles)")
    rows = context.train.subset(max(examples, ROLE_EXAMPLES), seed=context.seed)
    shape = context.shape
    return role_mask(head_roles(context.base, rows.texts, limit=len(rows)), (shape.layers, shape.heads))


class OneShot(PruningMethod):
    """Rank heads by `criterion` (a `pruning.baselines.BASELINES` name), FFN units by magnitude."""

    criterion: str
    Options = OneShotOptions

    @classmethod
    def check_config(cls, options, config) -> None:
        if config.data_spec.is_text and (cls.criterion != "random" or options.protect_roles):
            raise ValueError(f"{cls.name} scores heads on labelled examples; on language-modelling text use random "
                             "or a method that calibrates on text (wanda-sp, flap, llm-pruner, minitron, depth).")

    def prune(self) -> GateState:
        c = self.context
        c.progress(0, 1, f"scoring heads ({self.criterion})")
        texts, labels = [], []
        if self.criterion != "random":  # a random draw reads no example (and works on plain text)
            rows = c.train.subset(self.options.score_examples, seed=c.seed)
            texts, labels = rows.texts, rows.labels
        return baseline_state(self.criterion, c.base, texts, labels, self.options.target_sparsity,
                              seed=c.seed, progress=c.progress, protected=self.protected_heads())

    def protected_heads(self):
        """(L, H) bool of the heads with a role (protect_roles), else None."""
        return role_heads(self.context, self.options.score_examples) if self.options.protect_roles else None

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
