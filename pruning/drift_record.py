"""Explanation drift at a training run's eval steps: the snapshot's LRP explanations against the dense
model's (`analysis.drift`) on the run's first `drift_examples` dev-subset texts, the same texts at every
step (the final eval's too), so the curve follows one fixed set.

The dense model's explanations are computed once per session and kept on it. Off (no figures) with
`drift_examples` 0, on documents (language modelling has no class to explain) and off the CPU (the LRP
pass reads its tensors on the CPU; the dense base model stays there). The cost is one LRP forward and
backward pass of the snapshot per 16 texts, recorded as `drift_seconds`.
"""

from __future__ import annotations

import time

from analysis.drift import drift, explain

FIELDS = ("drift_head_spearman", "drift_token_spearman", "drift_token_topk", "drift_flipped", "drift_examples",
          "drift_seconds")


def step_drift(session, snapshot) -> dict[str, float | int]:
    """The `FIELDS` of `snapshot` (in eval mode) against `session.base`, or {} when drift is off."""
    n = min(session.c.drift_examples, len(session.dev_subset))
    if n == 0 or session.examples.language_modelling or session.device.type != "cpu":
        return {}
    if len(snapshot.text_tokenizer) != len(session.base.text_tokenizer):  # renumbered vocabulary (cluster): the
        return {}  # texts' tokens differ, so per-token relevance has nothing to pair with
    start = time.perf_counter()
    texts = session.dev_subset.texts[:n]
    cache = session.__dict__.setdefault("_drift_reference", {})
    if n not in cache:
        cache[n] = explain(session.base, texts)
    d = drift(session.base, snapshot, texts, reference=cache[n])
    return {"drift_head_spearman": d.head_spearman, "drift_token_spearman": d.token_spearman,
            "drift_token_topk": d.token_topk, "drift_flipped": d.flipped, "drift_examples": d.examples,
            "drift_seconds": time.perf_counter() - start}
