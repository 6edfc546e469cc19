"""Examples per head for a role found by `analysis.roles.scoring`: the sentences where a head plays it
best and the words it attends to most (pure numpy/pandas on SentenceViews or AttentionRecords)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import pandas as pd

from analysis.attention import AttentionRecord
from analysis.roles.scoring import ROLE_PATTERN, SentenceView, canonical_relation, choices, rarest_words, relation_pairs


def _word_level(item) -> np.ndarray:
    """(layers, heads, W, W) word attention of a SentenceView or an AttentionRecord."""
    return item.word_attention() if isinstance(item, AttentionRecord) else item.attention


def parse_role(role: str) -> tuple[str, int | str | None, str | None]:
    """"positional(-1)" → ("positional", -1, None); "syntactic(amod:head2dep)" → ("syntactic", "amod",
    "head2dep"); "rare-word" → ("rare-word", None, None). Raises ValueError otherwise."""
    m = ROLE_PATTERN.match(role.strip())
    if not m:
        raise ValueError(f"The 'role' parameter must look like 'positional(-1)', 'syntactic(amod:head2dep)' or "
                         f"'rare-word'. Got {role!r} instead.")
    if m.group(1):
        return "positional", int(m.group(2)), None
    if m.group(3):
        return "syntactic", canonical_relation(m.group(4)), m.group(5)
    return "rare-word", None, None


def _fit(item, a: np.ndarray, kind: str, arg, direction, min_words: int) -> tuple[float, float, int, int] | None:
    """(score, weight, hits, n) of one sentence's (W, W) head attention `a` for a role; None if not applicable."""
    w = a.shape[-1]
    if kind == "positional":
        src = np.arange(max(0, -arg), min(w, w - arg))
        tgt = src + arg
    elif not isinstance(item, SentenceView):
        raise ValueError(f"Role '{kind}' needs SentenceViews (parses and frequencies), not {type(item).__name__}.")
    elif kind == "syntactic":
        src, tgt = relation_pairs(item, arg, direction)
    else:
        rarest = rarest_words(item, min_words=min_words, rare_max_zipf=None)
        if rarest is None:
            return None
        received = a.sum(0)  # (W,) attention received per word
        top = int(choices(received))
        hit = int(top >= 0 and rarest[top])
        return float(hit), float(received[rarest].sum() / max(received.sum(), 1e-12)), hit, 1
    if not len(src):
        return None
    hits = int((choices(a[src]) == tgt).sum())
    return hits / len(src), float(a[src, tgt].mean()), hits, len(src)


def typical_sentences(items: Sequence, layer: int, head: int, role: str, k: int = 5,
                      *, min_words: int = 3) -> pd.DataFrame:
    """The k sentences in which head (layer, head) best plays `role` (a label from `score_heads` roles).

    positional(o) / syntactic(r:dir): score = share of source words (pairs) whose argmax is the predicted
    target; rare-word: score = 1 if the most-attended word is the rarest, else 0. Ties are broken by
    `hits` (more evidence first), then by `weight`, the mean attention on the predicted targets (for
    rare-word: the share of all attention received that goes to the rarest word). Sentences where the
    role predicts nothing are left out.

    Args:
        items: SentenceViews (any role) or AttentionRecords (positional only), as given to the scorer.
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
    word-to-word attention (per source word) that lands on it, in [0, 1].

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
        share = np.nan_to_num(att[layer, head]).sum(0) / att.shape[-1]  # (W,)
        for word, mass in zip(words, share):
            total[word.lower()] += float(mass)
            count[word.lower()] += 1
    table = pd.DataFrame({"word": list(total), "count": [count[w] for w in total], "total": list(total.values())})
    table["mean"] = table["total"] / table["count"].clip(lower=1)
    return table.sort_values("total", ascending=False, kind="stable").head(k).reset_index(drop=True)
