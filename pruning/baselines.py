"""One-shot pruning baselines: close the least important heads and FFN units until a target sparsity.

Heads are ranked over the whole model by one score (L, H):

    relevance   Voita et al. (2019): conservative-LRP head relevance (`analysis.relevance.HeadRelevance`)
    importance  Michel et al. (2019): |dL/d gate| per head, normalised per layer (`michel_importance`)
    random      a seeded random draw

FFN units are ranked per layer by weight magnitude (random for the random baseline); hidden dims are
kept. The same keep fraction k applies to heads and to FFN units, and k is found by bisection so that
CoFi's exact sparsity (`pruning.size.exact_sparsity`, a fraction of the encoder's weights) is as close
as possible to the target. The state is then sliced by `pruning.surgery.prune` and fine-tuned by the
same loop as the learned methods (`pruning.train`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from core.adapter import GateShape
from pruning.gate_state import GateState
from pruning.size import SizeModel
from pruning.sparsity_search import check_target, closest_state

BASELINES = ("relevance", "importance", "random")
Progress = Callable[[int, int, str], None]


def head_scores(method: str, loaded, texts: Sequence[str], labels: Sequence[int], *, seed: int = 0,
                progress: Progress | None = None) -> torch.Tensor:
    """(L, H) float32 head scores (higher = more important) of `loaded` (unpruned, eval mode) by `method`.

    `texts`/`labels` (class ids of the model) are the examples the data-driven scores average over.
    """
    if method not in BASELINES:
        raise ValueError(f"The 'method' parameter of head_scores() must be one of {', '.join(BASELINES)}. "
                         f"Got {method!r} instead.")
    shape = GateShape.of(loaded)
    if method == "random":
        return torch.rand((shape.layers, shape.heads), generator=torch.Generator().manual_seed(seed))
    if not texts:
        raise ValueError("The 'texts' parameter of head_scores() is empty: the scores need examples.")
    from analysis.relevance import HeadRelevance, michel_importance

    if method == "relevance":
        scores = HeadRelevance(loaded).attribute(list(texts), progress=progress).relevance
    else:
        scores = michel_importance(loaded, list(texts), list(labels))
    return torch.as_tensor(np.nan_to_num(scores, nan=0.0), dtype=torch.float32)


def keep_state(loaded, scores: torch.Tensor, keep: float, ffn_criterion: str = "magnitude", seed: int = 0) -> GateState:
    """Keep the round(keep * L * H) highest-scoring heads (over all layers) and round(keep * d_ff) FFN units
    per layer (by `ffn_criterion`); `keep` in (0, 1]."""
    shape = GateShape.of(loaded)
    n = max(1, min(shape.layers * shape.heads, int(np.floor(keep * shape.layers * shape.heads + 0.5))))
    flat = scores.reshape(-1)
    order = torch.argsort(-flat, stable=True)[:n]
    mask = torch.zeros_like(flat)
    mask[order] = 1.0
    state = GateState.dense(shape).replace(head=mask.reshape(shape.layers, shape.heads))
    return state.with_ffn_keep(loaded.adapter, keep, criterion=ffn_criterion, seed=seed)


def baseline_state(method: str, loaded, texts: Sequence[str], labels: Sequence[int], target: float, *,
                   seed: int = 0, progress: Progress | None = None,
                   protected: torch.Tensor | None = None) -> GateState:
    """The one-shot gate state of baseline `method` whose exact sparsity is closest to `target` (fraction).

    `protected` (L, H) bool: heads ranked above every other head (`analysis.roles.survival.protect_scores`)."""
    check_target(target, "baseline_state()")
    scores = head_scores(method, loaded, texts, labels, seed=seed, progress=progress)
    if protected is not None:
        from analysis.roles.survival import protect_scores

        scores = protect_scores(scores, protected)
    criterion = "random" if method == "random" else "magnitude"
    return closest_state(lambda keep: keep_state(loaded, scores, keep, criterion, seed), SizeModel.of(loaded), target)
