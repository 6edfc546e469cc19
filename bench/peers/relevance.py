"""Relevance next to the peers: LXT on SmolLM2 (one child process per LRP method, `bench.peers.lxt_child`) and
Captum's LayerGradientXActivation on the default encoder (`bench.relevance_bench.captum_head_relevance`)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import numpy as np
import torch

from analysis.relevance import HeadRelevance
from bench.peers.table import Row, spearman
from bench.relevance_bench import captum_head_relevance, timed
from core.data import TextDataset
from core.models import LoadedModel

NAMES = {"attnlrp": "AttnLRP", "conservative": "CP-LRP"}


def _conservation(logit: float, tokens: list[float]) -> float:
    """|logit - sum of the token relevance| / |logit|."""
    return abs(logit - sum(tokens)) / abs(logit)


def lxt_rows(method: str, n: int) -> list[Row]:
    """Rows for LXT vs HeadLab under `method` on n sentences (or one row saying why LXT did not run)."""
    name = NAMES[method]
    done = subprocess.run([sys.executable, "-m", "bench.peers.lxt_child", "--method", method, "--n", str(n)],
                          capture_output=True, text=True,  # the threads the bench's header names
                          env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    if done.returncode != 0:
        return [Row(f"LXT {name} on SmolLM2", None, None, note=f"child failed: {done.stderr.strip()[-300:]}")]
    out = json.loads(done.stdout)
    ours = out["headlab"]
    shim = f"LXT imported through the shim (plain import: {out['import_error']})" if out["import_error"] else ""
    if "lxt_error" in out:
        return [Row(f"LXT {name} on SmolLM2", None, None, note=f"LXT could not run: {out['lxt_error']}; {shim}")]
    theirs = out["lxt"]
    token_rho = [spearman(a["tokens"], b["tokens"]) for a, b in zip(ours, theirs)]
    head_rho = [spearman(a["heads"], b["heads"]) for a, b in zip(ours, theirs)]
    logit_gap = max(abs(a["logit"] - b["logit"]) for a, b in zip(ours, theirs))
    raw = [_conservation(a["logit"], a["tokens"]) for a in ours]
    own = [abs(a["logit"] - sum(a["tokens"]) - a["bias"] - a["absorbed"]) / abs(a["logit"]) for a in ours]
    lxt_err = [_conservation(b["logit"], b["tokens"]) for b in theirs]
    max_diff = max(float(np.nanmax(np.abs(np.asarray(a["tokens"]) - b["tokens"]))) for a, b in zip(ours, theirs))
    where = f"{n} dev sentences, next-token logit of the last token"
    return [
        Row(f"LXT {name}: token relevance, Spearman with LXT (mean)", float(np.mean(token_rho)), 1.0,
            note=f"{where}; min {min(token_rho):.4f}; max |R_HeadLab - R_LXT| per token {max_diff:.1e}; {shim}"),
        Row(f"LXT {name}: head relevance (o_proj input), Spearman (mean)", float(np.mean(head_rho)), 1.0,
            note=f"min {min(head_rho):.4f}; explained logits differ by at most {logit_gap:.1e}"),
        Row(f"LXT {name}: conservation error |logit - sum R_tokens| / |logit| (mean)", float(np.mean(raw)),
            float(np.mean(lxt_err)), note=f"HeadLab's own check (+ bias + absorbed shares): {np.mean(own):.1e}",
            digits=3),
        Row(f"LXT {name}: seconds per sentence (median)", statistics.median(a["seconds"] for a in ours),
            statistics.median(b["seconds"] for b in theirs), " s", "both in one process, HeadLab first", 3),
    ]


def captum_rows(loaded: LoadedModel, sample: TextDataset, repeats: int) -> list[Row]:
    """HeadLab's conservative head relevance vs Captum's LayerGradientXActivation on every W_O."""
    fns = {"headlab": lambda: HeadRelevance(loaded).attribute(sample.texts),
           "captum": lambda: captum_head_relevance(loaded, sample.texts)}
    seconds, results = timed(fns, repeats)
    ours, theirs = results["headlab"].per_example, results["captum"]
    rho = [spearman(a, b) for a, b in zip(ours, theirs)]
    diff = float(np.nanmax(np.abs(ours - theirs)))
    return [
        Row(f"Captum: head relevance of {len(sample)} dev sentences, seconds (median of {repeats})",
            statistics.median(seconds["headlab"]), statistics.median(seconds["captum"]), " s",
            "HeadLab: one CP-LRP pass also gives token, bias shares and the conservation check; Captum: heads only, "
            "plus a forward for the predicted class", 3),
        Row("Captum: head relevance, Spearman per sentence (mean)", float(np.mean(rho)), 1.0,
            note=f"max |HeadLab - Captum| {diff:.1e} (mean |logit| {np.mean(np.abs(results['headlab'].logits)):.2f})"),
    ]
