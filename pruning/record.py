"""`StepRecord`: what one eval step of a training run measured, written by the loop, kept by the run
store (as JSON) and read by attribute by the Prune page, the Pareto chart, the CLI and bench.

`measure_step(session, final)` slices the current structure (a copy of the student with its LoRA
deltas merged, if it has any), measures it against the dense teacher (`pruning.live.measure_pruned`:
accuracy on the dev subset, or on the whole dev split at the end, and latency at batch 1 and 32
timed interleaved in this process; on documents `pruning.lm_measure.measure_text`: perplexity and
next-token accuracy) and adds the training state: sparsity
(expected and exact) and target, the method's own figures (lambda_1, lambda_2), the mean of each loss
term since the last eval, units alive per layer, where the figures came from, and the clock.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields

import numpy as np
import torch

from core.summary import median_tokens
from pruning.drift_record import step_drift
from pruning.gate_state import GateState
from pruning.live import Comparison, figures, measure_pruned
from pruning.lm_measure import measure_text, text_figures, text_length
from pruning.lora import merged_copy
from pruning.sparse_size import sparse_size, zero_masks
from pruning.surgery import prune

LIVE_ROUNDS = {1: (3, 2), 32: (2, 1)}  # core.latency.compare (rounds, repeats) per batch size at eval steps
FINAL_ROUNDS = {1: (5, 5), 32: (5, 2)}  # ... and at the final full-dev evaluation
# A decoder's forward costs far more (SmolLM2: ~9 s of CPU at batch 32), so it is timed fewer times.
DECODER_LIVE_ROUNDS = {1: (2, 1), 32: (1, 1)}
DECODER_FINAL_ROUNDS = {1: (3, 3), 32: (2, 1)}
CLOCK = ("train_s", "eval_s", "checkpoint_s", "setup_s")  # the training clock's parts, seconds


@dataclass
class StepRecord:
    """One eval step. Accuracies are fractions, latencies medians in ms, speedups dense / pruned,
    sparsities fractions of the encoder's weights, times seconds."""

    step: int
    phase: str  # "gates" (learned methods, structure still learning) | "finetune" (fixed structure)
    final: bool  # the last eval, on the whole dev split
    method: str
    examples: int
    accuracy: float
    dense_accuracy: float
    latency_b1_ms: float
    latency_b32_ms: float
    dense_latency_b1_ms: float
    dense_latency_b32_ms: float
    speedup_b1: float
    speedup_b32: float
    flop_speedup: float
    parameters: int
    dense_parameters: int
    sparsity: float  # exact, of the sliced snapshot
    expected_sparsity: float  # the gates' expectation while they learn, else the exact sparsity
    target: float | None
    lr: float
    loss: float | None  # mean total loss since the last eval
    losses: dict[str, float]  # each named term (task, distill_ce, lagrangian, ...) per step since the last eval,
    # averaged over all those steps (0 where a step had no such term), so that they sum to `loss`
    method_figures: dict[str, float | None]  # e.g. lambda_1, lambda_2
    heads_alive: list[int]  # per layer, counting the attention sublayer gate
    units_alive: list[int]  # FFN units per layer, counting the FFN sublayer gate
    hidden_alive: int
    heads_total: int
    units_total: int
    hidden_total: int
    note: str  # what was kept, one line
    device: str
    threads: int
    processes: int
    replica_checksums: list[int] | None
    clock: dict[str, float] = field(default_factory=dict)  # train_s, eval_s, checkpoint_s, setup_s
    eval_seconds: float = 0.0
    eval_gap: int = 0
    eval_fraction: float = 0.0
    export: str | None = None  # the exported model's folder (final record of a finished run)
    perplexity: float | None = None  # language modelling: the LM's perplexity on the dev documents (the
    dense_perplexity: float | None = None  # accuracies are then next-token accuracies); None for classifiers
    # explanation drift from the dense model on the first `drift_examples` dev-subset texts (`pruning.drift_record`;
    # None when off): Spearman of kept heads' relevance, of token relevance, top-5 token overlap, sign-flip share
    drift_head_spearman: float | None = None
    drift_token_spearman: float | None = None
    drift_token_topk: float | None = None
    drift_flipped: float | None = None
    drift_examples: int | None = None
    drift_seconds: float | None = None  # what the drift figures cost at this eval (included in eval_seconds)
    paused_s: float = 0.0  # seconds this process was frozen by the CPU queue so far (not in `clock`)
    nonzero_parameters: int | None = None  # `parameters` less the exact zeros of its Linear weights (masks)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> StepRecord:
        """Read a stored record; keys it does not know (older or newer stores) are ignored. A record of a
        store written before StepRecord (flat `loss_<name>`, `lambda_1` / `lambda_2` and clock keys) is
        folded into `losses`, `method_figures` and `clock`; fields it never had are None."""
        data = dict(data)
        if "losses" not in data:
            data["losses"] = {k[5:]: v for k, v in data.items() if k.startswith("loss_") and v is not None}
            data.setdefault("method_figures", {k: data[k] for k in ("lambda_1", "lambda_2") if data.get(k) is not None})
            data.setdefault("clock", {k: data[k] for k in CLOCK if k in data})
        known = {f.name for f in fields(cls)}
        missing = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING} - set(data)
        return cls(**dict.fromkeys(missing), **{k: v for k, v in data.items() if k in known})

    def row(self) -> dict:
        """Flat for tables and curves: loss terms as loss_<name>, the method's figures by name."""
        flat = {k: v for k, v in self.to_dict().items() if k not in ("losses", "method_figures", "clock")}
        flat.update({f"loss_{k}": v for k, v in self.losses.items()}, **self.method_figures, **self.clock)
        return flat


def alive(state: GateState) -> dict[str, list[int] | int]:
    """Units alive per layer: heads (L,) and FFN units (L,) counting their sublayer gate, hidden dims."""
    s = state.detach()
    return {"heads_alive": ((s.head > 0) & (s.mha[:, None] > 0)).sum(dim=1).tolist(),
            "units_alive": ((s.intermediate > 0) & (s.ffn[:, None] > 0)).sum(dim=1).tolist(),
            "hidden_alive": int((s.hidden > 0).sum())}


def _dense_figures(session, data):
    """The teacher's accuracy and sizes on `data` (language modelling: with its perplexity,
    `pruning.lm_measure.text_figures`), computed once per dataset and kept on the session."""
    cache = session.__dict__.setdefault("_dense_figures", {})
    if data.name not in cache:
        teacher = session.teacher
        cache[data.name] = (text_figures(teacher, data, text_length(teacher, data))
                            if session.examples.language_modelling else
                            figures(teacher, data, median_tokens(teacher, data.texts)))
    return cache[data.name]


def _measure(session, snapshot, data, final: bool) -> tuple[Comparison, float | None, float | None]:
    """The snapshot against the teacher on `data`, and (language modelling) both perplexities."""
    if session.teacher.is_decoder:
        rounds = DECODER_FINAL_ROUNDS if final else DECODER_LIVE_ROUNDS
    else:
        rounds = FINAL_ROUNDS if final else LIVE_ROUNDS
    if session.examples.language_modelling:
        text = measure_text(session.teacher, snapshot, data, _dense_figures(session, data), rounds)
        return text.comparison, text.perplexity, text.dense_perplexity
    return measure_pruned(session.teacher, snapshot, data, _dense_figures(session, data), rounds), None, None


def _snapshot(session, state: GateState):
    """The student as it would be exported now: its LoRA deltas merged (into a copy) and, in the gate
    phase, sliced by `state`. The gate hooks are detached meanwhile: the copies must not carry them (a
    hook that is a bound method would be deep-copied with its owner and the train-time gate sample)."""
    hooks = session.hooks
    if hooks is not None:
        hooks.remove()
    try:
        student = merged_copy(session.student)
        return session.method.exported(prune(student, state)) if session.phase == "gates" else student
    finally:
        if hooks is not None:
            hooks.attach()


def _mask_note(session, snapshot) -> str:
    """For a run with weight masks (Wanda): their zeros and size in sparse formats, which the structural
    sparsity and the dense-kernel timings do not show."""
    if not session.masks:
        return ""
    return (f" Weight masks: {sparse_size(snapshot.model, session.masks).describe()}; masked weights run no faster "
            "on the CPU's dense kernels.")


def measure_step(session, final: bool, replicas: list[int] | None) -> StepRecord:
    """The record of `session`'s current step (rank 0); also adapts the session's eval cadence so that
    evaluations take at most `eval_budget` of the wall time."""
    start = session.active.now()
    c = session.c
    state = session.current_state()
    data = session.dev if final else session.dev_subset
    snapshot = _snapshot(session, state)
    snapshot.model.eval()
    try:
        cmp, ppl, dense_ppl = _measure(session, snapshot, data, final)
        drift = step_drift(session, snapshot)
    finally:
        session.student.model.train()
    expected = session.method.expected_sparsity(session.step) if session.pruning() else None
    steps = len(session.losses.get("loss", []))  # a term can start mid-interval (the end of a plain fine-tune)
    losses = {k: float(np.sum(v)) / steps for k, v in session.losses.items() if v and k != "loss"}
    shape = session.shape
    seconds = session.active.now() - start  # a pause of the run (the queue froze it) is not eval time
    session.clock["eval_s"] += seconds
    # eval_s <= budget * (gap * step_s + eval_s)  <=>  gap >= eval_s (1 - budget) / (budget * step_s)
    step_s = session.clock["train_s"] / max(1, session.step)
    if step_s > 0:
        need = seconds * (1 - c.eval_budget) / (c.eval_budget * step_s)
        session.gap = max(c.eval_every, math.ceil(need))
    session.next_eval = session.step + session.gap
    return StepRecord(
        step=session.step, phase=session.phase, final=final, method=c.method, examples=len(data),
        accuracy=cmp.pruned.accuracy, dense_accuracy=cmp.dense.accuracy,
        latency_b1_ms=cmp.pruned.latency_b1_ms, latency_b32_ms=cmp.pruned.latency_b32_ms,
        dense_latency_b1_ms=cmp.dense.latency_b1_ms, dense_latency_b32_ms=cmp.dense.latency_b32_ms,
        speedup_b1=cmp.speedup(1), speedup_b32=cmp.speedup(32), flop_speedup=cmp.flop_speedup,
        parameters=cmp.pruned.parameters, dense_parameters=cmp.dense.parameters,
        sparsity=cmp.sparsity, expected_sparsity=cmp.sparsity if expected is None else expected,
        target=session.method.target(session.step), lr=session.lr(),
        loss=float(np.mean(session.losses["loss"])) if session.losses.get("loss") else None, losses=losses,
        method_figures=session.method.record(session.step) if session.phase == "gates" else {},
        **alive(state), heads_total=shape.heads, units_total=shape.intermediate, hidden_total=shape.hidden,
        note=cmp.note + _mask_note(session, snapshot), device=str(session.device), threads=torch.get_num_threads(),
        processes=session.dist.world,
        replica_checksums=replicas, clock=dict(session.clock), eval_seconds=seconds, eval_gap=session.gap,
        eval_fraction=session.clock["eval_s"] / max(1e-9, sum(session.clock.values())),
        perplexity=ppl, dense_perplexity=dense_ppl, **drift, paused_s=session.active.paused,
        nonzero_parameters=cmp.pruned.parameters - zeros(snapshot.model),
    )


def zeros(model: torch.nn.Module) -> int:
    """Exact zeros in the Linear weights of `model` (a masked model's pruned weights)."""
    return sum(int((mask == 0).sum()) for mask in zero_masks(model).values())
