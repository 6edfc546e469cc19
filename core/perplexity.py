"""Perplexity and next-token accuracy of a causal language model on documents, with a sliding window.

Each document is tokenised on its own (with the tokenizer's own special tokens, as for any input) and
scored on its own: token t >= 1 is predicted from the tokens before it in its window; the first token of
a document has no context and is not scored. A document longer than the window is read in windows of
`window` tokens whose starts are `stride` tokens apart (the scheme of Hugging Face's perplexity guide):
each window scores only the tokens the window before did not, so every token after the first is scored
exactly once, and past the first window with at least `window - stride` tokens of context.

    result = perplexity(model, tokenizer, lee_splits().dev.documents)   # window 512, stride 256
    result.perplexity, result.accuracy, result.tokens

Perplexity is exp(mean NLL) over all scored tokens of all documents (a token-weighted mean, not a mean of
per-document perplexities); accuracy is the fraction of scored tokens that are the model's argmax.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from core.finetune import Progress

WINDOW = 512  # tokens per forward pass; a Lee article is ~300 tokens, so most fit in one window
STRIDE = 256  # window starts are this far apart: every token past the first window has >= 256 tokens of context


@dataclass(frozen=True)
class Perplexity:
    """Language-modelling quality on a set of documents (what `perplexity` returns)."""

    tokens: int  # tokens scored (every token of every document but its first)
    nll: float  # mean negative log-likelihood per scored token, in nats
    perplexity: float  # exp(nll)
    accuracy: float  # fraction of scored tokens equal to the model's argmax prediction
    window: int  # tokens per forward pass
    stride: int  # tokens between window starts
    documents: int  # documents read (those with a single token add no scored token)
    seconds: float  # wall time, tokenisation included
    threads: int  # torch CPU threads during the measurement


def windows(n: int, window: int = WINDOW, stride: int = STRIDE) -> list[tuple[int, int, int]]:
    """The windows over a document of `n` tokens: (begin, end, first) each, covering tokens [begin, end)
    and scoring targets [first, end). Consecutive windows start `stride` apart and the last one ends at
    `n`; `first` is where the previous window stopped (1 for the first window), so the targets of all
    windows are 1..n-1, each once. E.g. n=9, window 4, stride 2: (0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 9, 8).
    """
    out, scored_to = [], 1
    for begin in range(0, max(n - 1, 0), stride):
        end = min(begin + window, n)
        out.append((begin, end, scored_to))
        scored_to = end
        if end == n:
            break
    return out


def fit_window(model, window: int | None = None, stride: int | None = None) -> tuple[int, int]:
    """(window, stride) for `model`: `window` or `WINDOW` capped at the model's max_position_embeddings;
    `stride` or `STRIDE` capped at half the window (so a model of 128 positions reads windows of 128, 64 apart)."""
    longest = getattr(model.config, "max_position_embeddings", None) or WINDOW
    window = window if window is not None else min(WINDOW, longest)
    return window, stride if stride is not None else min(STRIDE, max(window // 2, 1))


def check_window(window: int, stride: int, model) -> None:
    """ValueError, one line, unless `window` and `stride` fit `model` (see `perplexity`)."""
    if not isinstance(window, int) or window < 2:
        raise ValueError(f"The 'window' parameter of perplexity() must be an int >= 2. Got {window!r} instead.")
    if not isinstance(stride, int) or not 1 <= stride < window:
        raise ValueError(f"The 'stride' parameter of perplexity() must be an int in [1, window) = [1, {window}) "
                         f"so that consecutive windows share a token. Got {stride!r} instead.")
    longest = getattr(model.config, "max_position_embeddings", None)
    if longest is not None and window > longest:
        raise ValueError(f"The 'window' parameter of perplexity() must be at most the model's "
                         f"max_position_embeddings ({longest}). Got {window} instead.")


@torch.inference_mode()
def token_perplexity(model, documents: Sequence[Sequence[int]], window: int = WINDOW, stride: int = STRIDE,
                     progress: Progress | None = None) -> Perplexity:
    """`Perplexity` of causal LM `model` (eval mode, a Hugging Face `...ForCausalLM`) on token-id documents.

    `documents`: one sequence of token ids per document. One forward pass per window (batch 1, no
    padding); only the logits of the scored positions are computed (`logits_to_keep`).
    `progress(done, total, message)` is called after each window. ValueError for a bad window or
    stride, or when no document has two tokens.
    """
    check_window(window, stride, model)
    started = time.time()
    device = next(model.parameters()).device
    plans = [(ids, windows(len(ids), window, stride)) for ids in documents]
    total = sum(len(w) for _, w in plans)
    if total == 0:
        raise ValueError("perplexity() needs at least one document of two or more tokens; got none.")
    nll, correct, tokens, done = 0.0, 0, 0, 0
    for ids, spans in plans:
        ids = torch.as_tensor(list(ids), dtype=torch.long, device=device)
        for begin, end, first in spans:
            keep = end - first + 1  # the positions that predict targets first..end-1, plus the last one
            logits = model(input_ids=ids[None, begin:end], logits_to_keep=keep, use_cache=False).logits
            logits = logits[0, :-1].float()  # (end - first, vocab): position p predicts token p + 1
            targets = ids[first:end]
            nll -= torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).sum().item()
            correct += (logits.argmax(dim=-1) == targets).sum().item()
            tokens += len(targets)
            done += 1
            if progress is not None:
                progress(done, total, f"perplexity, window {done} of {total}")
    mean = nll / tokens
    return Perplexity(tokens=tokens, nll=mean, perplexity=math.exp(mean), accuracy=correct / tokens,
                      window=window, stride=stride, documents=len(plans), seconds=time.time() - started,
                      threads=torch.get_num_threads())


def perplexity(model, tokenizer, texts: Sequence[str], window: int = WINDOW, stride: int = STRIDE,
               progress: Progress | None = None) -> Perplexity:
    """`Perplexity` of causal LM `model` with its `tokenizer` on documents `texts` (one string each).

    Window `window` tokens (default 512), stride `stride` (default 256): see the module docstring and
    `token_perplexity`. SmolLM2-135M on the 29 Lee dev articles (~9,000 tokens): perplexity about 30.
    """
    ids = [tokenizer(text, verbose=False)["input_ids"] for text in texts]
    return token_perplexity(model, ids, window, stride, progress)
