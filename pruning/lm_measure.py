"""What a gate state does to a causal LM on plain text, measured against the dense model in the same
process: the language-modelling counterpart of `pruning.live.measure_pruned`, for the eval steps of a
run on documents (data task "lm", `pruning.record.measure_step`).

Quality is the LM's perplexity and next-token accuracy on the documents (`core.perplexity`: each
document on its own, window 512, stride 256; a model with shorter inputs: its longest, stride half of
it); sizes and layer FLOPs are counted as `pruning.live` counts them, at the documents' median length
(at most one window); latency is the LM's plain forward (logits of every position) on a batch of the
documents' openings cut to `TIMED_TOKENS` tokens, timed interleaved with the dense model at each
batch size (`core.latency.compare`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from core.data import LMText
from core.latency import compare, make_batch, median_length
from core.loaded import LoadedModel
from core.perplexity import WINDOW, Perplexity, perplexity
from core.size import encoder_flops
from core.structure import pruning_info
from pruning.gate_state import GateState
from pruning.live import Comparison, Figures
from pruning.size import SizeModel, exact_sparsity

TIMED_TOKENS = 64  # tokens per timed row


@dataclass
class TextComparison:
    """Dense vs pruned on documents: `comparison.*.accuracy` is next-token accuracy (fractions)."""

    comparison: Comparison
    perplexity: float
    dense_perplexity: float


def window(loaded: LoadedModel) -> int:
    """The perplexity window: `core.perplexity.WINDOW` tokens, or the model's longest input if shorter
    (the stride is half of it)."""
    return min(WINDOW, loaded.max_length)


def text_length(loaded: LoadedModel, text: LMText) -> int:
    """The documents' median length in tokens, at most one perplexity window (what FLOPs are counted at)."""
    return median_length(loaded.text_tokenizer, list(text.documents), window(loaded))


def text_figures(loaded: LoadedModel, text: LMText, seq_len: int) -> tuple[Figures, Perplexity]:
    """Next-token accuracy and sizes of `loaded` on all of `text` (no timing), and its perplexity."""
    tokens = window(loaded)
    ppl = perplexity(loaded.lm, loaded.text_tokenizer, list(text.documents), tokens, tokens // 2)
    flops = encoder_flops(loaded.adapter, seq_len)
    arch = loaded.architecture()
    figures = Figures(accuracy=ppl.accuracy, examples=len(text), parameters=arch.parameters,
                      encoder_parameters=arch.encoder_parameters, flops_attention=flops.attention, flops_ffn=flops.ffn)
    return figures, ppl


def measure_text(dense: LoadedModel, pruned: LoadedModel, text: LMText,
                 dense_figures: tuple[Figures, Perplexity] | None,
                 rounds: dict[int, tuple[int, int]]) -> TextComparison:
    """`pruned` (already sliced) against `dense` on the documents of `text` (see the module docstring).
    `dense_figures`: the dense model's `text_figures` from an earlier call (they do not change);
    `rounds` = {batch size: (rounds, repeats per round)}."""
    start = time.perf_counter()
    info = pruning_info(pruned.model)
    state = GateState.from_dict(info.gate_state) if info is not None else GateState.dense(SizeModel.of(pruned).shape)
    documents = list(text.documents)
    seq_len = text_length(dense, text)
    base, dense_ppl = dense_figures if dense_figures is not None else text_figures(dense, text, seq_len)
    base = Figures(**{**asdict(base), "latency_b1_ms": None, "latency_b32_ms": None})
    small, ppl = text_figures(pruned, text, seq_len)
    for batch_size, (n_rounds, repeats) in rounds.items():
        batch = make_batch(dense.text_tokenizer, documents, batch_size, TIMED_TOKENS)
        timed = compare({"dense": dense.lm, "pruned": pruned.lm}, batch, rounds=n_rounds, repeats_per_round=repeats)
        setattr(base, f"latency_b{batch_size}_ms", timed["dense"].median_s * 1000)
        setattr(small, f"latency_b{batch_size}_ms", timed["pruned"].median_s * 1000)
    cmp = Comparison(dense=base, pruned=small, sparsity=exact_sparsity(state, model=SizeModel.of(pruned)),
                     seq_len=seq_len, seconds=time.perf_counter() - start,
                     note=pruned.notes[-1] if pruned.notes else "")
    return TextComparison(comparison=cmp, perplexity=ppl.perplexity, dense_perplexity=dense_ppl.perplexity)
