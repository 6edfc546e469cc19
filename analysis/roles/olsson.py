"""Decoder head roles of Olsson et al. (2022, "In-context learning and induction heads"), scored per query
head the TransformerLens way: previous-token, duplicate-token and induction.

Scores, each a mean attention weight in [0, 1] (rows of A = queries, no renormalisation):
- previous_token_score: mean of A[i, i-1] over every natural-text position i whose token and previous token
  are both real (not the start token), pooled over the role sentences (`previous_token_scores`);
- duplicate_score and induction_score on repeated random tokens S = [start, r_1..r_T, r_1..r_T], r_1..r_T
  distinct non-special tokens drawn with a seeded generator (`repeated_tokens`): the second copy's r_k
  sits at T+k and its earlier occurrence at k, so duplicate = mean over k = 1..T of A[T+k, k] (the same
  token earlier) and induction = mean over k = 1..T-1 of A[T+k, k+1] (the token that followed it);
  averaged over the seeds (`repeat_scores`). Without a start token every index shifts down by one.
A random sequence has no meaning or grammar to attend to, so only copying mechanisms score there;
TransformerLens's head detector divides by all of A's mass, first copy included, which halves these.

A head plays the role when its score is above the threshold, 0.4 for each (the detectors of the
TransformerLens/ARENA induction-head tutorial call a head previous-token, duplicate or induction past 0.4).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.attention import AttentionRecord, forward_attention, start_token
from core.batching import collate

ROLES = ("previous-token", "duplicate-token", "induction")
SCORES = {"previous-token": "prev_token_score", "duplicate-token": "duplicate_score", "induction": "induction_score"}


@dataclass(frozen=True)
class OlssonConfig:
    """Repeated random sequences (`length` tokens twice, one sequence per seed) and the role thresholds."""

    length: int = 50
    seeds: tuple[int, ...] = (0, 1, 2, 3)
    previous_threshold: float = 0.4
    duplicate_threshold: float = 0.4
    induction_threshold: float = 0.4

    def __post_init__(self) -> None:
        if self.length < 2 or not self.seeds:
            raise ValueError(f"OlssonConfig needs length >= 2 and at least one seed. Got length {self.length} and "
                             f"seeds {self.seeds}.")

    def threshold(self, role: str) -> float:
        return {"previous-token": self.previous_threshold, "duplicate-token": self.duplicate_threshold,
                "induction": self.induction_threshold}[role]


def repeated_tokens(vocab_size: int, special_ids: Sequence[int], length: int, seed: int,
                    start: int | None) -> list[int]:
    """[start, r_1..r_T, r_1..r_T] (2T or 2T+1 ids): T = `length` distinct ids in [0, vocab_size) outside
    `special_ids`, drawn by `np.random.default_rng(seed)`."""
    allowed = np.setdiff1d(np.arange(vocab_size), np.asarray(list(special_ids), dtype=np.int64))
    if len(allowed) < length:
        raise ValueError(f"A vocabulary of {len(allowed)} ordinary tokens cannot give {length} distinct ones.")
    tokens = np.random.default_rng(seed).choice(allowed, size=length, replace=False).tolist()
    return ([] if start is None else [start]) + tokens + tokens


def repeat_scores(attention: np.ndarray, length: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """Duplicate and induction scores of one repeated sequence (see the module docstring).

    Args:
        attention: (layers, heads, N, N) with N = 2 * length + offset.
        offset: 1 if the sequence starts with a start token, else 0.

    Returns:
        (duplicate, induction), each (layers, heads).
    """
    if attention.shape[-1] != 2 * length + offset:
        raise ValueError(f"repeat_scores() needs N = 2 * length + offset = {2 * length + offset} positions. "
                         f"Got {attention.shape[-1]} instead.")
    k = np.arange(length) + offset  # the first copy's positions
    second = k + length
    duplicate = attention[..., second, k].mean(-1)
    induction = attention[..., second[:-1], k[1:]].mean(-1)
    return duplicate, induction


def previous_token_scores(records: Sequence[AttentionRecord]) -> np.ndarray:
    """(layers, heads) mean of A[i, i-1] over positions whose token and previous token are both real
    (word id not None), pooled over the records' tokens; NaN without any such position."""
    if not records:
        raise ValueError("previous_token_scores() needs at least one record. Got none.")
    total, count = np.zeros(records[0].attention.shape[:2]), 0
    for rec in records:
        real = np.array([w is not None for w in rec.word_ids], dtype=bool)
        i = np.flatnonzero(real[1:] & real[:-1]) + 1
        total += rec.attention[..., i, i - 1].sum(-1)  # (L, H)
        count += len(i)
    return total / count if count else np.full_like(total, np.nan)


def repeat_attention(loaded, config: OlssonConfig) -> tuple[np.ndarray, np.ndarray]:
    """Mean (duplicate, induction) scores, each (layers, heads), of `loaded`'s decoder over the seeds."""
    tokenizer = loaded.text_tokenizer
    start = start_token(tokenizer, loaded.model.config)
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    vocab = min(int(loaded.model.config.vocab_size), len(tokenizer))
    ids = [repeated_tokens(vocab, sorted(special), config.length, seed, start) for seed in config.seeds]
    stacked = forward_attention(loaded, collate(ids, 0))  # (seeds, L, H, N, N), all of one length
    duplicate, induction = repeat_scores(stacked, config.length, int(start is not None))
    return duplicate.mean(0), induction.mean(0)


def olsson_table(loaded, records: Sequence[AttentionRecord], config: OlssonConfig = OlssonConfig()) -> pd.DataFrame:
    """Per head: layer, head, prev_token_score (on `records`, natural text), duplicate_score,
    induction_score (on repeated random tokens), and the roles past the thresholds as "+"-joined labels
    of `ROLES` in `olsson_roles`. `attrs["params"]`: the config. Pruned (NaN) heads are left out."""
    if not loaded.is_decoder:
        raise ValueError("Olsson's previous-token, duplicate and induction scores are for decoders (causal attention).")
    duplicate, induction = repeat_attention(loaded, config)
    previous = previous_token_scores(records)
    layer, head = np.meshgrid(np.arange(duplicate.shape[0]), np.arange(duplicate.shape[1]), indexing="ij")
    table = pd.DataFrame({"layer": layer.ravel(), "head": head.ravel(), "prev_token_score": previous.ravel(),
                          "duplicate_score": duplicate.ravel(), "induction_score": induction.ravel()})
    table["olsson_roles"] = [
        "+".join(role for role in ROLES if row[SCORES[role]] > config.threshold(role))
        for _, row in table.iterrows()
    ]
    table = table[~np.isnan(duplicate.ravel())].reset_index(drop=True)  # pruned heads are NaN
    table.attrs["params"] = dict(length=config.length, seeds=list(config.seeds),
                                 thresholds={r: config.threshold(r) for r in ROLES})
    return table


def add_olsson(roles: pd.DataFrame, olsson: pd.DataFrame) -> pd.DataFrame:
    """The Voita role table with the Olsson score columns merged in and their labels appended to `roles`."""
    merged = roles.merge(olsson, on=["layer", "head"], how="left")
    extra = merged.pop("olsson_roles").fillna("")
    merged["roles"] = ["+".join(r for r in (voita, more) if r) for voita, more in zip(merged["roles"], extra)]
    merged.attrs["params"] = {**roles.attrs.get("params", {}), "olsson": olsson.attrs.get("params", {})}
    return merged
