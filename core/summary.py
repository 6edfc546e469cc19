"""One call that answers "how good, how fast, how big" for a model on a dataset (CLI and Model page):
`summarise` on labeled data (accuracy; a decoder is read as a classifier by prompting), `summarise_text`
on text (a decoder's perplexity, prefill latency and decoding speed)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from core.data import LMText, TextDataset
from core.evaluate import Evaluation, Progress, evaluate
from core.latency import PREFILL_BATCHES, DecodeSpeed, Latency, decode_speed, measure, measure_prefill, median_length
from core.loaded import Architecture, LoadedModel
from core.paths import headlab_home
from core.perplexity import Perplexity, fit_window, perplexity
from core.prompting import PromptSpec
from core.size import EncoderFlops, encoder_flops

LATENCY_BATCHES = (1, 32)  # batch sizes an encoder classifier is timed at
# A prompted decoder is timed at the prefill's (its classifier pass is a prefill of the prompt).
DECODER_LATENCY_BATCHES = PREFILL_BATCHES


def _latency_row(row: dict, prefix: str, latency: dict[int, Latency]) -> None:
    """Median and p90 milliseconds of each batch size into `row` as `<prefix>_b<batch>_ms` / `..._p90_ms`."""
    for b, lat in latency.items():
        row[f"{prefix}_b{b}_ms"] = round(lat.median_s * 1e3, 2)
        row[f"{prefix}_b{b}_p90_ms"] = round(lat.p90_s * 1e3, 2)


@dataclass
class ModelSummary:
    architecture: Architecture
    evaluation: Evaluation
    latency: dict[int, Latency]  # batch size -> latency
    flops: EncoderFlops  # per example at the data's median length in tokens (a decoder's: of the prompt)
    load_average: float  # 1-minute load of the machine while timing: above the core count, times are inflated

    def as_row(self) -> dict:
        """Flat dict of the headline figures (times in milliseconds) for tables and --json."""
        row = {
            "examples": self.evaluation.n,
            "accuracy": round(self.evaluation.accuracy, 4),
            "macro_f1": round(self.evaluation.macro_f1, 4),
            "parameters": self.architecture.parameters,
            "encoder_parameters": self.architecture.encoder_parameters,
            "encoder_gflops_per_example": round(self.flops.total / 1e9, 4),
            "flops_attention_share": round(self.flops.attention_share, 3),
            "median_tokens": self.flops.seq_len,
            "truncated": self.evaluation.truncated,
        }
        _latency_row(row, "latency", self.latency)
        row["threads"] = next(iter(self.latency.values())).threads if self.latency else None
        row["load_average"] = round(self.load_average, 2)
        return row


def median_tokens(loaded: LoadedModel, texts: list[str]) -> int:
    """Median length in tokens of `texts` (`core.latency.median_length`, up to `loaded.max_length`)."""
    return median_length(loaded.tokenizer, texts, loaded.max_length)


def summarise(loaded: LoadedModel, data: TextDataset, progress: Progress | None = None) -> ModelSummary:
    """Evaluate on all of `data`, time batch 1 and 32 (a decoder: 1 and 8) on its texts of typical length,
    count parameters and FLOPs (at the median length)."""
    evaluation = evaluate(loaded.model, loaded.tokenizer, data, max_length=loaded.max_length, progress=progress)
    batches = DECODER_LATENCY_BATCHES if loaded.is_decoder else LATENCY_BATCHES
    if progress:
        progress(0, 1, f"timing batch {' and '.join(map(str, batches))}")
    # one warm-up call suffices for a decoder's pass (a prefill of ~100 ms or more)
    latency = measure(loaded.model, loaded.tokenizer, data.texts, batch_sizes=batches, max_length=loaded.max_length,
                      warmup=1 if loaded.is_decoder else 3)
    flops = encoder_flops(loaded.adapter, median_tokens(loaded, data.texts))
    return ModelSummary(loaded.architecture(), evaluation, latency, flops, os.getloadavg()[0])


def summary_record(summary: ModelSummary, loaded: LoadedModel, data: TextDataset, sample: int = 12) -> dict:
    """JSON-ready record: headline figures, architecture, label counts and a seeded sample of predictions."""
    ev = summary.evaluation
    rng = np.random.default_rng(0)
    picks = rng.choice(ev.n, size=min(sample, ev.n), replace=False)
    return {
        "figures": summary.as_row(),
        "architecture": vars(summary.architecture),
        "flops": {"attention": summary.flops.attention, "ffn": summary.flops.ffn, "seq_len": summary.flops.seq_len},
        "latency": {str(b): lat.as_dict() for b, lat in summary.latency.items()},
        "prompt": loaded.prompt.to_dict() if loaded.prompt else None,
        "label_names": loaded.label_names,
        "label_counts": data.label_counts(),
        "warnings": loaded.notes + data.warnings,
        "predictions": [
            {"text": data.texts[i], "label": loaded.label_names[ev.labels[i]],
             "predicted": loaded.label_names[ev.predictions[i]],
             "confidence": round(float(ev.probabilities[i].max()), 3)}
            for i in picks
        ],
    }


@dataclass
class TextSummary:
    """A decoder on text: perplexity and next-token accuracy, prefill latency, decoding speed."""

    architecture: Architecture
    perplexity: Perplexity
    prefill: dict[int, Latency]  # batch size -> latency of a prefill of `PREFILL_TOKENS` tokens a row
    decode: DecodeSpeed
    load_average: float  # 1-minute load of the machine while timing

    def as_row(self) -> dict:
        """Flat dict of the headline figures (times in milliseconds) for tables and --json."""
        ppl = self.perplexity
        row = {"documents": ppl.documents, "tokens": ppl.tokens, "perplexity": round(ppl.perplexity, 3),
               "nll": round(ppl.nll, 4), "next_token_accuracy": round(ppl.accuracy, 4), "window": ppl.window,
               "stride": ppl.stride, "parameters": self.architecture.parameters,
               "prefill_tokens": next(iter(self.prefill.values())).seq_len}
        _latency_row(row, "prefill", self.prefill)
        row.update(decode_tokens=self.decode.new_tokens, decode_tokens_per_s=round(self.decode.tokens_per_s, 2),
                   perplexity_seconds=round(ppl.seconds, 1), threads=ppl.threads,
                   load_average=round(self.load_average, 2))
        return row


def require_decoder(loaded: LoadedModel) -> None:
    """ValueError, one line, unless `loaded` is a decoder (perplexity needs a causal language model)."""
    if not loaded.is_decoder:
        raise ValueError(f"Perplexity needs a causal language model (a decoder such as smollm2); {loaded.source} is "
                         f"a {loaded.model.config.model_type} encoder: evaluate it on labeled data, e.g. the default "
                         "task.")


def summarise_text(loaded: LoadedModel, text: LMText, *, window: int | None = None, stride: int | None = None,
                   progress: Progress | None = None) -> TextSummary:
    """Perplexity and next-token accuracy of decoder `loaded` on the documents of `text` (sliding window
    `window`, stride `stride`, default 512 / 256 within the model's positions: `core.perplexity.fit_window`),
    prefill latency at batch 1 and 8 and greedy decoding speed with the KV cache on that text
    (`core.latency`). ValueError for an encoder (`require_decoder`)."""
    require_decoder(loaded)
    lm, tokenizer = loaded.lm, loaded.text_tokenizer
    result = perplexity(lm, tokenizer, text.documents, *fit_window(lm, window, stride), progress)
    if progress:
        progress(0, 1, f"timing the prefill at batch {' and '.join(map(str, PREFILL_BATCHES))}")
    prefill = measure_prefill(lm, tokenizer, list(text.documents))
    if progress:
        progress(0, 1, "timing decoding")
    decode = decode_speed(lm, tokenizer, list(text.documents))
    return TextSummary(loaded.architecture(), result, prefill, decode, os.getloadavg()[0])


def text_record(summary: TextSummary, loaded: LoadedModel, text: LMText) -> dict:
    """JSON-ready record of `summarise_text`: headline figures, architecture, the text, each measurement."""
    return {
        "figures": summary.as_row(),
        "architecture": vars(summary.architecture),
        "text": {"name": text.name, "selection": text.selection, "documents": len(text),
                 "characters": text.characters},
        "perplexity": asdict(summary.perplexity),
        "prefill": {str(b): lat.as_dict() for b, lat in summary.prefill.items()},
        "decode": summary.decode.as_dict(),
        "warnings": list(loaded.notes),
    }


def prompt_key(prompt: PromptSpec | None) -> str:
    """Short stable sha1 (8 hex chars) of a decoder's prompt ("" for none): part of its summaries' cache key."""
    if prompt is None:
        return ""
    return hashlib.sha1(json.dumps(prompt.to_dict(), sort_keys=True).encode()).hexdigest()[:8]


def summary_path(model_fingerprint: str, data_fingerprint: str, prompt: PromptSpec | None = None) -> Path:
    """Where the summary of a (model, data) pair is cached on disk; a decoder's prompt is part of the key."""
    folder = headlab_home() / "cache" / "summary"
    folder.mkdir(parents=True, exist_ok=True)
    key = "-".join(filter(None, [model_fingerprint, prompt_key(prompt), data_fingerprint]))
    return folder / f"{key}.json"
