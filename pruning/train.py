"""The prune-and-finetune training loop for every method, driven by one `TrainConfig`.

Methods (see /work/shared/METHODS.md):

    cofi        Xia et al. 2022: hard-concrete gates on heads, whole attention / FFN sublayers, FFN units
                and hidden dims; loss = alpha_ce T^2 KL + alpha_layer L_layer (distillation from the dense
                teacher) + L_c (Lagrangian driving the expected sparsity to a ramped target)
    l0          Voita et al. 2019: one gate per head; loss = CE + lambda sum_h P(z_h != 0)
                (+ logit distillation with `distill`)
    relevance   one-shot: close the least relevant heads (LRP) and smallest FFN units to the target
    importance  one-shot: the same by Michel et al.'s importance
    random      one-shot: the same at random
    dense       no pruning: fine-tune the model as it is (e.g. a small dense model distilled from a
                bigger `teacher` with the same budget, the small-dense side of Zhu & Gupta 2017)

Phases: the learned methods first train gates and weights for `steps` steps (CoFi: a plain fine-tune
of `prefinetune_steps`, then the target ramps from 0 over `warmup_steps`; at target 0 the gates never
learn and the model stays whole, `pruning.lagrangian.TargetSchedule`); then the deterministic
gates are fixed, the model is sliced (`pruning.surgery.prune`) and the smaller model is fine-tuned for
`finetune_steps` (CE, mixed with logit distillation when distilling). Baselines and `dense` only
have the second phase. The teacher (distillation, and the dense reference that latency is timed
against) is `model` itself unless `teacher` names another classifier with the same labels and
vocabulary. Steps count across both phases; a resume continues the count. A data file's texts and
labels come from `text_column` / `label_column` (auto-detected when blank) for training, the dev
evaluations and the baselines' scores alike.

At every eval step (adaptive cadence: at least `eval_every` steps apart and at most `eval_budget` of
the wall time) the run store receives accuracy on a dev subset of the physically pruned snapshot,
its latency at batch 1 and 32 timed interleaved with the dense teacher, expected / exact sparsity and
target, lambda_1 / lambda_2, the loss terms, and units alive per layer; plus the gate snapshot. The
last eval uses the full dev split. Checkpoints every `checkpoint_every` evals, at the end of the gate
phase and on a stop request (the store's stop flag, or SIGTERM / Ctrl-C to the training process:
`StopSignals`). The final model is exported with `pruning.export.save_pruned` to
<run_dir>/model. Each eval step also records the `device`, torch `threads` and `processes` its figures
came from.

Devices: `device` auto (CUDA when present) | cpu | cuda; teacher, student, gates and batches live
there, and on CUDA the forward passes run under bf16 autocast (losses in fp32). Before training,
`pruning.memory` checks that the run fits the device's free memory (ValueError otherwise).

Several processes (`torchrun --standalone --nproc_per_node=N -m pruning train ...`, see
`pruning.distributed`): every step's global batch of `batch_size` examples is split into one
contiguous shard per rank; the student is wrapped in DistributedDataParallel, and the gradients of
the gates, the Lagrange multipliers and the layer matcher are averaged over the ranks after backward.
Batch-mean loss terms are weighted by world * shard / batch, so the averaged gradient is the global
batch's (a 2-process run follows the 1-process run up to dropout masks and float rounding). Gate
noise is drawn from (seed, step) on every rank, so all ranks use the same gate sample, and gates
and multipliers stay identical (checked at every eval step: each rank's checksum is recorded as
`replica_checksums`, and a difference fails the run). Rank 0 alone queues the run, reads and writes the run store,
checkpoints, exports and evaluates (evaluation is rank-0-only: the other ranks wait in a broadcast
of the next eval step); a stop request is broadcast so that all ranks stop at the same step, and a
resume loads rank 0's checkpoint on every rank, so the curve continues at the checkpoint's step.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from core.adapter import Adapter
from core.batching import collate, encode, sorted_batches
from core.data import DataError, TaskSplits, TextDataset, task_splits
from core.loaded import LoadedModel
from core.models import load_model
from core.structure import pruning_info
from core.summary import median_tokens
from pruning import memory
from pruning.baselines import BASELINES, baseline_state
from pruning.distill import LayerMatcher, logit_kl
from pruning.distributed import DEVICES, Dist, checksum, launcher_pid, resolve_device
from pruning.export import save_pruned
from pruning.gates import CoFiGates, GateShape, GateState, L0HeadGates
from pruning.hooks import GateHooks
from pruning.lagrangian import LagrangianController, TargetSchedule
from pruning.live import Comparison, Figures, figures, time_pair
from pruning.runs import CHECKPOINT, Heartbeat, RunStore, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from pruning.size import exact_sparsity, expected_sparsity
from pruning.surgery import prune

METHODS = ("cofi", "l0", *BASELINES, "dense")
LEARNED = ("cofi", "l0")
LOSS_TERMS = ("task", "distill_ce", "distill_layer", "lagrangian", "l0")
BATCH_TERMS = ("task", "distill_ce", "distill_layer")  # batch means: weighted by shard size across ranks
LIVE_ROUNDS = {1: (3, 2), 32: (2, 1)}  # core.latency.compare (rounds, repeats) per batch size at eval steps
FINAL_ROUNDS = {1: (5, 5), 32: (5, 2)}  # ... and at the final full-dev evaluation
MODEL_FILE = "model"  # the exported pruned model inside the run folder
Progress = Callable[[int, int, str], None]


def _opt(default, help: str):
    """A config field with its help text (shown by the CLI and the Prune page)."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Everything a training run needs; saved with the run and in every checkpoint.

    Defaults run CoFi on the default model (MiniLM-L6, Rotten Tomatoes) in a few minutes on 2 CPU cores.
    """

    model: str = _opt("default", "default | minilm-l3 | folder of a fine-tuned classifier (also the teacher)")
    teacher: str = _opt("", "distillation teacher and latency reference (blank: the model itself); same labels")
    data: str = _opt("default", "default (Rotten Tomatoes) | CSV/TSV/JSONL file, split 80/10/10 (seeded)")
    text_column: str = _opt("", "data file: the column holding the texts (blank: auto-detected, 'text' first)")
    label_column: str = _opt("", "data file: the column holding the labels (blank: auto-detected, 'label' first)")
    method: str = _opt("cofi", "cofi | l0 | relevance | importance | random | dense (fine-tune, no pruning)")
    target_sparsity: float = _opt(0.6, "fraction of the encoder's weights to remove (cofi and the baselines)")
    l0_lambda: float = _opt(0.02, "l0: weight of sum_h P(head open) in the loss (larger closes more heads)")
    steps: int = _opt(400, "cofi/l0: optimizer steps learning gates and weights (incl. the plain fine-tune)")
    prefinetune_steps: int = _opt(20, "cofi: plain fine-tune steps before pruning starts (CoFi: 100)")
    warmup_steps: int = _opt(200, "cofi: steps over which the target rises linearly from 0 to target_sparsity")
    finetune_steps: int = _opt(150, "steps fine-tuning the sliced model after pruning (0: none)")
    lr: float = _opt(5e-5, "AdamW learning rate of the model weights (linear decay in the final fine-tune)")
    gate_lr: float = _opt(0.1, "Adam learning rate of the gates' log_alpha (CoFi: 0.01 over far more steps)")
    lambda_lr: float = _opt(0.1, "cofi: learning rate of the gradient ascent on lambda_1, lambda_2")
    batch_size: int = _opt(32, "training examples per step")
    max_length: int = _opt(64, "tokens per training example (longer ones are cut)")
    distill: bool = _opt(True, "l0 / baselines / dense: mix logit distillation from the dense teacher into the loss")
    alpha_layer: float = _opt(0.5, "cofi: weight of layer matching (CoFi: 0.9, 0.7 or 0.5)")
    alpha_ce: float = _opt(0.5, "weight of the logit distillation T^2 KL (CoFi: 0.1, 0.3 or 0.5)")
    temperature: float = _opt(2.0, "distillation temperature T")
    eval_every: int = _opt(25, "fewest steps between eval steps (more when evals would exceed eval_budget)")
    eval_budget: float = _opt(0.2, "largest fraction of the wall time spent on live metrics")
    eval_examples: int = _opt(200, "dev examples (seeded subset) at each eval step; the last eval uses all")
    checkpoint_every: int = _opt(2, "eval steps between checkpoints")
    score_examples: int = _opt(256, "relevance / importance: training examples the head scores average over")
    seed: int = _opt(0, "seed of batches, gate noise, dropout and baseline draws")
    threads: int = _opt(1, "torch threads (1 keeps the app responsive on 2 cores; 0 = torch's default)")
    device: str = _opt("auto", "auto (CUDA when present) | cpu | cuda; bf16 autocast on CUDA")

    def check(self) -> TrainConfig:
        """Validate every field once (ValueError naming the field, the rule and the value); returns self."""
        def fail(name: str, rule: str) -> None:
            raise ValueError(f"The '{name}' parameter of TrainConfig must be {rule}. Got {getattr(self, name)!r} "
                             "instead.")

        def number(name: str, low: float, high: float | None = None, *, integer: bool = False, open_low=False,
                   open_high=False) -> None:
            value = getattr(self, name)
            kinds = (int,) if integer else (int, float)
            ok = isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value)
            ok = ok and (value > low if open_low else value >= low)
            ok = ok and (high is None or (value < high if open_high else value <= high))
            if not ok:
                bounds = f"{'(' if open_low else '['}{low}, {'inf' if high is None else high}" \
                         f"{')' if open_high or high is None else ']'}"
                fail(name, f"{'an integer' if integer else 'a number'} in {bounds}")

        for name in ("model", "data"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                fail(name, "a non-empty string")
        if not isinstance(self.teacher, str):
            fail("teacher", "a string (blank: the model itself)")
        for name in ("text_column", "label_column"):
            if not isinstance(getattr(self, name), str):
                fail(name, "a column name of the data file (blank: auto-detected)")
            if getattr(self, name).strip() and self.data.strip().lower() == "default":
                fail(name, "blank for data 'default' (its columns are fixed)")
        if self.method not in METHODS:
            fail("method", f"one of {', '.join(METHODS)}")
        if self.device not in DEVICES:
            fail("device", f"one of {', '.join(DEVICES)}")
        number("target_sparsity", 0.0, 1.0, open_high=True)
        number("l0_lambda", 0.0)
        for name in ("steps", "prefinetune_steps", "warmup_steps", "finetune_steps", "checkpoint_every",
                     "score_examples", "seed", "threads"):
            number(name, 0, integer=True)
        for name in ("batch_size", "eval_every", "eval_examples"):
            number(name, 1, integer=True)
        number("max_length", 8, 512, integer=True)
        for name in ("lr", "gate_lr", "lambda_lr", "temperature"):
            number(name, 0.0, open_low=True)
        for name in ("alpha_layer", "alpha_ce"):
            number(name, 0.0, 1.0)
        number("eval_budget", 0.0, 1.0, open_low=True)
        if not isinstance(self.distill, bool):
            fail("distill", "true or false")
        if self.method in LEARNED and self.steps < 1:
            fail("steps", f"at least 1 for method {self.method}")
        if self.method == "cofi" and self.prefinetune_steps + self.warmup_steps > self.steps:
            raise ValueError(f"prefinetune_steps + warmup_steps ({self.prefinetune_steps} + {self.warmup_steps}) "
                             f"must not exceed steps ({self.steps}): the target must reach its final value.")
        if self.method in BASELINES and self.target_sparsity <= 0:
            fail("target_sparsity", f"above 0 for the {self.method} baseline")
        if self.method == "dense" and self.finetune_steps < 1:
            fail("finetune_steps", "at least 1 for method dense")
        return self

    @property
    def teacher_spec(self) -> str:
        """The teacher's model spec: `teacher`, or `model` when blank."""
        return self.teacher.strip() or self.model

    @property
    def columns(self) -> dict[str, str | None]:
        """The data's text_column / label_column for `load_splits` (None: auto-detected)."""
        return {"text_column": self.text_column.strip() or None, "label_column": self.label_column.strip() or None}

    @property
    def gate_steps(self) -> int:
        """Steps of the gate phase (0 for the one-shot baselines)."""
        return self.steps if self.method in LEARNED else 0

    @property
    def total_steps(self) -> int:
        return self.gate_steps + self.finetune_steps

    def to_dict(self) -> dict:
        return asdict(self)

    def cli_args(self) -> list[str]:
        """The `python -m pruning train` options that set this config (fields left at their default
        are omitted), e.g. ["--method", "l0", "--steps", "100", "--no-distill"]."""
        args = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value == f.default:
                continue
            flag = "--" + f.name.replace("_", "-")
            args += [flag if value else "--no-" + flag[2:]] if isinstance(value, bool) else [flag, str(value)]
        return args

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        """Inverse of `to_dict`, validated; ValueError names unknown fields."""
        if not isinstance(data, dict):
            raise ValueError(f"A training config must be a JSON object. Got {type(data).__name__}.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown training config field(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(known))}.")
        return cls(**data).check()


# ----------------------------------------------------------------------------- data


def load_splits(spec: str, label_names: list[str], *, text_column: str | None = None,
                label_column: str | None = None) -> TaskSplits:
    """Train/dev/test of `spec` (see `core.data.task_splits`; a file's texts and labels from the named
    columns, auto-detected when None) with labels renumbered to the model's `label_names` (DataError
    if the data has a label the model does not know, or a named column does not exist)."""
    splits = task_splits(spec, text_column=text_column, label_column=label_column)
    names = splits.train.label_names
    if names == list(label_names):
        return splits
    unknown = sorted(set(names) - set(label_names))
    if unknown:
        raise DataError(f"The data's labels {names} do not match the model's {list(label_names)} "
                        f"(unknown: {', '.join(unknown)}).")
    ids = [list(label_names).index(n) for n in names]

    def relabel(d: TextDataset) -> TextDataset:
        return TextDataset(d.texts, [ids[y] for y in d.labels], list(label_names), d.name, list(d.warnings))

    return TaskSplits(train=relabel(splits.train), dev=relabel(splits.dev), test=relabel(splits.test))


# ----------------------------------------------------------------------------- measuring a snapshot


def measure_snapshot(dense: LoadedModel, pruned: LoadedModel, data: TextDataset, dense_figures: Figures,
                     rounds: dict[int, tuple[int, int]] = LIVE_ROUNDS) -> Comparison:
    """`pruning.live.compare_state` for an already sliced model: accuracy of `pruned` on `data`, latency
    of `pruned` and `dense` timed interleaved at each batch size of `rounds` (medians, ms).

    `dense_figures`: the dense model's accuracy and sizes on `data` (from `pruning.live.figures`).
    """
    start = time.perf_counter()
    info = pruning_info(pruned.model)
    state = GateState.from_dict(info.gate_state) if info is not None else GateState.dense(GateShape.of(pruned))
    seq_len = median_tokens(dense, data.texts)
    base = Figures(**{**asdict(dense_figures), "latency_b1_ms": None, "latency_b32_ms": None})
    small = figures(pruned, data, seq_len)
    time_pair(dense, pruned, data.texts, base, small, rounds)
    return Comparison(dense=base, pruned=small, sparsity=exact_sparsity(state), seq_len=seq_len,
                      seconds=time.perf_counter() - start, note=pruned.notes[-1] if pruned.notes else "")


def alive(state: GateState) -> dict[str, list[int] | int]:
    """Units alive per layer: heads (L,) and FFN units (L,) counting their sublayer gate, hidden dims."""
    s = state.detach()
    return {"heads_alive": ((s.head > 0) & (s.mha[:, None] > 0)).sum(dim=1).tolist(),
            "units_alive": ((s.intermediate > 0) & (s.ffn[:, None] > 0)).sum(dim=1).tolist(),
            "hidden_alive": int((s.hidden > 0).sum())}


# ----------------------------------------------------------------------------- the runner


@dataclass(frozen=True)
class Job:
    """What every process of a run needs from the run store; rank 0 reads it and tells the others."""

    run_id: int
    config: dict  # TrainConfig.to_dict()
    run_dir: Path
    attempt: int
    resume: bool  # continue from the checkpoint in run_dir


class StopSignals:
    """While active, SIGTERM and SIGINT (Ctrl-C) ask the run to stop instead of killing the process: the
    loop checkpoints at the next step boundary and the run ends as stopped. A second signal interrupts
    at once (KeyboardInterrupt). The previous handlers come back on exit. Handlers can only be set in
    the main thread; elsewhere this does nothing (a stop request through the store still works)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None  # the first signal's number
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        self._previous = {}


def gate_seed(seed: int, step: int) -> int:
    """The torch seed of step `step`'s gate noise: the same on every rank, independent of how much
    randomness dropout or evaluation consumed before."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])


class _Trainer:
    """State of one run in this process: models, gates, optimizers, counters. Use through `train`.

    `store` is None on every rank but 0 (see the module docstring)."""

    def __init__(self, config: TrainConfig, job: Job, store: RunStore | None, progress: Progress | None,
                 teacher: LoadedModel | None, dist: Dist, signals: StopSignals):
        self.c = config
        self.signals = signals
        self.store, self.run_id = store, job.run_id
        self.run_dir, self.attempt = job.run_dir, job.attempt
        self.dist = dist
        self.device = resolve_device(config.device, dist.local_rank)
        self.progress = progress or (lambda done, total, message: None)
        self.teacher = teacher if teacher is not None else load_model(config.teacher_spec)
        same = config.teacher_spec == config.model
        self.base = self.teacher if same else load_model(config.model)  # what the student starts from
        for role, loaded in (("model", self.base), ("teacher", self.teacher)):
            if not loaded.has_classifier:
                raise ValueError(f"The {role} {loaded.source} has no classification head: fine-tune it first "
                                 "(`python -m core finetune`).")
        self.shape = GateShape.of(self.base)  # ValueError for an already pruned model
        if not same:
            self._check_teacher()
        self.teacher.model.eval()
        splits = load_splits(config.data, self.teacher.label_names, **config.columns)
        if len(splits.train) < config.batch_size:
            raise ValueError(f"The training split has {len(splits.train)} examples, fewer than batch_size "
                             f"{config.batch_size}.")
        if config.batch_size < dist.world:
            raise ValueError(f"batch_size {config.batch_size} is the global batch, split across {dist.world} "
                             "processes; it must be at least the number of processes.")
        self.train_data, self.dev = splits.train, splits.dev
        self.dev_subset = splits.dev.subset(config.eval_examples, seed=config.seed)
        self.enc = encode(self.base.tokenizer, splits.train.texts, config.max_length)
        self.labels = torch.tensor(splits.train.labels)
        self.schedule = TargetSchedule(config.target_sparsity, start=config.prefinetune_steps,
                                       warmup=config.warmup_steps) if config.method == "cofi" else None
        self._epoch, self._batches = -1, []
        self._dense_figures: dict[str, Figures] = {}
        # state that checkpoints carry
        self.step, self.phase = 0, "gates" if config.method in LEARNED else "finetune"
        self.student: LoadedModel | None = None
        self.gates: CoFiGates | None = None
        self.controller: LagrangianController | None = None
        self.matcher: LayerMatcher | None = None
        self.hooks: GateHooks | None = None
        self.ddp: torch.nn.Module | None = None  # the student's model as trained (DDP-wrapped with several ranks)
        self.fixed: GateState | None = None
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.losses: dict[str, list[float]] = {}
        self.clock = {"train_s": 0.0, "eval_s": 0.0, "checkpoint_s": 0.0, "setup_s": 0.0}
        self.gap, self.next_eval, self.evals = config.eval_every, 0, 0

    def memory_budget(self) -> memory.MemoryEstimate:
        """The memory this run needs per process vs what the device has free (`pruning.memory`).

        On the CPU the models this process already loaded count as available (they are part of the
        estimate), and the node's processes share the memory."""
        held = {id(m.model): sum(p.numel() for p in m.model.parameters()) for m in (self.base, self.teacher)}
        free = memory.available_bytes(self.device)
        if free is not None and self.device.type == "cpu":
            free += memory.FLOAT * sum(held.values())
        longest = max(len(ids) for ids in self.enc.ids)  # tokens; the batch holding it is the peak
        return memory.estimate(held[id(self.base.model)], held[id(self.teacher.model)], self.shape,
                               math.ceil(self.c.batch_size / self.dist.world), longest,
                               gated=self.c.method in LEARNED, device=str(self.device),
                               processes=self.dist.local_world if self.device.type == "cpu" else 1, available=free)

    def _check_teacher(self) -> None:
        """A separate teacher must share the model's labels and vocabulary (and, for CoFi's layer
        matching, its layer count and hidden size): ValueError otherwise."""
        base, teacher = self.base, self.teacher
        if list(base.label_names) != list(teacher.label_names):
            raise ValueError(f"The teacher's labels {teacher.label_names} differ from the model's {base.label_names}.")
        if base.tokenizer.get_vocab() != teacher.tokenizer.get_vocab():
            raise ValueError("The teacher uses another vocabulary than the model; distillation needs the same one.")
        theirs = GateShape.of(teacher)
        if self.c.method == "cofi" and (theirs.layers, theirs.hidden) != (self.shape.layers, self.shape.hidden):
            raise ValueError(f"CoFi's layer matching needs a teacher with the model's {self.shape.layers} layers "
                             f"and hidden size {self.shape.hidden}; the teacher has {theirs.layers} and "
                             f"{theirs.hidden}.")

    # ------------------------------------------------------------------ setting up the phases

    def _trainable_copy(self) -> LoadedModel:
        model = copy.deepcopy(self.base.model).to(self.device)
        model.train()
        model.requires_grad_(True)
        return dataclasses.replace(self.base, model=model, adapter=Adapter(model), notes=list(self.base.notes))

    def _autocast(self):
        """bf16 autocast on CUDA; nothing on the CPU."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def setup_gates(self) -> None:
        """The gate phase: a trainable copy of the teacher with hooks, gates and their optimizers."""
        c = self.c
        self.student = self._trainable_copy()
        self.gates = (CoFiGates(self.student) if c.method == "cofi" else L0HeadGates(self.student)).to(self.device)
        self.gates.train()
        self.hooks = GateHooks(self.student, GateState.dense(self.shape)).attach()
        self.ddp = self.dist.wrap(self.student.model, self.device)
        params = list(self.student.model.parameters())
        if c.method == "cofi":
            self.controller = LagrangianController().to(self.device)
            self.matcher = LayerMatcher(self.shape.hidden).to(self.device)
            params += list(self.matcher.parameters())
            self.optimizers["lambdas"] = self.controller.optimizer(c.lambda_lr)
        self.optimizers["model"] = torch.optim.AdamW(params, lr=c.lr, weight_decay=0.0)
        self.optimizers["gates"] = torch.optim.Adam(self.gates.parameters(), lr=c.gate_lr)
        self.phase = "gates"

    def setup_finetune(self, state: GateState) -> None:
        """The fixed-structure phase: slice (a copy of) the student, or the model if there is none."""
        if self.hooks is not None:
            self.hooks.remove()
        source = self.student if self.student is not None else self.base
        self.student = prune(source, state.detach())
        self.student.model.to(self.device).train()
        self.student.model.requires_grad_(True)
        info = pruning_info(self.student.model)
        self.ddp = self.dist.wrap(self.student.model, self.device,
                                  find_unused=bool(info is not None and info.plan.skipped_attention))
        self.fixed = state.detach()
        self.gates = self.controller = self.matcher = self.hooks = None
        self.optimizers = {"model": torch.optim.AdamW(self.student.model.parameters(), lr=self.c.lr, weight_decay=0.0)}
        self.phase = "finetune"

    # ------------------------------------------------------------------ one step

    def batch(self, step: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, float]:
        """This rank's shard of the global batch of `step` (on the device) and its loss weight
        world * shard / batch (1 in a single process). Epochs are reshuffled by (seed, epoch), so a
        resume sees the same batches. A rank whose shard is empty (a last batch smaller than the
        number of ranks) runs the batch's first example with weight 0."""
        def epoch_batches(epoch: int) -> list[np.ndarray]:
            return list(sorted_batches(self.enc, self.c.batch_size, np.random.default_rng([self.c.seed, epoch])))

        if self._epoch < 0:
            self._epoch, self._batches = 0, epoch_batches(0)
        epoch, index = divmod(step, len(self._batches))
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, epoch_batches(epoch)
        idx = self._batches[index]
        mine = idx[self.dist.shard(len(idx))]
        weight = self.dist.world * len(mine) / len(idx)
        mine = mine if len(mine) else idx[:1]
        batch = collate([self.enc.ids[i] for i in mine], self.base.tokenizer.pad_token_id)
        return {k: v.to(self.device) for k, v in batch.items()}, self.labels[mine].to(self.device), weight

    def lr(self) -> float:
        """Constant in the gate phase; linear decay to 0 over the final fine-tune."""
        if self.phase == "gates":
            return self.c.lr
        done = self.step - self.c.gate_steps
        return self.c.lr * max(0.0, 1 - done / max(1, self.c.finetune_steps))

    def train_step(self) -> None:
        """One optimizer step on this rank's shard; with several ranks the gradients and the logged loss
        terms are those of the global batch (see the module docstring)."""
        c = self.c
        batch, labels, weight = self.batch(self.step)
        for group in self.optimizers["model"].param_groups:
            group["lr"] = self.lr()
        terms: dict[str, torch.Tensor] = {}
        pruning = self.pruning()
        teacher_out = None
        distill = c.method == "cofi" or c.distill
        if self.phase == "gates":
            state = self.gate_sample() if pruning else GateState.dense(self.shape)
            self.hooks.update(state)
            layers = c.method == "cofi" and c.alpha_layer > 0
            with self._autocast():
                out = self.ddp(**batch, output_hidden_states=layers)
                if distill:
                    with torch.no_grad():
                        teacher_out = self.teacher.model(**batch, output_hidden_states=layers)
            if c.method == "cofi":
                terms["distill_ce"] = c.alpha_ce * logit_kl(out.logits.float(), teacher_out.logits.float(),
                                                            c.temperature)
                if layers:
                    loss, _ = self.matcher([h.float() for h in out.hidden_states[1:]],
                                           [h.float() for h in teacher_out.hidden_states[1:]],
                                           alive=state.mha.detach() > 0, mask=batch["attention_mask"])
                    terms["distill_layer"] = c.alpha_layer * loss
                if pruning:
                    terms["lagrangian"] = self.controller(expected_sparsity(self.gates), self.schedule.at(self.step))
            else:
                self._task_terms(terms, out.logits.float(), labels, teacher_out)
                terms["l0"] = c.l0_lambda * self.gates.penalty()
        else:
            with self._autocast():
                out = self.ddp(**batch)
                if distill:
                    with torch.no_grad():
                        teacher_out = self.teacher.model(**batch)
            self._task_terms(terms, out.logits.float(), labels, teacher_out)
        if self.dist.world > 1:
            terms = {k: v * weight if k in BATCH_TERMS else v for k, v in terms.items()}
        loss = torch.stack(list(terms.values())).sum()
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        loss.backward()  # DDP averages the student's gradients over the ranks here
        shared = [p.grad for m in (self.gates, self.controller, self.matcher) if m is not None
                  for p in m.parameters() if p.grad is not None]
        logged = torch.stack([loss.detach(), *(v.detach() for v in terms.values())]).float()
        self.dist.all_mean_([*shared, logged])
        torch.nn.utils.clip_grad_norm_(self.student.model.parameters(), 1.0)
        self.optimizers["model"].step()
        if pruning:
            self.optimizers["gates"].step()
            if "lambdas" in self.optimizers:
                self.optimizers["lambdas"].step()
            self.gates.clamp_()
        for name, value in zip(("loss", *terms), logged.tolist()):
            self.losses.setdefault(name, []).append(value)

    def gate_sample(self) -> GateState:
        """A train-time gate sample drawn from `gate_seed(seed, step)` (the global RNG is left as it was)."""
        cuda = self.device.type == "cuda"
        with torch.random.fork_rng(devices=[self.device] if cuda else [], device_type=self.device.type):
            torch.manual_seed(gate_seed(self.c.seed, self.step))
            return self.gates.sample()

    def _task_terms(self, terms: dict, logits: torch.Tensor, labels: torch.Tensor, teacher_out) -> None:
        """CE, mixed (1 - alpha_ce) : alpha_ce with T^2 KL when a teacher output is given."""
        ce = F.cross_entropy(logits, labels)
        if teacher_out is None:
            terms["task"] = ce
            return
        terms["task"] = (1 - self.c.alpha_ce) * ce
        terms["distill_ce"] = self.c.alpha_ce * logit_kl(logits, teacher_out.logits, self.c.temperature)

    # ------------------------------------------------------------------ eval steps

    def pruning(self) -> bool:
        """True while the gates learn (at the current step): l0 in all of its gate phase, cofi once its
        target schedule prunes (never at target 0: the model stays whole)."""
        if self.phase != "gates":
            return False
        return self.c.method == "l0" or self.schedule.pruning(self.step)

    def current_state(self) -> GateState:
        """The deterministic gates now: learned gates' eval rule while they learn, the dense state before
        (or without) pruning, or the fixed state of the final fine-tune."""
        if self.phase == "finetune":
            return self.fixed
        if not self.pruning():
            return GateState.dense(self.shape)
        return self.gates.deterministic()

    def dense_figures(self, data: TextDataset) -> Figures:
        """The teacher's accuracy and sizes on `data` (computed once per dataset)."""
        key = data.name
        if key not in self._dense_figures:
            self._dense_figures[key] = figures(self.teacher, data, median_tokens(self.teacher, data.texts))
        return self._dense_figures[key]

    def evaluate(self, final: bool = False) -> dict | None:
        """Rank 0 measures the snapshot, records metrics and gates and adapts the eval cadence, which it
        then tells the other ranks (they wait here meanwhile). With several ranks, every rank's checksum
        of its gates, multipliers, layer matcher and student weights is gathered first and recorded as
        `replica_checksums` (None in a single process); RuntimeError if the ranks differ. Returns the
        metrics (None on other ranks)."""
        replicas = None
        if self.dist.world > 1:
            replicas = self.dist.gather(checksum([self.gates, self.controller, self.matcher, self.student.model]))
        if replicas and len(set(replicas)) > 1:
            raise RuntimeError(f"The processes' gates, multipliers or weights diverged at step {self.step} "
                               f"(checksums {replicas}).")
        metrics = self._measure(final, replicas) if self.dist.main else None
        self.losses = {}
        self.evals += 1
        self.gap, self.next_eval = self.dist.broadcast((self.gap, self.next_eval))
        return metrics

    def _measure(self, final: bool, replicas: list[int] | None) -> dict:
        start = time.perf_counter()
        state = self.current_state()
        data = self.dev if final else self.dev_subset
        if self.phase == "gates":
            snapshot = prune(self.student, state)
        else:
            snapshot = self.student
            snapshot.model.eval()
        try:
            cmp = measure_snapshot(self.teacher, snapshot, data, self.dense_figures(data),
                                   FINAL_ROUNDS if final else LIVE_ROUNDS)
        finally:
            self.student.model.train()
        expected = float(expected_sparsity(self.gates).detach()) if self.pruning() else cmp.sparsity
        lambdas = self.controller.values() if self.controller is not None else (None, None)
        losses = {f"loss_{k}" if k != "loss" else k: float(np.mean(v)) for k, v in self.losses.items() if v}
        metrics = {
            "phase": self.phase, "final": final, "examples": len(data), "method": self.c.method,
            "accuracy": cmp.pruned.accuracy, "dense_accuracy": cmp.dense.accuracy,
            "latency_b1_ms": cmp.pruned.latency_b1_ms, "latency_b32_ms": cmp.pruned.latency_b32_ms,
            "dense_latency_b1_ms": cmp.dense.latency_b1_ms, "dense_latency_b32_ms": cmp.dense.latency_b32_ms,
            "speedup_b1": cmp.speedup(1), "speedup_b32": cmp.speedup(32), "flop_speedup": cmp.flop_speedup,
            "parameters": cmp.pruned.parameters, "dense_parameters": cmp.dense.parameters,
            "expected_sparsity": expected, "sparsity": cmp.sparsity,
            "target": self.schedule.at(max(0, self.step - 1)) if self.c.method == "cofi" else (
                self.c.target_sparsity if self.c.method in BASELINES else None),
            "lambda_1": lambdas[0], "lambda_2": lambdas[1], "lr": self.lr(),
            **{f"loss_{k}": None for k in LOSS_TERMS}, "loss": None, **losses,
            **alive(state), "heads_total": self.shape.heads, "units_total": self.shape.intermediate,
            "hidden_total": self.shape.hidden, "note": cmp.note,
            "device": str(self.device), "threads": torch.get_num_threads(), "processes": self.dist.world,
            "replica_checksums": replicas,
        }
        seconds = time.perf_counter() - start
        self.clock["eval_s"] += seconds
        # eval_s <= budget * (gap * step_s + eval_s)  <=>  gap >= eval_s (1 - budget) / (budget * step_s)
        step_s = self.clock["train_s"] / max(1, self.step)
        if step_s > 0:
            need = seconds * (1 - self.c.eval_budget) / (self.c.eval_budget * step_s)
            self.gap = max(self.c.eval_every, math.ceil(need))
        self.next_eval = self.step + self.gap
        metrics.update(self.clock, eval_seconds=seconds, eval_gap=self.gap,
                       eval_fraction=self.clock["eval_s"] / max(1e-9, sum(self.clock.values())))
        self.store.add_metrics(self.run_id, self.step, metrics, self.attempt)
        self.store.add_gates(self.run_id, self.step, state, self.attempt)
        return metrics

    # ------------------------------------------------------------------ checkpoints

    def checkpoint(self) -> None:
        """Rank 0 saves everything a resume needs to <run_dir>/checkpoint.pt (other ranks: nothing)."""
        if not self.dist.main:
            return
        start = time.perf_counter()
        payload = {
            "run_id": self.run_id, "step": self.step, "phase": self.phase, "config": self.c.to_dict(),
            "model": self.student.model.state_dict(),
            "gates": self.gates.state_dict() if self.gates is not None else None,
            "controller": self.controller.state_dict() if self.controller is not None else None,
            "matcher": self.matcher.state_dict() if self.matcher is not None else None,
            "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
            "fixed_state": self.fixed.to_dict() if self.fixed is not None else None,
            "rng": rng_state(), "losses": self.losses, "clock": dict(self.clock),
            "cadence": {"gap": self.gap, "next_eval": self.next_eval, "evals": self.evals},
        }
        save_checkpoint(self.run_dir, payload)
        self.clock["checkpoint_s"] += time.perf_counter() - start

    def restore(self, payload: dict) -> None:
        """Rebuild the state saved by `checkpoint` (ValueError if it belongs to another config; fields
        added since it was written count at their defaults)."""
        if {**self.c.to_dict(), **payload.get("config", {})} != self.c.to_dict():
            raise ValueError(f"The checkpoint in {self.run_dir} was written for another configuration; "
                             "start a new run instead.")
        try:
            if payload["phase"] == "gates":
                self.setup_gates()
                self.gates.load_state_dict(payload["gates"])
                if self.controller is not None:
                    self.controller.load_state_dict(payload["controller"])
                    self.matcher.load_state_dict(payload["matcher"])
            else:
                self.setup_finetune(GateState.from_dict(payload["fixed_state"]))
            self.student.model.load_state_dict(payload["model"], strict=True)
            for name, opt in self.optimizers.items():
                opt.load_state_dict(payload["optimizers"][name])
            set_rng_state(payload["rng"])
        except (KeyError, RuntimeError, TypeError) as exc:
            raise ValueError(f"The checkpoint in {self.run_dir} does not fit this model "
                             f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]}).") from exc
        self.step = int(payload["step"])
        self.losses = {k: list(v) for k, v in payload["losses"].items()}
        self.clock.update(payload["clock"])
        self.gap, self.next_eval, self.evals = (int(payload["cadence"][k]) for k in ("gap", "next_eval", "evals"))

    # ------------------------------------------------------------------ the loop

    def start(self) -> None:
        """A fresh run: the gate phase, the baseline's one-shot pruning, or the model as it is (dense)."""
        if self.c.method in LEARNED:
            self.setup_gates()
            return
        if self.c.method == "dense":
            self.setup_finetune(GateState.dense(self.shape))
            return
        state = None
        if self.dist.main:  # scored once, on the CPU copy of the model, and sent to the other ranks
            self.progress(0, 1, f"scoring heads ({self.c.method})")
            rows = self.train_data.subset(self.c.score_examples, seed=self.c.seed)
            state = baseline_state(self.c.method, self.base, rows.texts, rows.labels, self.c.target_sparsity,
                                   seed=self.c.seed, progress=self.progress)
        self.setup_finetune(self.dist.broadcast(state))

    def stop_requested(self) -> bool:
        """Rank 0 looks for SIGTERM / SIGINT (every step) and reads the stop flag (at most once a second),
        and tells every rank, every step."""
        stop = self.signals.received is not None
        now = time.monotonic()
        if not stop and self.dist.main and now - getattr(self, "_stop_checked", 0.0) >= 1.0:
            self._stop_checked = now
            stop = self.store.stop_requested(self.run_id)
        return self.dist.flag(stop)

    def run(self, resume: bool) -> str:
        """Train to the end or to a stop request; returns "done" or "stopped"."""
        c = self.c
        start = time.perf_counter()
        torch.manual_seed(c.seed)
        if resume:  # rank 0 reads the checkpoint; every rank restores the same state from it
            self.restore(self.dist.broadcast(load_checkpoint(self.run_dir) if self.dist.main else None))
            if self.dist.main:
                self.store.supersede_after(self.run_id, self.step)
        else:
            if self.dist.main:  # an earlier attempt left no checkpoint: start over
                self.store.supersede_after(self.run_id, -1)
            self.start()
        self.teacher.model.to(self.device)  # after the baselines scored heads on the CPU copy
        self.clock["setup_s"] += time.perf_counter() - start
        total = c.total_steps
        if not resume:
            self.evaluate()
            self.checkpoint()
        while self.step < total:
            if self.stop_requested():
                self.checkpoint()
                if self.dist.main:  # the store's step is the checkpoint's (heartbeats are throttled)
                    self.store.heartbeat(self.run_id, step=self.step, total=total, message=self.message())
                return "stopped"
            started = time.perf_counter()
            self.train_step()
            self.step += 1
            self.clock["train_s"] += time.perf_counter() - started
            self.report(total)
            end_of_gates = self.phase == "gates" and self.step == c.gate_steps
            if self.step < total and (self.step >= self.next_eval or end_of_gates):
                self.evaluate()  # at the end of the gate phase: the learned structure before its fine-tune
                if end_of_gates:
                    self.setup_finetune(self.current_state())
                if end_of_gates or self.evals % max(1, c.checkpoint_every) == 0:
                    self.checkpoint()
        if self.phase == "gates":  # finetune_steps == 0: slice the learned structure as it is
            self.setup_finetune(self.current_state())
        self.progress(total, total, "final evaluation on the full dev split")
        final = self.evaluate(final=True)
        if self.dist.main:
            self.student.model.cpu()
            final["export"] = str(save_pruned(self.student, self.run_dir / MODEL_FILE, overwrite=True))
            self.store.finish(self.run_id, "done", result=final)
        return "done"

    def report(self, total: int) -> None:
        """Progress to the callback (every step) and to the store (at most twice a second)."""
        message = self.message()
        self.progress(self.step, total, message)
        now = time.monotonic()
        if self.dist.main and (now - getattr(self, "_reported", 0.0) >= 0.5 or self.step == total):
            self._reported = now
            self.store.heartbeat(self.run_id, step=self.step, total=total, message=message)

    def message(self) -> str:
        loss = self.losses.get("loss")
        text = f"{self.phase} step {self.step}/{self.c.total_steps}"
        if loss:
            text += f", loss {loss[-1]:.3f}"
        if self.phase == "gates" and self.c.method == "cofi" and self.schedule.pruning(self.step):
            text += f", target {self.schedule.at(self.step):.2f}"
        return text


def train(config: TrainConfig, store: RunStore | None, job: Job, progress: Progress | None = None, *,
          teacher: LoadedModel | None = None, dist: Dist | None = None) -> str:
    """Run the training of `job` (already claimed as running in `store`) in this process.

    `job.resume` continues from the run folder's checkpoint (ValueError if it is missing or corrupt).
    `teacher` may pass the already loaded `config.teacher_spec`. Before training starts the memory
    budget is checked (`pruning.memory`; ValueError if the run cannot fit). Rank 0 ends the run in
    the store as done, stopped (a stop request, SIGTERM or Ctrl-C (`StopSignals`): checkpointed at
    the next step boundary first) or failed (the error recorded, then re-raised); a second signal
    interrupts at once and marks it interrupted. With several processes (`dist`), every rank calls
    this with the same job, `store` only on rank 0; rank 0 loads its models and checks the memory
    before the others load theirs. Returns "done" or "stopped".
    """
    dist = dist or Dist()
    config.check()
    threads = torch.get_num_threads()
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    try:
        with StopSignals() as signals, Heartbeat(store, job.run_id) if dist.main else contextlib.nullcontext():
            trainer = None
            if dist.main:
                trainer = _Trainer(config, job, store, progress, teacher, dist, signals)
                memory.check(trainer.memory_budget())
            dist.barrier()
            trainer = trainer or _Trainer(config, job, None, None, teacher, dist, signals)
            status = trainer.run(job.resume)
        if status == "stopped" and dist.main:
            store.finish(job.run_id, "stopped")
        return status
    except KeyboardInterrupt:
        if dist.main:
            store.finish(job.run_id, "interrupted", error="interrupted (a second Ctrl-C or SIGTERM)")
        raise
    except BaseException as exc:
        if dist.main:
            store.finish(job.run_id, "failed", error=f"{type(exc).__name__}: {' '.join(str(exc).split())}")
        raise
    finally:
        torch.set_num_threads(threads)


WAITING = "waiting"  # what rank 0 tells the other ranks while the run waits in the queue


def run_job(store: RunStore | None, run_id: int | None, progress: Progress | None = None, *,
            exclusive: bool = True, teacher: LoadedModel | None = None, dist: Dist | None = None) -> str:
    """Start or resume run `run_id` in this process: queue it, wait for its turn, then `train`.

    A run with a checkpoint in its folder resumes from it; otherwise it starts from step 0. Returns
    "done", "stopped" (also when stopped while still queued). With several processes (`dist`) only
    rank 0 passes the store and the run id: it queues the run for the torchrun agent's pid and
    claims it, telling the other ranks every poll that it still waits, then the `Job`.
    """
    dist = dist or Dist()
    job = None
    if dist.main:
        run = store.enqueue(run_id, pid=launcher_pid())

        def waiting(message: str) -> None:
            dist.broadcast(WAITING)
            if progress:
                progress(0, 1, message)

        if store.wait_turn(run_id, exclusive=exclusive, on_wait=waiting):
            job = Job(run_id=run_id, config=run.config, run_dir=run.run_dir, attempt=run.attempt,
                      resume=(run.run_dir / CHECKPOINT).exists())
    while (job := dist.broadcast(job)) == WAITING:
        pass
    if job is None:
        return "stopped"
    return train(TrainConfig.from_dict(job.config), store, job, progress, teacher=teacher, dist=dist)
