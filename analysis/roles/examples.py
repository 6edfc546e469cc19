"""Examples per head for a role found by `analysis.roles.scoring` or `analysis.roles.olsson`: the sentences
where a head plays it best and the words it attends to most (pure numpy/pandas on SentenceViews or
AttentionRecords).

Olsson's roles are read on natural text at the word level: previous-token as positional(-1);
duplicate-token: a word that occurred before (same lower-cased text) should choose its latest earlier
occurrence j; induction: it should choose j + 1, the word that followed that occurrence, counted only when
j + 1 < i - 1 (a target that is the word itself or its previous word says nothing about induction)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import pandas as pd

from analysis.attention import AttentionRecord
from analysis.roles.olsson import ROLES as OLSSON_ROLES
from analysis.roles.scoring import (
    ROLE_PATTERN,
    SentenceView,
    candidates,
    canonical_relation,
    choices,
    rarest_words,
    received,
    relation_pairs,
)


def _word_level(item) -> np.ndarray:
    """(layers, heads, W, W) word attention of a SentenceView or an AttentionRecord."""
    return item.word_attention() if isinstance(item, AttentionRecord) else item.attention


def parse_role(role: str) -> tuple[str, int | str | None, str | None]:
    """"positional(-1)" → ("positional", -1, None); "syntactic(amod:head2dep)" → ("syntactic", "amod",
    "head2dep"); "rare-word" → ("rare-word", None, None); "induction" (or "previous-token",
    "duplicate-token") → ("induction", None, None). Raises ValueError otherwise."""
    if role.strip() in OLSSON_ROLES:
        return role.strip(), None, None
    m = ROLE_PATTERN.match(role.strip())
    if not m:
        raise ValueError(f"The 'role' parameter must look like 'positional(-1)', 'syntactic(amod:head2dep)', "
                         f"'rare-word' or one of {', '.join(OLSSON_ROLES)}. Got {role!r} instead.")
    if m.group(1):
        return "positional", int(m.group(2)), None
    if m.group(3):
        return "syntactic", canonical_relation(m.group(4)), m.group(5)
    return "rare-word", None, None


def repeat_pairs(words: Sequence[str], induction: bool) -> tuple[np.ndarray, np.ndarray]:
    """(source, target) word indices, each (n,) int64: every word that occurred before (lower-cased) and
    its latest earlier occurrence j (duplicate), or j + 1 when j + 1 < i - 1 (induction)."""
    last: dict[str, int] = {}
    src, tgt = [], []
    for i, word in enumerate(words):
        j = last.get(word.lower())
        if j is not None and (not induction or j + 1 < i - 1):
            src.append(i)
            tgt.append(j + 1 if induction else j)
        last[word.lower()] = i
    return np.array(src, dtype=np.int64), np.array(tgt, dtype=np.int64)


def _fit(item, a: np.ndarray, kind: str, arg, direction, min_words: int) -> tuple[float, float, int, int] | None:
    """(score, weight, hits, n) of one sentence's (W, W) head attention `a` for a role; None if not applicable."""
    w = a.shape[-1]
    if kind == "previous-token":
        kind, arg = "positional", -1
    if kind == "positional":
        src = np.arange(max(0, -arg), min(w, w - arg))
        tgt = src + arg
    elif kind in ("duplicate-token", "induction"):
        if len(item.words) != w:
            raise ValueError(f"Role '{kind}' needs the words of every sentence; build SentenceViews with words.")
        src, tgt = repeat_pairs(item.words, kind == "induction")
    elif not isinstance(item, SentenceView):
        raise ValueError(f"Role '{kind}' needs SentenceViews (parses and frequencies), not {type(item).__name__}.")
    elif kind == "syntactic":
        src, tgt = relation_pairs(item, arg, direction)
    else:
        rarest = rarest_words(item, min_words=min_words, rare_max_zipf=None)
        if rarest is None:
            return None
        n = candidates(item)
        got = received(a, item.causal)[:n]  # (n,) attention received per candidate word
        top = int(choices(got))
        hit = int(top >= 0 and rarest[top])
        return float(hit), float(got[rarest[:n]].sum() / max(got.sum(), 1e-12)), hit, 1
    if not len(src):
        return None
    hits = int((choices(a[src]) == tgt).sum())
    return hits / len(src), float(a[src, tgt].mean()), hits, len(src)


def typical_sentences(items: Sequence, layer: int, head: int, role: str, k: int = 5,
                      *, min_words: int = 3) -> pd.DataFrame:
    """The k sentences in which head (layer, head) best plays `role` (a label from `score_heads` roles).

    positional(o) / syntactic(r:dir) / Olsson's roles (module docstring): score = share of source words
    (pairs) whose argmax is the predicted target; rare-word: score = 1 if the most-attended word is the
    rarest, else 0. Ties are broken by
    `hits` (more evidence first), then by `weight`, the mean attention on the predicted targets (for
    rare-word: the share of all attention received that goes to the rarest word). Sentences where the
    role predicts nothing are left out.

    Args:
        items: SentenceViews (any role) or AttentionRecords (positional and Olsson's roles), as given to the
            scorer.
        min_words: shorter sentences are skipped for rare-word, as in `score_heads`.

    Returns:
        DataFrame with columns sentence (index into items), score, weight, hits, n; best first.
    """
    kind, arg, direction = parse_role(role)
    rows = []
    for idx, item in enumerate(items):
        att = _word_level(item)
        if att.shape[-1] == 0:
            continue
        fit = _fit(item, np.nan_to_num(att[layer, head]), kind, arg, direction, min_words)
        if fit is not None:
            rows.append((idx, *fit))
    table = pd.DataFrame(rows, columns=["sentence", "score", "weight", "hits", "n"])
    return table.sort_values(["score", "hits", "weight"], ascending=False, kind="stable").head(k).reset_index(drop=True)


def top_attended_words(items: Sequence, layer: int, head: int, k: int = 20) -> pd.DataFrame:
    """Words (lower-cased) that receive the most attention from head (layer, head) over all sentences.

    Per occurrence, the mass is the word's column sum divided by W: the share of the sentence's
    word-to-word attention (per source word) that lands on it, in [0, 1]. In a causal (decoder) sentence
    it is the mean attention from the later words, and the last word, which none reads, is left out.

    Args:
        items: AttentionRecords, or SentenceViews that carry `words`.

    Returns:
        DataFrame word, count (occurrences), total (summed mass), mean (total / count); by total, descending.
    """
    total: Counter = Counter()
    count: Counter = Counter()
    for item in items:
        att = _word_level(item)
        words = item.words
        if att.shape[-1] == 0:
            continue
        if len(words) != att.shape[-1]:
            raise ValueError("top_attended_words() needs the words of every sentence; build SentenceViews with words.")
        share = received(np.nan_to_num(att[layer, head]), item.causal)  # (W,)
        for word, mass in zip(words[: len(words) - item.causal], share):
            total[word.lower()] += float(mass)
            count[word.lower()] += 1
    table = pd.DataFrame({"word": list(total), "count": [count[w] for w in total], "total": list(total.values())})
    table["mean"] = table["total"] / table["count"].clip(lower=1)
    return table.sort_values("total", ascending=False, kind="stable").head(k).reset_index(drop=True)
