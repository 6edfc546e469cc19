"""The state of one training run in this process, and the operations the loop (`pruning.loop`) calls.

A `TrainSession` holds the models (base, teacher, student), the data, the method object, the model's
optimizer and the counters; it knows no method by name. Phases: a learned method first trains its
gates with the weights (`setup_gates`: the student is a trainable copy of the model with gate hooks);
then the deterministic structure is sliced (`setup_finetune`) and the smaller model fine-tuned.
Several processes (torchrun): every step's global batch is split into one contiguous shard per rank
(`batch`), batch-mean loss terms are weighted by world * shard / batch so the averaged gradient is the
global batch's, and the method's shared tensors (gates, multipliers) are averaged after backward
(language-modelling terms are means over a shard's scored tokens, so there ranks weigh by examples).

The task follows the data (`pruning.examples`): labelled texts train the classifier (an encoder's
head, or a decoder's prompt: the label words' logits), plain documents train a decoder's causal LM
on next-token prediction. With `lora` the student trains LoRA adapters with its weights frozen
(`pruning.lora`): they are added before the gate hooks (which then gate the adapters' wrappers too)
and merged into the weights before every slicing and the export.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from core.adapter import Adapter, GateShape
from core.batching import Encoded, encode, sorted_batches
from core.cpu_queue import ActiveClock
from core.data import TextDataset, load_splits, load_text
from core.loaded import LoadedModel
from core.lowrank import low_rank_names, rebuild_low_rank
from core.models import load_model
from core.structure import pruning_info
from pruning import memory
from pruning.checkpoints import rng_state, set_rng_state
from pruning.config import TrainConfig
from pruning.distill import layer_outputs
from pruning.distributed import Dist, resolve_device
from pruning.examples import Examples, cut_texts, text_examples
from pruning.gate_state import GateState
from pruning.hooks import GateHooks
from pruning.lora import add_lora, lora_parameters, merge_lora
from pruning.losses import TaskLoss
from pruning.methods.base import MethodContext, OneShotResult, Progress, PruningMethod
from pruning.runs import RunStore
from pruning.surgery import prune

BATCH_TERMS = ("task", "distill_ce", "distill_layer")  # batch means: weighted by shard size across ranks
UNCUT = 10**9  # no cut (a prompted decoder's texts are cut before the template is filled)


def classification_examples(loaded: LoadedModel, data: TextDataset, max_length: int) -> Examples:
    """One example per text of `data`, its target the class id: an encoder's text cut to `max_length`
    tokens, a prompted decoder's prompt around its text cut to `max_length` tokens (`pruning.examples`)."""
    if loaded.prompt is None:
        enc = encode(loaded.tokenizer, data.texts, max_length)
    else:
        texts, cut = cut_texts(loaded.text_tokenizer, data.texts, max_length)
        enc = Encoded(ids=encode(loaded.tokenizer, texts, UNCUT).ids, truncated=cut, max_length=max_length)
    return Examples(enc=enc, labels=torch.tensor(data.labels), pad_id=loaded.tokenizer.pad_token_id)


def freeze_backbone(model: torch.nn.Module) -> None:
    """Only the classification head (the parameters outside the base model, and its pooler) trains."""
    base = model.base_model
    pooler = getattr(base, "pooler", None) or torch.nn.Module()
    inside = {id(p) for p in base.parameters()} - {id(p) for p in pooler.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) not in inside)


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
        spec = config.data_spec
        if spec.is_text:  # documents: the causal LM's next-token loss, evaluated by perplexity
            self.train_data, self.dev = load_text(spec, "train"), load_text(spec, "dev")
            self.examples: Examples = text_examples(self.base, self.train_data.documents, config.max_length)
        else:
            splits = load_splits(spec, self.teacher.label_names)
            self.train_data, self.dev = splits.train, splits.dev
            self.examples = classification_examples(self.base, splits.train, config.max_length)
        if len(self.examples) < config.batch_size:
            raise ValueError(f"The training split has {len(self.examples)} examples, fewer than batch_size "
                             f"{config.batch_size}.")
        if config.batch_size < dist.world:
            raise ValueError(f"batch_size {config.batch_size} is the global batch, split across {dist.world} "
                             "processes; it must be at least the number of processes.")
        self.dev_subset = self.dev.subset(config.eval_examples, seed=config.seed)
        context = MethodContext(base=self.base, teacher=self.teacher, train=self.train_data, device=self.device,
                                seed=config.seed, progress=self.progress, examples=self.examples,
                                gate_steps=config.gate_steps)
        config.method_class().check_model(config.method_options(), self.base)
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
        self.masks: dict[str, torch.Tensor] = {}  # a one-shot method's weight masks (parameter name -> 0/1)
        self.rebuilt = False  # the one-shot method changed weights before slicing (a resume asks it again)
        self._masked: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        self.optimizer: torch.optim.Optimizer | None = None
        self.losses: dict[str, list[float]] = {}
        self.clock = {"train_s": 0.0, "eval_s": 0.0, "checkpoint_s": 0.0, "setup_s": 0.0}
        self.active = ActiveClock()  # wall time without the CPU queue's pauses of this process
        self.gap, self.next_eval, self.evals = config.eval_every, 0, 0

    def memory_budget(self) -> memory.MemoryEstimate:
        """The memory this run needs per process vs what the device has free (`pruning.memory`).

        On the CPU the models this process already loaded count as available (they are part of the
        estimate), and the node's processes share the memory."""
        held = {id(m.model): sum(p.numel() for p in m.model.parameters()) for m in (self.base, self.teacher)}
        free = memory.available_bytes(self.device)
        if free is not None and self.device.type == "cpu":
            free += memory.FLOAT * sum(held.values())
        lora = self.c.lora_settings
        config = self.base.model.config
        work = memory.Workload(
            decoder=self.base.is_decoder, eager=getattr(config, "_attn_implementation", "eager") == "eager",
            vocab=config.vocab_size if self.examples.language_modelling else 0,
            hidden_states=self.method.learned and self.method.needs_hidden_states(),
            lora_rank=lora.rank if lora else 0, lora_dropout=bool(lora and lora.dropout > 0))
        return memory.estimate(held[id(self.base.model)], held[id(self.teacher.model)], self.shape,
                               math.ceil(self.c.batch_size / self.dist.world), self.examples.longest,
                               gated=self.method.learned, device=str(self.device),
                               processes=self.dist.local_world if self.device.type == "cpu" else 1, available=free,
                               trainable=lora_parameters(self.base.adapter, lora.rank) if lora else None, work=work)

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
        return self._trainable(dataclasses.replace(self.base, model=model, adapter=Adapter(model),
                                                   notes=list(self.base.notes)))

    def _trainable(self, student: LoadedModel) -> LoadedModel:
        """`student` in train mode with every weight trainable, only its classification head (a method
        with `frozen_backbone`), or (lora) with LoRA adapters added and only those trainable."""
        student.model.to(self.device).train()
        student.model.requires_grad_(True)
        if self.method.frozen_backbone:
            freeze_backbone(student.model)
        if self.c.lora:
            add_lora(student, self.c.lora_settings)
            student.model.to(self.device)
        return student

    def _trained_module(self) -> torch.nn.Module:
        """What the forward pass calls: the student's classifier, or its causal LM for language modelling."""
        return self.student.lm if self.examples.language_modelling else self.student.model

    def _optimizer(self, extra: list[torch.nn.Parameter], skip: list[torch.nn.Module] = ()) -> torch.optim.Optimizer:
        """AdamW over the student's trainable parameters but those of `skip` (a method's own modules living
        inside the student, e.g. FLOP's gates, which its own optimizers step), plus `extra`."""
        own = {id(p) for m in skip for p in m.parameters()}
        params = [p for p in self.student.model.parameters() if p.requires_grad and id(p) not in own]
        return torch.optim.AdamW([*params, *extra], lr=self.c.lr, weight_decay=0.0)

    def autocast(self):
        """bf16 autocast on CUDA; nothing on the CPU."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def setup_gates(self) -> None:
        """The gate phase: a trainable copy of the model with hooks; the method creates its gates."""
        self.student = self._trainable_copy()
        extra = self.method.setup(self.student)
        self.hooks = GateHooks(self.student, GateState.dense(self.shape)).attach()  # after LoRA: on its wrappers
        self.ddp = self.dist.wrap(self._trained_module(), self.device)
        self.optimizer = self._optimizer(extra, skip=self.method.modules())
        self.phase = "gates"

    def setup_finetune(self, state: GateState, source: LoadedModel | None = None,
                       masks: dict[str, torch.Tensor] | None = None) -> None:
        """The fixed-structure phase: slice (a copy of) `source`, else the student, its LoRA deltas merged
        first, or the model if there is none; `masks` (parameter names of the sliced model; at the end of a
        gate phase the method's `finish_gates`) are applied and stay applied (`apply_masks`); with lora the
        sliced model gets fresh adapters."""
        if self.hooks is not None:
            self.hooks.remove()
        if masks is None and self.phase == "gates":  # the end of a learned method's gate phase
            masks = self.method.finish_gates(self.step)
        source = source or (self.student if self.student is not None else self.base)
        if len(source.text_tokenizer) != len(self.base.text_tokenizer):  # a method renumbered the vocabulary (cluster)
            self.examples = classification_examples(source, self.train_data, self.c.max_length)
        merge_lora(source.model)
        sliced = prune(source, state.detach())
        self.masks = {name: mask.to(self.device) for name, mask in (masks or {}).items()}
        self._masked = [(sliced.model.get_parameter(name), mask) for name, mask in self.masks.items()]
        self.student = self._trainable(sliced)  # LoRA wraps the same weight tensors: the references hold
        self.apply_masks()
        info = pruning_info(self.student.model)
        self.ddp = self.dist.wrap(self._trained_module(), self.device,
                                  find_unused=bool(info is not None and info.plan.skipped_attention))
        self.fixed = state.detach()
        self.hooks = None
        self.optimizer = self._optimizer([])
        self.phase = "finetune"

    def one_shot(self) -> None:
        """A one-shot method's structure (and changed weights, masks), computed once on rank 0 (on the CPU
        copy) and sent to the others."""
        result = self.dist.broadcast(OneShotResult.of(self.method.prune()) if self.dist.main else None)
        self.rebuilt = result.source is not None
        self.setup_finetune(result.state, result.source, result.masks)

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero the masked weights again (after an optimizer step or a LoRA merge moved them)."""
        for weight, mask in self._masked:
            weight.mul_(mask.to(weight.dtype))

    # ------------------------------------------------------------------ one step

    def batch(self, step: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, float]:
        """This rank's shard of the global batch of `step` (on the device) and its loss weight
        world * shard / batch (1 in a single process). Epochs are reshuffled by (seed, epoch), so a
        resume sees the same batches. A rank whose shard is empty (a last batch smaller than the
        number of ranks) runs the batch's first example with weight 0."""
        def epoch_batches(epoch: int) -> list[np.ndarray]:
            rng = np.random.default_rng([self.c.seed, epoch])
            return list(sorted_batches(self.examples.enc, self.c.batch_size, rng))

        if self._epoch < 0:
            self._epoch, self._batches = 0, epoch_batches(0)
        epoch, index = divmod(step, len(self._batches))
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, epoch_batches(epoch)
        idx = self._batches[index]
        mine = idx[self.dist.shard(len(idx))]
        weight = self.dist.world * len(mine) / len(idx)
        mine = mine if len(mine) else idx[:1]
        batch, targets = self.examples.batch(mine)
        return {k: v.to(self.device) for k, v in batch.items()}, targets.to(self.device), weight

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

    def forward(self, module: torch.nn.Module, loaded: LoadedModel, batch: dict[str, torch.Tensor],
                hidden: bool = False):
        """`module` (the student's trained module, or the teacher's counterpart inside `loaded`) on
        `batch`. With `hidden` the outputs' hidden_states are the stream at every layer boundary, L + 1
        tensors (B, T, d): a decoder's are its residual stream (`pruning.distill.layer_outputs`)."""
        kwargs = {"use_cache": False} if self.examples.language_modelling else {}
        if not (hidden and loaded.is_decoder):
            return module(**batch, **({"output_hidden_states": True} if hidden else {}), **kwargs)
        with layer_outputs(loaded.adapter) as states:
            out = module(**batch, **kwargs)
        out.hidden_states = tuple(states)
        return out

    def _teacher_module(self) -> torch.nn.Module:
        return self.teacher.lm if self.examples.language_modelling else self.teacher.model

    def loss_terms(self, batch: dict[str, torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Forward passes of student (and teacher when needed) on `batch`; the named loss terms. `labels`:
        (B,) class ids, or (B, T) next-token targets (language modelling)."""
        if self.phase == "gates":
            state = self.method.train_state(self.step)
            self.hooks.update(state)
            self.method.batch_inputs = batch
            hidden = self.method.needs_hidden_states()
            with self.autocast():
                out = self.forward(self.ddp, self.student, batch, hidden)
                teacher_out = None
                if self.method.needs_teacher(self.distilling()):
                    with torch.no_grad():
                        teacher_out = self.forward(self._teacher_module(), self.teacher, batch, hidden)
            return self.method.loss(self.step, labels, out, teacher_out, state, batch["attention_mask"], self.task)
        with self.autocast():
            out = self.forward(self.ddp, self.student, batch)
            teacher_logits = None
            if self.distilling():
                with torch.no_grad():
                    teacher_logits = self.forward(self._teacher_module(), self.teacher, batch).logits
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
        elif self.phase == "finetune":
            self.apply_masks()
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
            "masks": {name: mask.bool().cpu() for name, mask in self.masks.items()}, "rebuilt": self.rebuilt,
            "low_rank": low_rank_names(self.student.model) if self.phase == "finetune" else {},
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
            elif payload.get("rebuilt"):  # the sliced model has the method's changed weights: ask it again
                result = OneShotResult.of(self.method.prune())
                self.rebuilt = True
                self.setup_finetune(result.state, result.source, result.masks)
            else:
                masks = {name: mask.float() for name, mask in payload.get("masks", {}).items()}
                self.setup_finetune(GateState.from_dict(payload["fixed_state"]), masks=masks)
                if payload.get("low_rank"):  # FLOP's thin matrices replace Linear modules: rebuilt, then loaded
                    rebuild_low_rank(self.student.model, payload["low_rank"])
                    self.student.model.to(self.device)
                    self.optimizer = self._optimizer([])
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
        """Adds the wall time of the block to `clock[key]` (seconds), pauses by the CPU queue left out."""
        start = self.active.now()
        try:
            yield
        finally:
            self.clock[key] += self.active.now() - start
