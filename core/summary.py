"""One call that answers "how good, how fast, how big" for a model on a dataset (CLI and Model page)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.data import TextDataset
from core.evaluate import Evaluation, Progress, evaluate
from core.latency import Latency, measure, median_length
from core.loaded import Architecture, LoadedModel
from core.paths import headlab_home
from core.size import EncoderFlops, encoder_flops


@dataclass
class ModelSummary:
    architecture: Architecture
    evaluation: Evaluation
    latency: dict[int, Latency]  # batch size -> latency
    flops: EncoderFlops  # per example at the data's median length in tokens
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
        for b, lat in self.latency.items():
            row[f"latency_b{b}_ms"] = round(lat.median_s * 1e3, 2)
            row[f"latency_b{b}_p90_ms"] = round(lat.p90_s * 1e3, 2)
        row["threads"] = next(iter(self.latency.values())).threads if self.latency else None
        row["load_average"] = round(self.load_average, 2)
        return row


def median_tokens(loaded: LoadedModel, texts: list[str]) -> int:
    """Median length in tokens of `texts` (`core.latency.median_length`, up to `loaded.max_length`)."""
    return median_length(loaded.tokenizer, texts, loaded.max_length)


def summarise(loaded: LoadedModel, data: TextDataset, progress: Progress | None = None) -> ModelSummary:
    """Evaluate on all of `data`, time batch 1 and 32 on its texts of typical length, count parameters
    and FLOPs (at the median length)."""
    evaluation = evaluate(loaded.model, loaded.tokenizer, data, max_length=loaded.max_length, progress=progress)
    if progress:
        progress(0, 1, "timing batch 1 and 32")
    latency = measure(loaded.model, loaded.tokenizer, data.texts, max_length=loaded.max_length)
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


def summary_path(model_fingerprint: str, data_fingerprint: str) -> Path:
    """Where the summary of a (model, data) pair is cached on disk."""
    folder = headlab_home() / "cache" / "summary"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{model_fingerprint}-{data_fingerprint}.json"
