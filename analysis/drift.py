"""Explanation drift: does a pruned model still predict for the same reasons as the dense model?

Both models explain the same fixed texts by LRP (`analysis.lrp_pass`, one pass per batch gives the
head and the token relevance), the pruned one for the class the *dense* model predicts, so both
explanations are of the same logit. Three figures (`Drift`):

    head_spearman    Spearman rank correlation, over the heads the pruned model kept, of Voita's head
                     relevance mean_n |r_nlh| / sum_kept |r_nlh| (each example's share among the kept
                     heads, for both models)
    token_spearman   per example, Spearman correlation of the signed per-token relevance ("why this
    token_topk       prediction") and the overlap |top_k(dense) & top_k(pruned)| / k of the k tokens of
                     largest |relevance| (k = min(top_k, tokens)); both averaged over examples
    flipped          share of examples whose summed token relevance (the input's share of the explained
                     logit) has another sign for the pruned model than for the dense one (a zero sum
                     counts as its own sign)

Special tokens ([CLS], [SEP], a decoder's BOS) are left out of the token figures (they carry a large,
near-constant share); a prompted decoder's template tokens stay in. Identical models give 1, 1 and 0.

Head numbering: a physically pruned model (`pruning.surgery.prune`) has fewer heads per layer; its
heads are put back at the dense model's (layer, head) indices from the kept-head plan it carries
(`core.structure.pruning_info`). This explains the model that is actually measured and exported (a
run's fine-tuned snapshot), which a gated dense model (`pruning.hooks.gated`) cannot: its weights are
the dense ones. Decoders are explained by their prompt classifier's label-word logit; language
modelling runs have no class to explain.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from analysis.lrp_pass import ClassLogit, check_method, head_counts, lrp_pass
from core.batching import collate, encode, sorted_batches
from core.structure import pruning_info

TOP_K = 5  # tokens compared by `token_topk`


@dataclass
class Explanations:
    """N texts explained by one model (logit units), in the dense model's head numbering."""

    heads: np.ndarray  # (N, L, H) signed head relevance r_nlh; NaN for heads the model does not have
    tokens: list[np.ndarray]  # N arrays (T_n,) signed relevance per token, special tokens left out
    targets: np.ndarray  # (N,) int64 class explained
    logits: np.ndarray  # (N,) the explained logit


@dataclass
class Drift:
    """A pruned model's explanations against the dense model's on `examples` texts (see the module docstring).

    Correlations are in [-1, 1] (NaN where undefined: fewer than 2 heads kept, constant relevance),
    `token_topk` and `flipped` fractions in [0, 1]."""

    examples: int
    head_spearman: float
    heads_compared: int  # kept heads the head correlation runs over
    token_spearman: float
    token_topk: float
    top_k: int
    flipped: float

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- figures


def ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of a 1-d array, ties sharing their average rank (float64)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_x)) + 1]  # first index of each run of equal values
    ends = np.r_[starts[1:], len(x)]
    out = np.empty(len(x))
    for s, e in zip(starts, ends):
        out[order[s:e]] = (s + e + 1) / 2  # mean of ranks s+1 .. e
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two equal-length 1-d arrays (Pearson of the average ranks); NaN for
    fewer than 2 values or a constant array."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"spearman() needs two 1-d arrays of one length. Got shapes {a.shape} and {b.shape}.")
    if len(a) < 2:
        return float("nan")
    ra, rb = ranks(a) - (len(a) + 1) / 2, ranks(b) - (len(b) + 1) / 2
    norm = np.sqrt((ra**2).sum() * (rb**2).sum())
    return float((ra * rb).sum() / norm) if norm > 0 else float("nan")


def top_k_overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """|top_k(|a|) & top_k(|b|)| / k' with k' = min(k, len(a)); ties keep the earlier index."""
    if len(a) != len(b) or len(a) == 0:
        raise ValueError(f"top_k_overlap() needs two non-empty arrays of one length. Got {len(a)} and {len(b)}.")
    k = min(k, len(a))
    top = [set(np.argsort(-np.abs(np.asarray(x, dtype=np.float64)), kind="stable")[:k].tolist()) for x in (a, b)]
    return len(top[0] & top[1]) / k


def head_shares(heads: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """(N, L, H) signed relevance -> (K,) mean over examples of |r| / sum over the K `kept` heads of |r|
    (`kept` an (L, H) bool mask); an example whose kept heads all have 0 relevance contributes 0."""
    r = np.abs(heads[:, kept])  # (N, K)
    total = r.sum(axis=1, keepdims=True)
    return np.mean(np.divide(r, total, out=np.zeros_like(r), where=total > 0), axis=0)


def compare(dense: Explanations, pruned: Explanations, top_k: int = TOP_K) -> Drift:
    """The drift of `pruned` from `dense`: both explain the same texts and the same classes."""
    n = len(dense.tokens)
    if n == 0 or len(pruned.tokens) != n or dense.heads.shape != pruned.heads.shape:
        raise ValueError(f"compare() needs explanations of the same texts in one head numbering. Got {n} and "
                         f"{len(pruned.tokens)} texts, heads {dense.heads.shape} and {pruned.heads.shape}.")
    if not np.array_equal(dense.targets, pruned.targets):
        raise ValueError("compare() needs both models to explain the same classes (explain the pruned model "
                         "for the dense model's targets).")
    kept = ~np.isnan(pruned.heads[0]) & ~np.isnan(dense.heads[0])  # (L, H)
    token_rho = [spearman(a, b) for a, b in zip(dense.tokens, pruned.tokens)]
    overlap = [top_k_overlap(a, b, top_k) for a, b in zip(dense.tokens, pruned.tokens) if len(a)]
    signs = [np.sign(a.sum()) != np.sign(b.sum()) for a, b in zip(dense.tokens, pruned.tokens)]
    return Drift(examples=n, head_spearman=spearman(head_shares(dense.heads, kept), head_shares(pruned.heads, kept)),
                 heads_compared=int(kept.sum()),
                 token_spearman=float(np.nanmean(token_rho)) if not np.all(np.isnan(token_rho)) else float("nan"),
                 token_topk=float(np.mean(overlap)) if overlap else float("nan"), top_k=top_k,
                 flipped=float(np.mean(signs)))


# ----------------------------------------------------------------------------- explaining


def dense_heads(loaded, heads: np.ndarray) -> np.ndarray:
    """(N, L, H') head relevance of `loaded` -> (N, L, H) at the unpruned model's head indices: a pruned
    model's kept heads go back where its plan says they came from, every other head is NaN."""
    info = pruning_info(loaded.model)
    if info is None:
        return heads
    plan, shape = info.plan, info.original
    if len(plan.heads) != heads.shape[1]:
        raise ValueError(f"The pruned model has {heads.shape[1]} layers; its plan lists {len(plan.heads)}.")
    out = np.full((heads.shape[0], shape.layers, shape.heads), np.nan)
    for layer, kept in enumerate(plan.heads):
        if kept:
            out[:, layer, kept] = heads[:, layer, : len(kept)]
    return out


def explain(loaded, texts: Sequence[str], target: Sequence[int] | None = None, *, batch_size: int = 16,
            method: str = "conservative") -> Explanations:
    """LRP of each text's class logit (`target`: one class per text; None: each text's predicted class),
    heads in the unpruned model's numbering (`dense_heads`). `loaded` in eval mode, on the CPU."""
    check_method(method, "explain()")
    if isinstance(texts, str) or len(texts) == 0:
        raise ValueError(f"explain() needs a non-empty list of texts. Got {texts!r}.")
    if target is not None and len(target) != len(texts):
        raise ValueError(f"explain() needs one target per text ({len(texts)}). Got {len(target)}.")
    if (loaded.lm or loaded.model).training:
        raise ValueError("explain() needs the model in eval mode (dropout breaks conservation).")
    tok = loaded.tokenizer
    enc = encode(tok, list(texts), loaded.max_length)
    special = set(getattr(loaded.text_tokenizer if loaded.is_decoder else tok, "all_special_ids", []))
    targets = None if target is None else np.asarray(target, dtype=np.int64)
    n, counts = len(enc), head_counts(loaded.adapter)
    heads, logits = np.zeros((n, len(counts), max(counts, default=0))), np.zeros(n)
    explained, tokens = np.zeros(n, dtype=np.int64), [np.zeros(0)] * n
    for idx in sorted_batches(enc, batch_size):
        batch = collate([enc.ids[i] for i in idx], tok.pad_token_id or 0)
        out = lrp_pass(loaded, batch, ClassLogit(None if targets is None else targets[idx]), method)
        heads[idx], logits[idx], explained[idx] = out.heads, out.logits, out.targets
        for row, i in enumerate(idx):
            ids = enc.ids[i]
            tokens[i] = out.tokens[row, : len(ids)][[t not in special for t in ids]]
    return Explanations(heads=dense_heads(loaded, heads), tokens=tokens, targets=explained, logits=logits)


def drift(dense, pruned, texts: Sequence[str], *, reference: Explanations | None = None, top_k: int = TOP_K,
          batch_size: int = 16, method: str = "conservative") -> Drift:
    """The drift of `pruned` (a physically pruned copy of `dense`, or any model with its heads) from
    `dense` on `texts`; `reference` may pass `explain(dense, texts)` from an earlier call (it does not change)."""
    reference = reference if reference is not None else explain(dense, texts, batch_size=batch_size, method=method)
    if len(reference.tokens) != len(texts):
        raise ValueError(f"The reference explains {len(reference.tokens)} texts; {len(texts)} were given.")
    return compare(reference, explain(pruned, texts, reference.targets, batch_size=batch_size, method=method), top_k)
