"""Eager attention capture per sentence, token → word aggregation, and HF-word ↔ spaCy alignment.

A "word" is what the tokenizer's pre-tokenizer saw (BERT splits punctuation off, so "don't" is the
three words "don", "'", "t"; a byte-level BPE decoder's pre-tokenizer keeps the leading space with the
word and splits contractions off, so "don't" is "Ġdon", "'t"); `word_ids()` and `offset_mapping` of a
fast tokenizer give the pieces of each word and its character span (without the leading space).

Decoders (Llama family) are run on the plain text, not the prompt: their plain tokenizer
(`LoadedModel.text_tokenizer`) and decoder stack (`adapter.base`), with the model's start token in
front when the tokenizer adds none (`start_token`). Their attention is causal (zero above the
diagonal) and their tokens are shown as the text they stand for ("Ġfilm" → " film", `readable_tokens`).
Everything returned is numpy; no function here keeps torch tensors alive.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from core.batching import Encoded, collate, sorted_batches
from core.evaluate import Progress


@dataclass
class AttentionRecord:
    """Attention of every head on one sentence, without padding.

    `attention[l, h, i, j]` is how much token i attends to token j in head h of layer l
    (rows sum to 1 over the T real tokens, specials included). `word_ids[t]` is the word of token t
    (None for [CLS]/[SEP]/<s>...); `words[w]` is `text[word_spans[w][0]:word_spans[w][1]]`.
    """

    text: str
    tokens: list[str]  # (T,) token strings, specials included
    word_ids: list[int | None]  # (T,) word index 0..W-1 of each token, None for special tokens
    words: list[str]  # (W,) words as the pre-tokenizer saw them
    word_spans: list[tuple[int, int]]  # (W,) character offsets [start, end) into `text`
    attention: np.ndarray  # (layers, heads, T, T) float32
    truncated: bool  # the text was cut at max_length tokens (words past the cut are absent)
    causal: bool = False  # a decoder's: token i attends to tokens 0..i only

    def word_attention(self) -> np.ndarray:
        """(layers, heads, W, W) word-level attention of this sentence; see `word_attention`."""
        return word_attention(self.attention, self.word_ids)


def _require_fast(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"Attention analysis needs a fast tokenizer (word_ids/offsets); got {type(tokenizer).__name__}. "
            "Save the model with a tokenizer.json."
        )


def _cut(seq: list, max_length: int, causal: bool) -> list:
    """Keep the first max_length-1 items and the last one (the closing special token), like core.batching;
    a decoder's sequence has no closing token and keeps its first max_length items."""
    if len(seq) <= max_length:
        return seq
    return seq[:max_length] if causal else seq[: max_length - 1] + [seq[-1]]


def _strip(text: str, start: int, end: int) -> tuple[int, int]:
    """The span without surrounding whitespace (a BPE word's offsets include its leading space); a
    whitespace-only word (a double space, a newline) keeps its span."""
    piece = text[start:end]
    if not piece.strip():
        return start, end
    return start + len(piece) - len(piece.lstrip()), end - (len(piece) - len(piece.rstrip()))


def _words(text: str, word_ids: list[int | None], offsets: list[tuple[int, int]]):
    """Renumber word ids densely 0..W-1 in order and derive each word's span and text from its pieces."""
    dense: dict[int, int] = {}
    spans: list[list[int]] = []
    new_ids: list[int | None] = []
    for wid, (start, end) in zip(word_ids, offsets):
        if wid is None:
            new_ids.append(None)
            continue
        if wid not in dense:
            dense[wid] = len(spans)
            spans.append([start, end])
        w = dense[wid]
        spans[w][0], spans[w][1] = min(spans[w][0], start), max(spans[w][1], end)
        new_ids.append(w)
    word_spans = [_strip(text, s, e) for s, e in spans]
    return new_ids, [text[s:e] for s, e in word_spans], word_spans


def start_token(tokenizer, config) -> int | None:
    """The token a decoder's plain-text sequence starts with when its tokenizer adds none itself: the
    model's `bos_token_id`, else the tokenizer's; None if the tokenizer adds its own or neither has one.

    SmolLM2's tokenizer adds nothing, so its sequences start with <|im_start|> (config bos_token_id 1),
    as TransformerLens prepends the BOS token: the first position is where decoders park attention they
    do not need, and as a special token it is left out of the words.
    """
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    if probe and probe[0] in tokenizer.all_special_ids:
        return None
    bos = getattr(config, "bos_token_id", None)
    return bos if bos is not None else tokenizer.bos_token_id


def readable_tokens(tokenizer, ids: Sequence[int]) -> list[str]:
    """Each token id as the text it stands for ("Ġfilm" → " film"), a newline shown as "↵"; special tokens
    by name. A piece holding part of a character's bytes shows as "�"."""
    pieces = tokenizer.batch_decode([[int(i)] for i in ids], clean_up_tokenization_spaces=False)  # keep " ."
    return [t.replace("\n", "↵") for t in pieces]


def _prepare(tokenizer, texts: list[str], max_length: int, *, causal: bool = False,
             start: int | None = None) -> tuple[Encoded, list[dict]]:
    """Tokenize with offsets; returns the (cut) ids and, per text, its tokens/word ids/words/spans.

    `start`: a token id put in front of every sequence (a decoder's start token, a special: word id None).
    """
    enc = tokenizer(list(texts), add_special_tokens=True, truncation=False, return_offsets_mapping=True)
    ids, meta = [], []
    for i, text in enumerate(texts):
        full, word_ids, offsets = enc["input_ids"][i], enc.word_ids(i), [tuple(o) for o in enc["offset_mapping"][i]]
        if start is not None:
            full, word_ids, offsets = [start, *full], [None, *word_ids], [(0, 0), *offsets]
        if not full:
            raise ValueError(f"Text {i} has no tokens and the model no start token: nothing to attend over.")
        cut_ids = _cut(full, max_length, causal)
        word_ids, words, spans = _words(text, _cut(word_ids, max_length, causal), _cut(offsets, max_length, causal))
        ids.append(cut_ids)
        tokens = readable_tokens(tokenizer, cut_ids) if causal else tokenizer.convert_ids_to_tokens(cut_ids)
        meta.append(dict(tokens=tokens, word_ids=word_ids, words=words, word_spans=spans,
                         truncated=len(full) > max_length, causal=causal))
    truncated = sum(m["truncated"] for m in meta)
    return Encoded(ids=ids, truncated=truncated, max_length=max_length), meta


@torch.inference_mode()
def forward_attention(loaded, batch: dict[str, torch.Tensor]) -> np.ndarray:
    """(B, layers, max heads, T, T) float32 attention of one right-padded batch (input_ids, attention_mask).

    An encoder runs whole; a decoder runs its decoder stack only (no LM head, no prompt): under GQA the
    eager maps are per query head (KV heads are repeated before the softmax).
    """
    if loaded.is_decoder:
        out = loaded.adapter.base(**batch, output_attentions=True, use_cache=False)
    else:
        out = loaded.model(**batch, output_attentions=True)
    return _stack_layers(out.attentions)


@torch.inference_mode()
def capture_attention(
    loaded,
    texts: Sequence[str],
    *,
    batch_size: int = 32,
    max_length: int | None = None,
    progress: Progress | None = None,
) -> list[AttentionRecord]:
    """Run the eager model once over `texts` and keep every head's attention per sentence.

    Args:
        loaded: a `core.models.LoadedModel` loaded with attn_implementation="eager". A decoder runs on the
            plain texts (start token + text, `start_token`), not the prompt template.
        texts: sentences; returned records are in the same order.
        batch_size: sentences per forward pass (batches are length-sorted to cut padding).
        max_length: tokens per sentence (default and cap: `loaded.max_length`); longer sentences keep
            their first max_length-1 tokens plus the closing special token (a decoder: the first
            max_length tokens) and get `truncated=True`.
        progress: called as `progress(done, total, message)` after each batch.

    Returns:
        One `AttentionRecord` per text, attention (layers, heads, T, T) float32 over its real tokens
        (`causal` for a decoder). Layers with fewer heads than the widest layer (pruned models) are
        padded with NaN heads.
    """
    if batch_size < 1:
        raise ValueError(f"The 'batch_size' parameter of capture_attention() must be >= 1. Got {batch_size} instead.")
    limit = loaded.max_length if max_length is None else min(int(max_length), loaded.max_length)
    if limit < 2:
        raise ValueError(f"The 'max_length' parameter of capture_attention() must be >= 2. Got {max_length} instead.")
    if loaded.model.config._attn_implementation != "eager":
        raise ValueError("capture_attention() needs a model loaded with attn_implementation='eager'.")
    tokenizer = loaded.text_tokenizer
    _require_fast(tokenizer)
    texts = list(texts)
    if not texts:
        return []
    causal = loaded.is_decoder
    start = start_token(tokenizer, loaded.model.config) if causal else None
    enc, meta = _prepare(tokenizer, texts, limit, causal=causal, start=start)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    records: list[AttentionRecord | None] = [None] * len(texts)
    done = 0
    for idx in sorted_batches(enc, batch_size):
        stacked = forward_attention(loaded, collate([enc.ids[i] for i in idx], pad_id))  # (B, L, H, T_pad, T_pad)
        for row, i in enumerate(idx):
            n = len(enc.ids[i])
            records[i] = AttentionRecord(text=texts[i], attention=np.ascontiguousarray(stacked[row, :, :, :n, :n]),
                                         **meta[i])
        done += len(idx)
        if progress:
            progress(done, len(texts), "capturing attention")
    return records


def _stack_layers(attentions: Sequence[torch.Tensor]) -> np.ndarray:
    """Per-layer (B, heads_l, T, T) tensors → (B, layers, max heads, T, T) float32, NaN for missing heads."""
    if not attentions or any(a is None for a in attentions):
        raise ValueError("The model returned no attentions; load it with attn_implementation='eager'.")
    widest = max(a.shape[1] for a in attentions)
    b, _, t, _ = attentions[0].shape
    out = np.full((b, len(attentions), widest, t, t), np.nan, dtype=np.float32)
    for layer, a in enumerate(attentions):
        out[:, layer, : a.shape[1]] = a.float().numpy()
    return out


def word_attention(att: np.ndarray, word_ids: Sequence[int | None]) -> np.ndarray:
    """Token→token attention to word→word attention (Clark et al. 2019, as used for Voita's roles).

    Attention FROM a word is the mean over its pieces' rows; attention TO a word is the sum over its
    pieces' columns. Special tokens (word id None) are dropped both as sources and as targets, and rows
    are NOT renormalised: row w sums to the share of word w's attention that lands on words (the rest
    went to [CLS]/[SEP]). Argmaxes are unaffected; row maxima are honest about "no-op" heads that
    park their attention on [SEP].

    Args:
        att: (layers, heads, T, T) token attention, rows = sources.
        word_ids: (T,) word index 0..W-1 of each token, None for special tokens.

    Returns:
        (layers, heads, W, W) float32 with W = number of distinct words.
    """
    att = np.asarray(att)
    if att.ndim != 4 or att.shape[-1] != att.shape[-2] or att.shape[-1] != len(word_ids):
        raise ValueError(
            f"word_attention() needs att of shape (layers, heads, T, T) with T = len(word_ids) = {len(word_ids)}. "
            f"Got {att.shape} instead."
        )
    tokens = np.array([t for t, w in enumerate(word_ids) if w is not None], dtype=np.int64)
    words = np.array([word_ids[t] for t in tokens], dtype=np.int64)
    n_words = int(words.max()) + 1 if len(words) else 0
    member = np.zeros((n_words, len(word_ids)), dtype=np.float32)  # (W, T) one-hot word membership
    member[words, tokens] = 1.0
    counts = member.sum(axis=1, keepdims=True)
    mean_rows = member / np.maximum(counts, 1.0)
    return (mean_rows @ att.astype(np.float32) @ member.T).astype(np.float32)  # (L, H, W, W)


def align_words(hf_spans: Sequence[tuple[int, int]], spacy_tokens: Sequence) -> list[int | None]:
    """Map each HF word to the spaCy token that overlaps it most in characters (None if none overlaps).

    Args:
        hf_spans: (W,) character spans [start, end) of the tokenizer's words.
        spacy_tokens: spaCy `Token`s (anything with `.idx` and `.text`) or (start, end) spans, in text order.

    Returns:
        (W,) index into `spacy_tokens` per HF word; ties go to the earlier token. Several HF words may map
        to one spaCy token ("don", "'", "t" → "do"/"n't") and spaCy-only tokens (whitespace) stay unused.
    """
    spans = [(t.idx, t.idx + len(t.text)) if hasattr(t, "idx") else (int(t[0]), int(t[1])) for t in spacy_tokens]
    starts = np.array([s for s, _ in spans], dtype=np.int64)
    ends = np.array([e for _, e in spans], dtype=np.int64)
    out: list[int | None] = []
    for start, end in hf_spans:
        if not spans:
            out.append(None)
            continue
        overlap = np.minimum(ends, end) - np.maximum(starts, start)
        best = int(np.argmax(overlap))
        out.append(best if overlap[best] > 0 else None)
    return out
