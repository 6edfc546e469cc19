"""The state of one training run in this process, and the operations the loop (`pruning.loop`) calls.

A `TrainSession` holds the models (base, teacher, student), the data, the method object, the model's
optimizer and the counters; it knows no method by name. Phases: a learned method first trains its
gates with the weights (`setup_gates`: the student is a trainable copy of the model with gate hooks);
then the deterministic structure is sliced (`setup_finetune`) and the smaller model fine-tuned.
Several processes (torchrun): every step's global batch is split into one contiguous shard per rank
(`batch`), batch-mean loss terms are weighted by world * shard / batch so the averaged gradient is the
global batch's, and the method's shared tensors (gates, multipliers) are averaged after backward.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from core.adapter import Adapter, GateShape
from core.batching import collate, encode, sorted_batches
from core.data import load_splits
from core.loaded import LoadedModel
from core.models import load_model
from core.structure import pruning_info
from pruning import memory
from pruning.checkpoints import rng_state, set_rng_state
from pruning.config import TrainConfig
from pruning.distributed import Dist, resolve_device
from pruning.gate_state import GateState
from pruning.hooks import GateHooks
from pruning.losses import TaskLoss
from pruning.methods.base import MethodContext, Progress, PruningMethod
from pruning.runs import RunStore
from pruning.surgery import prune

BATCH_TERMS = ("task", "distill_ce", "distill_layer")  # batch means: weighted by shard size across ranks


@dataclasses.dataclass(frozen=True)
class Job:
    """What every process of a run needs from the run store; rank 0 reads it and tells the others."""

    run_id: int
    config: dict  # TrainConfig.to_dict()
    run_dir: Path
    attempt: int
    resume: bool  # continue from the checkpoint in run_dir


class TrainSession:
    """Models, data, method, optimizer and counters of one run in this process (`store` None on ranks > 0)."""

    def __init__(self, config: TrainConfig, job: Job, store: RunStore | None, progress: Progress | None,
                 teacher: LoadedModel | None, dist: Dist):
        self.c, self.job, self.store, self.dist = config, job, store, dist
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
        splits = load_splits(config.data_spec, self.teacher.label_names)
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
        context = MethodContext(base=self.base, teacher=self.teacher, train=self.train_data, device=self.device,
                                seed=config.seed, progress=self.progress)
        self.method: PruningMethod = config.method_class()(config.method_options(), context)
        if not same:
            self.method.check_teacher(self.teacher)
        self.task = TaskLoss(alpha_ce=config.alpha_ce, temperature=config.temperature)
        self._epoch, self._batches = -1, []
        # state that checkpoints carry
        self.step, self.phase = 0, "gates" if self.method.learned else "finetune"
        self.student: LoadedModel | None = None
        self.hooks: GateHooks | None = None
        self.ddp: torch.nn.Module | None = None  # the student's model as trained (DDP-wrapped with several ranks)
        self.fixed: GateState | None = None
        self.optimizer: torch.optim.Optimizer | None = None
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
                               gated=self.method.learned, device=str(self.device),
                               processes=self.dist.local_world if self.device.type == "cpu" else 1, available=free)

    def _check_teacher(self) -> None:
        """A separate teacher must share the model's labels and vocabulary (the method may ask for more:
        `PruningMethod.check_teacher`)."""
        base, teacher = self.base, self.teacher
        if list(base.label_names) != list(teacher.label_names):
            raise ValueError(f"The teacher's labels {teacher.label_names} differ from the model's {base.label_names}.")
        if base.tokenizer.get_vocab() != teacher.tokenizer.get_vocab():
            raise ValueError("The teacher uses another vocabulary than the model; distillation needs the same one.")

    # ------------------------------------------------------------------ phases

    def _trainable_copy(self) -> LoadedModel:
        model = copy.deepcopy(self.base.model).to(self.device)
        model.train()
        model.requires_grad_(True)
        return dataclasses.replace(self.base, model=model, adapter=Adapter(model), notes=list(self.base.notes))

    def autocast(self):
        """bf16 autocast on CUDA; nothing on the CPU."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def setup_gates(self) -> None:
        """The gate phase: a trainable copy of the model with hooks; the method creates its gates."""
        self.student = self._trainable_copy()
        extra = self.method.setup(self.student)
        self.hooks = GateHooks(self.student, GateState.dense(self.shape)).attach()
        self.ddp = self.dist.wrap(self.student.model, self.device)
        params = [*self.student.model.parameters(), *extra]
        self.optimizer = torch.optim.AdamW(params, lr=self.c.lr, weight_decay=0.0)
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
        self.hooks = None
        self.optimizer = torch.optim.AdamW(self.student.model.parameters(), lr=self.c.lr, weight_decay=0.0)
        self.phase = "finetune"

    def one_shot(self) -> None:
        """A one-shot method's structure, computed once on rank 0 (on the CPU copy) and sent to the others."""
        state = self.method.prune() if self.dist.main else None
        self.setup_finetune(self.dist.broadcast(state))

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

    def pruning(self) -> bool:
        """True while the method's gates learn at the current step."""
        return self.phase == "gates" and self.method.pruning(self.step)

    def distilling(self) -> bool:
        return self.c.distill or self.method.distills_always

    def loss_terms(self, batch: dict[str, torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Forward passes of student (and teacher when needed) on `batch`; the named loss terms."""
        if self.phase == "gates":
            state = self.method.train_state(self.step)
            self.hooks.update(state)
            hidden = self.method.needs_hidden_states()
            with self.autocast():
                out = self.ddp(**batch, output_hidden_states=hidden)
                teacher_out = None
                if self.method.needs_teacher(self.distilling()):
                    with torch.no_grad():
                        teacher_out = self.teacher.model(**batch, output_hidden_states=hidden)
            return self.method.loss(self.step, labels, out, teacher_out, state, batch["attention_mask"], self.task)
        with self.autocast():
            out = self.ddp(**batch)
            teacher_logits = None
            if self.distilling():
                with torch.no_grad():
                    teacher_logits = self.teacher.model(**batch).logits
        return self.task(out.logits, labels, teacher_logits)

    def train_step(self) -> None:
        """One optimizer step on this rank's shard; with several ranks the gradients and the logged loss
        terms are those of the global batch (see the module docstring)."""
        batch, labels, weight = self.batch(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr()
        pruning = self.pruning()
        terms = self.loss_terms(batch, labels)
        if self.dist.world > 1:
            terms = {k: v * weight if k in BATCH_TERMS else v for k, v in terms.items()}
        loss = torch.stack(list(terms.values())).sum()
        self.optimizer.zero_grad(set_to_none=True)
        if self.phase == "gates":
            self.method.zero_grad()
        loss.backward()  # DDP averages the student's gradients over the ranks here
        logged = torch.stack([loss.detach(), *(v.detach() for v in terms.values())]).float()
        shared = self.method.shared_tensors() if self.phase == "gates" else []
        self.dist.all_mean_([*shared, logged])
        torch.nn.utils.clip_grad_norm_(self.student.model.parameters(), 1.0)
        self.optimizer.step()
        if pruning:
            self.method.step(self.step)
        for name, value in zip(("loss", *terms), logged.tolist()):
            self.losses.setdefault(name, []).append(value)

    def current_state(self) -> GateState:
        """The deterministic structure now: the method's while its gates learn, dense before, or the fixed
        state of the final fine-tune."""
        if self.phase == "finetune":
            return self.fixed
        return self.method.gate_state(self.step) if self.pruning() else GateState.dense(self.shape)

    def replicated_modules(self) -> list[torch.nn.Module]:
        """What must stay identical on every rank: the method's modules (in its gate phase) and the student."""
        return [*(self.method.modules() if self.phase == "gates" else []), self.student.model]

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_payload(self) -> dict:
        """Everything a resume needs (tensors and plain types only)."""
        return {
            "run_id": self.job.run_id, "step": self.step, "phase": self.phase, "config": self.c.to_dict(),
            "model": self.student.model.state_dict(),
            "method": self.method.state_dict() if self.phase == "gates" else None,
            "optimizer": self.optimizer.state_dict(),
            "fixed_state": self.fixed.to_dict() if self.fixed is not None else None,
            "rng": rng_state(), "losses": self.losses, "clock": dict(self.clock),
            "cadence": {"gap": self.gap, "next_eval": self.next_eval, "evals": self.evals},
        }

    def restore(self, payload: dict) -> None:
        """Rebuild the state of `checkpoint_payload` (ValueError if it belongs to another config)."""
        run_dir = self.job.run_dir
        if TrainConfig.from_dict(payload.get("config", {})) != self.c:
            raise ValueError(f"The checkpoint in {run_dir} was written for another configuration; "
                             "start a new run instead.")
        try:
            if payload["phase"] == "gates":
                self.setup_gates()
                self.method.load_state_dict(payload["method"])
            else:
                self.setup_finetune(GateState.from_dict(payload["fixed_state"]))
            self.student.model.load_state_dict(payload["model"], strict=True)
            self.optimizer.load_state_dict(payload["optimizer"])
            set_rng_state(payload["rng"])
        except (KeyError, RuntimeError, TypeError, ValueError) as exc:
            raise ValueError(f"The checkpoint in {run_dir} does not fit this model "
                             f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]}).") from exc
        self.step = int(payload["step"])
        self.losses = {k: list(v) for k, v in payload["losses"].items()}
        self.clock.update(payload["clock"])
        self.gap, self.next_eval, self.evals = (int(payload["cadence"][k]) for k in ("gap", "next_eval", "evals"))

    def message(self) -> str:
        """The progress line, e.g. "gates step 120/550, loss 0.412, target 0.38"."""
        loss = self.losses.get("loss")
        text = f"{self.phase} step {self.step}/{self.c.total_steps}"
        if loss:
            text += f", loss {loss[-1]:.3f}"
        note = self.method.progress_note(self.step) if self.phase == "gates" else ""
        return f"{text}, {note}" if note else text

    @contextlib.contextmanager
    def timed(self, key: str) -> Iterator[None]:
        """Adds the wall time of the block to `clock[key]` (seconds)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.clock[key] += time.perf_counter() - start
