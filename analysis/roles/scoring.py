"""Voita et al. (2019) head roles — positional, syntactic, rare-word — scored on word-level attention.

The scoring (`score_heads`, `typical_sentences`, `top_attended_words`) is pure numpy/pandas on
`SentenceView`s, so tests can plant patterns; `analyse_roles` / `head_roles` is the thin driver that
captures attention, parses with spaCy and looks up word frequencies.

Conventions, all at the word level (see `analysis.attention.word_attention`; [CLS]/[SEP] are not words,
rows are not renormalised):
- a head's "choice" for source word i is the argmax of row i; relative offset = choice − i. A row whose
  maximum is shared by several words (a flat row) makes no choice: it never hits anything;
- confidence = mean over all words of the row maximum (a uniform head over W words scores 1/W);
- positional: the most frequent offset o* (ties: nearest to 0); positional_frac = words choosing o* / words
  for which i+o* lies inside the sentence (the first word has no −1 neighbour, so it does not count
  against a −1 head);
- syntactic, relation r, direction dep2head (source = dependent, target = its head) or head2dep (source =
  head, target = dependent; a head with two dependents of r gives two pairs): accuracy = share of pairs
  whose source chooses its partner; baseline = share of pairs whose partner sits at the most frequent
  offset of that relation+direction (same for every head); syntactic if pairs >= min_pairs and
  accuracy >= baseline + syntactic_margin;
- rare-word: per sentence the head's most-attended word is the argmax of the column sums (attention
  received from all source words); a hit if it is the sentence's least frequent word (ties all count;
  words with NaN zipf — punctuation — are never candidates). Only sentences with >= min_words words whose
  rarest word has zipf < rare_max_zipf (≈ outside wordfreq's top 500, as in Voita) are scored; chance =
  mean over those sentences of (#rarest words)/W. Summing over a target's pieces favours long words, and
  rare words are long (on Rotten Tomatoes a head spreading attention evenly over tokens "hits" the rarest
  word in ~45% of sentences), so rare_piece_baseline = expected hit rate of "pick a word with the most
  pieces" is a second bar: rare if hit rate >= max(rare_factor·chance, chance + rare_margin,
  rare_piece_baseline + rare_margin) over >= min_sentences sentences.

Causal views (decoders: word i attends to words 0..i only; anything above the diagonal is zeroed and never
used) change three things, each so that a head is only asked for what the mask lets it do:
- positional: o* is the most frequent offset among o <= −1, the previous-word direction (a decoder cannot
  attend to the next word, and attending to oneself, o = 0, is not a positional role); the first word has
  no left neighbour and does not count;
- syntactic: only arcs whose partner comes before the source are pairs (an adjective looking at the noun
  after it is out of reach); accuracy and baseline are over those pairs, and a relation+direction whose
  partners mostly come later falls below min_pairs;
- rare-word: a word's received attention is the mean over the strictly later words (the only ones that can
  attend to it besides itself; column sums would favour the first words, which every word sees), and the
  last word, which no later word reads, is never a candidate; chance = (#rarest words)/(W − 1).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

RELATIONS = ("nsubj", "dobj", "amod", "advmod")
DIRECTIONS = ("dep2head", "head2dep")
_ALIASES = {"obj": "dobj"}  # UD-style spaCy models say obj where ClearNLP-style ones say dobj
ROLE_PATTERN = re.compile(r"^(positional)\((-?\d+)\)$|^(syntactic)\((\w+):(dep2head|head2dep)\)$|^(rare-word)$")


@dataclass
class SentenceView:
    """What role scoring needs from one sentence of W words.

    `attention[l, h, i, j]`: word-level attention from word i to word j (layers, heads, W, W);
    `heads_dep[i]`: index of word i's syntactic head among the W words, -1 for the root or unaligned words;
    `deprels[i]`: word i's dependency label ('' if unaligned); `zipf[i]`: wordfreq zipf frequency of the
    lower-cased word (NaN = never a rare-word candidate, e.g. punctuation); `words`: optional display text;
    `pieces[i]`: optional number of tokens of word i (empty = one each), for the rare-word piece baseline;
    `causal`: a decoder's view (see the module docstring): attention above the diagonal is zeroed.
    """

    attention: np.ndarray  # (layers, heads, W, W) float32
    heads_dep: list[int]  # (W,)
    deprels: list[str]  # (W,)
    zipf: list[float]  # (W,)
    words: list[str] = field(default_factory=list)  # (W,) or empty
    pieces: list[int] = field(default_factory=list)  # (W,) or empty
    causal: bool = False

    def __post_init__(self) -> None:
        att = np.asarray(self.attention)
        if att.ndim != 4 or att.shape[2] != att.shape[3]:
            raise ValueError(f"SentenceView.attention must have shape (layers, heads, W, W). Got {att.shape} instead.")
        w = att.shape[-1]
        for name in ("heads_dep", "deprels", "zipf") + tuple(n for n in ("words", "pieces") if getattr(self, n)):
            if len(getattr(self, name)) != w:
                raise ValueError(f"SentenceView.{name} must have one entry per word (W={w}). "
                                 f"Got {len(getattr(self, name))} instead.")
        if self.causal:
            att = np.where(np.triu(np.ones((w, w), dtype=bool), 1) & ~np.isnan(att), 0.0, att).astype(att.dtype)
        self.attention = att

    @property
    def n_words(self) -> int:
        return self.attention.shape[-1]


def choices(scores: np.ndarray) -> np.ndarray:
    """argmax over the last axis, or -1 where the maximum is not unique (flat rows make no choice)."""
    best = scores.max(-1, keepdims=True)
    flat = (scores >= best * (1 - 1e-6)).sum(-1) > 1
    return np.where(flat, -1, scores.argmax(-1))


def canonical_relation(label: str) -> str:
    return _ALIASES.get(label, label)


def relation_pairs(view: SentenceView, relation: str, direction: str) -> tuple[np.ndarray, np.ndarray]:
    """(source, target) word indices of every `relation` arc in `direction`, each (n,) int64; a causal
    view keeps the arcs whose target comes before the source."""
    w = view.n_words
    deps = [i for i, (h, r) in enumerate(zip(view.heads_dep, view.deprels))
            if canonical_relation(r) == relation and 0 <= h < w and h != i]
    dep = np.array(deps, dtype=np.int64)
    head = np.array([view.heads_dep[i] for i in deps], dtype=np.int64)
    src, tgt = (dep, head) if direction == "dep2head" else (head, dep)
    if view.causal:
        keep = tgt < src
        src, tgt = src[keep], tgt[keep]
    return src, tgt


def rarest_words(view: SentenceView, *, min_words: int, rare_max_zipf: float | None) -> np.ndarray | None:
    """(W,) bool mask of the sentence's least frequent word(s), or None if the sentence is not scored.
    A causal view's last word is never a candidate."""
    z = np.asarray(view.zipf, dtype=np.float64)
    ok = np.isfinite(z)
    if view.causal and len(ok):
        ok[-1] = False
    if view.n_words < min_words or not ok.any():
        return None
    low = z[ok].min()
    if rare_max_zipf is not None and low >= rare_max_zipf:
        return None
    return ok & (z <= low + 1e-9)


def received(att: np.ndarray, causal: bool) -> np.ndarray:
    """Attention each word receives, (..., W, W) → (..., W): the mean over all W source words of column j;
    causal: the mean over the words i > j (the last word, read by none, gets 0)."""
    w = att.shape[-1]
    if not causal:
        return att.sum(-2) / max(w, 1)
    later = np.tril(np.ones((w, w), dtype=att.dtype), -1)  # later[i, j] = 1 if i > j
    readers = np.maximum(w - 1 - np.arange(w), 1)
    return (att * later).sum(-2) / readers


def candidates(view: SentenceView) -> int:
    """Number of words that can be the rare-word head's choice: W, or W − 1 in a causal view."""
    return max(view.n_words - 1, 0) if view.causal else view.n_words


class _Tally:
    """Running sums over sentences; arrays are (layers, heads) unless noted."""

    def __init__(self, layers: int, heads: int, max_words: int, relations: tuple[str, ...], causal: bool):
        shape = (layers, heads)
        self.layers, self.heads, self.max_words, self.relations = layers, heads, max_words, relations
        self.causal = causal
        self.words = 0
        self.confidence, self.mass = np.zeros(shape), np.zeros(shape)  # sums of row max / row sum
        self.offsets = np.zeros(shape + (2 * max_words - 1,), dtype=np.int64)  # argmax-offset histogram
        self.eligible = np.zeros(2 * max_words - 1, dtype=np.int64)  # words for which offset o stays inside
        keys = [(r, d) for r in relations for d in DIRECTIONS]
        self.syn_hits = {k: np.zeros(shape, dtype=np.int64) for k in keys}
        self.syn_offsets: dict[tuple[str, str], Counter] = {k: Counter() for k in keys}  # partner offsets
        self.syn_pairs = dict.fromkeys(keys, 0)  # pairs per relation and direction
        self.rare_hits = np.zeros(shape, dtype=np.int64)
        self.rare_chance = 0.0
        self.rare_piece = 0.0
        self.rare_sentences = 0

    def add(self, view: SentenceView, *, min_words: int, rare_max_zipf: float | None) -> None:
        att = np.nan_to_num(view.attention, nan=0.0)  # (L, H, W, W)
        w = view.n_words
        choice = choices(att)  # (L, H, W) chosen target per source word, -1 = none
        self.words += w
        self.confidence += att.max(-1).sum(-1)
        self.mass += att.sum(-1).sum(-1)
        self._add_offsets(choice, w)
        for rel in self.relations:
            for direction in DIRECTIONS:
                src, tgt = relation_pairs(view, rel, direction)
                self.syn_hits[rel, direction] += (choice[:, :, src] == tgt).sum(-1)
                self.syn_offsets[rel, direction].update((tgt - src).tolist())
                self.syn_pairs[rel, direction] += len(src)
        rarest = rarest_words(view, min_words=min_words, rare_max_zipf=rare_max_zipf)
        if rarest is not None:
            n = candidates(view)
            top = choices(received(att, view.causal)[..., :n])  # (L, H) most-attended word, -1 = tie
            self.rare_hits += (top >= 0) & rarest[top]
            self.rare_chance += rarest.sum() / n
            pieces = (np.asarray(view.pieces) if view.pieces else np.ones(w))[:n]
            longest = pieces == pieces.max()
            self.rare_piece += (rarest[:n] & longest).sum() / longest.sum()
            self.rare_sentences += 1

    def _add_offsets(self, choice: np.ndarray, w: int) -> None:
        width = 2 * self.max_words - 1
        cells = self.layers * self.heads
        choice = choice.reshape(cells, w)
        made = choice >= 0
        bins = np.arange(cells)[:, None] * width + (choice - np.arange(w) + self.max_words - 1)
        counts = np.bincount(bins[made], minlength=cells * width)
        self.offsets += counts.reshape(self.layers, self.heads, width)
        span = np.arange(width) - (self.max_words - 1)
        self.eligible += np.clip(w - np.abs(span), 0, None)


def _check_shapes(sentences: Sequence[SentenceView]) -> tuple[int, int, bool, list[SentenceView]]:
    used = [s for s in sentences if s.n_words > 0]
    if not used:
        raise ValueError("score_heads() needs at least one sentence with words. Got none.")
    shapes = {s.attention.shape[:2] for s in used}
    if len(shapes) != 1 or len({s.causal for s in used}) != 1:
        raise ValueError(f"score_heads() needs every sentence from the same model; got head grids {sorted(shapes)} "
                         f"and causal flags {sorted({s.causal for s in used})}.")
    layers, heads = shapes.pop()
    return layers, heads, used[0].causal, used


def score_heads(
    sentences: Sequence[SentenceView],
    *,
    positional_threshold: float = 0.9,
    syntactic_margin: float = 0.10,
    relations: Sequence[str] = RELATIONS,
    min_pairs: int = 20,
    rare_factor: float = 2.0,
    rare_margin: float = 0.2,
    rare_max_zipf: float | None = 5.3,
    min_words: int = 3,
    min_sentences: int = 10,
) -> pd.DataFrame:
    """Score every head for Voita's roles (definitions in the module docstring, causal views included).

    Args:
        sentences: word-level views, all from one model (all causal or none); sentences without words are
            skipped.
        positional_threshold: positional_frac needed to call a head positional (fraction).
        syntactic_margin: accuracy above the offset baseline needed to call a head syntactic (fraction).
        relations: dependency labels scored; spaCy's `obj` counts as `dobj`.
        min_pairs: a relation+direction with fewer pairs over all sentences never makes a head syntactic (too
            noisy); the pairs are the relation's arcs, or (causal) the arcs whose partner comes first.
        rare_factor, rare_margin: rare if rare_hit_rate >= max(rare_factor * chance, chance + rare_margin,
            rare_piece_baseline + rare_margin).
        rare_max_zipf: only sentences whose rarest word has zipf below this count (None: all).
        min_words: sentences shorter than this are left out of the rare-word score.
        min_sentences: fewer scored sentences never make a head rare-word.

    Returns:
        One row per (layer, head): layer, head, confidence, word_mass (mean row sum: attention share
        on words rather than specials), positional_offset (int, words), positional_frac, positional,
        per relation r: r_pairs (arcs), r_dep2head, r_dep2head_baseline, r_head2dep, r_head2dep_baseline
        (causal: also r_dep2head_pairs, r_head2dep_pairs);
        syntactic, rare_hit_rate, rare_chance, rare_piece_baseline, rare_sentences, rare_word, roles ("+"-joined, e.g.
        "positional(-1)+syntactic(amod:dep2head)", "" for none). Fractions are in [0, 1]; accuracies
        of relations without pairs are NaN. Heads that are NaN (pruned away) are left out.
    """
    if not 0 < positional_threshold <= 1:
        raise ValueError(f"The 'positional_threshold' parameter of score_heads() must be in (0, 1]. "
                         f"Got {positional_threshold} instead.")
    rels = tuple(dict.fromkeys(canonical_relation(r) for r in relations))
    layers, heads, causal, used = _check_shapes(sentences)
    present = ~np.isnan(used[0].attention).all(axis=(2, 3))  # (L, H); pruned heads are NaN
    tally = _Tally(layers, heads, max(s.n_words for s in used), rels, causal)
    for view in used:
        tally.add(view, min_words=min_words, rare_max_zipf=rare_max_zipf)
    table = _table(tally)
    table["positional"] = table["positional_frac"] >= positional_threshold
    syn_roles = _syntactic_roles(table, rels, tally, syntactic_margin, min_pairs)
    table["syntactic"] = [bool(r) for r in syn_roles]
    table["rare_word"] = False
    if tally.rare_sentences >= min_sentences:
        chance, piece = (x / tally.rare_sentences for x in (tally.rare_chance, tally.rare_piece))
        bar = max(rare_factor * chance, chance + rare_margin, piece + rare_margin)
        table["rare_word"] = table["rare_hit_rate"] >= bar
    table["roles"] = [
        "+".join(([f"positional({off})"] if pos else []) + syn + (["rare-word"] if rare else []))
        for pos, off, syn, rare in zip(table["positional"], table["positional_offset"], syn_roles, table["rare_word"])
    ]
    table = table[present.ravel()].reset_index(drop=True)
    table.attrs["params"] = dict(positional_threshold=positional_threshold, syntactic_margin=syntactic_margin,
                                 relations=list(rels), min_pairs=min_pairs, rare_factor=rare_factor,
                                 rare_margin=rare_margin, rare_max_zipf=rare_max_zipf, min_words=min_words,
                                 min_sentences=min_sentences, sentences=len(used), words=tally.words,
                                 causal=causal)
    return table


def _table(t: _Tally) -> pd.DataFrame:
    """Numbers per head from the tallies, before thresholds."""
    layer, head = np.meshgrid(np.arange(t.layers), np.arange(t.heads), indexing="ij")
    offset = np.arange(2 * t.max_words - 1) - (t.max_words - 1)  # offset per bin
    span = np.abs(offset)
    counts = np.where(offset < 0, t.offsets, -1) if t.causal else t.offsets  # causal: previous words only
    top = counts == counts.max(-1, keepdims=True)
    best = np.where(top, span, span.max() + 1).argmin(-1)  # (L, H) most frequent offset, ties → nearest 0
    count = np.take_along_axis(np.maximum(counts, 0), best[..., None], -1)[..., 0]
    cols: dict[str, np.ndarray] = {
        "layer": layer.ravel(), "head": head.ravel(),
        "confidence": (t.confidence / t.words).ravel(),
        "word_mass": (t.mass / t.words).ravel(),
        "positional_offset": (best - (t.max_words - 1)).ravel(),
        "positional_frac": (count / np.maximum(t.eligible[best], 1)).ravel(),
    }
    for rel in t.relations:
        # arcs of the relation: each is a pair in both directions, or (causal) in the one whose partner comes first
        arcs = t.syn_pairs[rel, "dep2head"] + t.syn_pairs[rel, "head2dep"] if t.causal else t.syn_pairs[rel, "dep2head"]
        cols[f"{rel}_pairs"] = np.full(layer.size, arcs)
        for direction in DIRECTIONS:
            hits, offsets, n = t.syn_hits[rel, direction], t.syn_offsets[rel, direction], t.syn_pairs[rel, direction]
            if t.causal:
                cols[f"{rel}_{direction}_pairs"] = np.full(layer.size, n)
            cols[f"{rel}_{direction}"] = (hits / n).ravel() if n else np.full(layer.size, np.nan)
            baseline = offsets.most_common(1)[0][1] / n if n else np.nan
            cols[f"{rel}_{direction}_baseline"] = np.full(layer.size, baseline)
    s = t.rare_sentences
    cols["rare_hit_rate"] = (t.rare_hits / s).ravel() if s else np.full(layer.size, np.nan)
    cols["rare_chance"] = np.full(layer.size, t.rare_chance / s if s else np.nan)
    cols["rare_piece_baseline"] = np.full(layer.size, t.rare_piece / s if s else np.nan)
    cols["rare_sentences"] = np.full(layer.size, s)
    return pd.DataFrame(cols)


def _syntactic_roles(table: pd.DataFrame, rels, t: _Tally, margin: float, min_pairs: int) -> list[list[str]]:
    """Per row, the "syntactic(rel:direction)" labels the head earns."""
    out: list[list[str]] = [[] for _ in range(len(table))]
    for rel in rels:
        for direction in DIRECTIONS:
            if t.syn_pairs[rel, direction] < min_pairs:
                continue
            col = f"{rel}_{direction}"
            wins = table[col].to_numpy() >= table[f"{col}_baseline"].to_numpy() + margin
            for i in np.flatnonzero(wins):
                out[i].append(f"syntactic({rel}:{direction})")
    return out
