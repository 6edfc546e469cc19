"""The protocol every pruning method follows, and the registry the CLI, the Prune page and bench read.

A method is one class with a `name`, a one-line `summary`, an `Options` dataclass (its own settings,
each field with a default and a `help` text in its metadata) and one of two shapes:

- one-shot (`learned = False`): `prune()` returns the `GateState` to slice before the fine-tune, or a
  `OneShotResult`: that state, the model to slice it from when the method changed weights first (FLAP's
  bias compensation, ZipLM's OBS update, LaCo's merged layers) and weight masks that stay applied through
  the fine-tune and the export (Wanda's unstructured and 2:4 sparsity);
- learned (`learned = True`): during the gate phase the loop calls, every step,
  `train_state(step)` (the gate values the hooks apply), `loss(...)` (named loss terms), then after
  backward `shared_tensors()` (gradients averaged over ranks) and `step(step)` (its own optimizers);
  `gate_state(step)` is the deterministic structure at any time, `record(step)` its extra live
  figures (target, multipliers), `state_dict`/`load_state_dict` what a checkpoint carries;
  `finish_gates(step)` ends the gate phase (weight masks, folded modules) and `exported(snapshot)` is
  an eval snapshot as the method would export it. Parameters of the method's `modules()` that live
  inside the student (FLOP's gates) are stepped by its own optimizers, never by the model's.

The loop (`pruning.loop`) knows no method by name: it asks the method and the registry
(`pruning.methods.registry`). Register a method by decorating its class with `@register`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch

from core.adapter import GateShape
from core.data import TextDataset
from core.loaded import LoadedModel
from pruning.examples import Examples
from pruning.gate_state import GateState
from pruning.losses import TaskLoss
from pruning.options import check_fields
from pruning.size import SizeModel

Progress = Callable[[int, int, str], None]


@dataclass
class NoOptions:
    """A method without settings of its own."""


@dataclass
class MethodContext:
    """What a method may read: the model it prunes (`base`: unpruned, eval mode, on the CPU), the
    distillation teacher, the training split (`train`; `examples`: its token ids and targets, as the run
    trains on them, for calibration passes: `pruning.calibration`), the device the student trains on,
    the run's seed, a progress callback (`done, total, message`) and the gate phase's length in steps
    (`gate_steps`: the run's `steps` for a learned method, 0 for a one-shot one)."""

    base: LoadedModel
    teacher: LoadedModel
    train: TextDataset
    device: torch.device
    seed: int
    progress: Progress
    examples: Examples | None = None
    gate_steps: int = 0

    @property
    def shape(self) -> GateShape:
        return GateShape.of(self.base)

    @functools.cached_property
    def sizes(self) -> SizeModel:
        """CoFi's size model of `base` (an encoder's or a decoder's weight count)."""
        return SizeModel.of(self.base)


@dataclass
class OneShotResult:
    """What a one-shot method decided: the structure to slice, the model to slice it from (None: the
    run's base model; else a copy whose weights the method changed) and weight masks: parameter name of
    the sliced model -> 0/1 tensor of its shape, multiplied in after every optimizer step of the fine-tune
    (unstructured sparsity; a method that masks refuses `lora` in `check_config`: a merged LoRA delta
    would fill the zeros in)."""

    state: GateState
    source: LoadedModel | None = None
    masks: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def of(cls, result: GateState | OneShotResult) -> OneShotResult:
        return result if isinstance(result, OneShotResult) else cls(result)


class PruningMethod:
    """Base class of every method (see the module docstring). Subclasses set the class attributes and
    override what their shape needs; constructors only store `options` and `context`."""

    name: ClassVar[str]
    summary: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    learned: ClassVar[bool] = False
    order: ClassVar[int] = 100  # position in the method lists (CLI, Prune page, bench); ties by registration
    distills_always: ClassVar[bool] = False  # its final fine-tune distils whatever `distill` says (CoFi)
    frozen_backbone: ClassVar[bool] = False  # only the classification head trains, in both phases (SMP)
    batch_inputs: dict[str, torch.Tensor] | None = None  # the gate-phase batch `loss` is called on (set by the loop)

    def __init__(self, options, context: MethodContext):
        self.options = options
        self.context = context

    @classmethod
    def check_config(cls, options, config) -> None:
        """ValueError if `options` do not fit the run's `config` (a `pruning.config.TrainConfig`: steps,
        finetune_steps, ...)."""

    @classmethod
    def check_model(cls, options, loaded: LoadedModel) -> None:
        """ValueError, with the reason, if the method does not apply to `loaded` (the unpruned model: an
        encoder or a decoder, `loaded.is_decoder`)."""

    def check_teacher(self, teacher: LoadedModel) -> None:
        """ValueError if a separate `teacher` cannot serve this method (same labels and vocabulary are
        checked by the loop)."""

    def progress_note(self, step: int) -> str:
        """A few words for the progress line at `step` (e.g. the current target)."""
        return ""

    # ------------------------------------------------------------------ one-shot methods

    def prune(self) -> GateState | OneShotResult:
        """The structure to slice before the final fine-tune (one-shot methods), with the weights changed
        or masked first where the method does so (`OneShotResult`)."""
        raise NotImplementedError(f"{self.name} is a learned method: it has no one-shot prune().")

    # ------------------------------------------------------------------ learned methods

    def setup(self, student: LoadedModel) -> list[torch.nn.Parameter]:
        """Create the gates and their optimizers for `student` (trainable, on the device). Returns extra
        parameters to train with the model's optimizer (e.g. CoFi's layer matcher)."""
        return []

    def pruning(self, step: int) -> bool:
        """True at the steps where the gates learn (and the structure may differ from dense)."""
        return self.learned

    def train_state(self, step: int) -> GateState:
        """The gate values the hooks apply at `step` (a sample, or dense while not pruning)."""
        return GateState.dense(self.context.shape)

    def needs_hidden_states(self) -> bool:
        """Whether `loss` reads the hidden states of student and teacher (costs memory)."""
        return False

    def needs_teacher(self, distill: bool) -> bool:
        """Whether `loss` reads the teacher's outputs in the gate phase (`distill`: the run's setting)."""
        return distill

    def loss(self, step: int, labels: torch.Tensor, outputs, teacher_outputs, state: GateState,
             attention_mask: torch.Tensor, task: TaskLoss) -> dict[str, torch.Tensor]:
        """Named loss terms of one gate-phase step (summed by the loop): `outputs`/`teacher_outputs` of
        student and teacher (None when `needs_teacher` is False), the gate values `state` the hooks
        applied, the (B, T) mask; `task(logits, labels, teacher_logits)` is the run's CE (mixed with
        logit distillation when a teacher's logits are given)."""
        raise NotImplementedError

    def shared_tensors(self) -> list[torch.Tensor]:
        """Gradients that must be averaged over the ranks after backward (gates, multipliers)."""
        return [p.grad for m in self.modules() for p in m.parameters() if p.grad is not None]

    def step(self, step: int) -> None:
        """Step the method's own optimizers after the model's (only called while `pruning(step)`)."""

    def zero_grad(self) -> None:
        for opt in self.optimizers().values():
            opt.zero_grad(set_to_none=True)

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {}

    def modules(self) -> list[torch.nn.Module]:
        """The method's trainable modules (gates, controllers), checked for equality across ranks."""
        return []

    def gate_state(self, step: int) -> GateState:
        """The deterministic structure at `step` (dense before or without pruning)."""
        return GateState.dense(self.context.shape)

    def finish_gates(self, step: int) -> dict[str, torch.Tensor]:
        """The end of the gate phase, before the student is sliced: undo or fold in what the method changed on
        the student (SMP's parametrizations come off, FLOP's factorised layers become thin matrices) and return
        weight masks, parameter name of the student -> 0/1 tensor of its shape (gradual magnitude pruning,
        SMP; the structure is then dense, so the names hold in the sliced model), which the session applies
        through the fine-tune and the export as it does a `OneShotResult`'s."""
        return {}

    def exported(self, snapshot: LoadedModel) -> LoadedModel:
        """A gate-phase eval snapshot (a sliced copy of the student, changed in place if need be) as the method
        would export it now (FLOP compacts its factorised layers); the default is the snapshot itself."""
        return snapshot

    def expected_sparsity(self, step: int) -> float | None:
        """The gates' expected encoder sparsity (fraction), if the method has one."""
        return None

    def target(self, step: int) -> float | None:
        """The sparsity the method aims at, at `step` (None: no target)."""
        return None

    def record(self, step: int) -> dict[str, float | None]:
        """Extra live figures of an eval step (e.g. lambda_1, lambda_2)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint carries of the method: module and optimizer states (tensors, plain types)."""
        return {"modules": [m.state_dict() for m in self.modules()],
                "optimizers": {k: o.state_dict() for k, o in self.optimizers().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for module, saved in zip(self.modules(), state["modules"], strict=True):
            module.load_state_dict(saved)
        for name, opt in self.optimizers().items():
            opt.load_state_dict(state["optimizers"][name])


# ----------------------------------------------------------------------------- registry

REGISTERED: dict[str, type[PruningMethod]] = {}


def register(cls: type[PruningMethod]) -> type[PruningMethod]:
    """Class decorator: make `cls` available under `cls.name` (ValueError if the name is taken by another)."""
    taken = REGISTERED.get(cls.name)
    if taken is not None and taken.__qualname__ != cls.__qualname__:
        raise ValueError(f"A pruning method named {cls.name!r} is already registered ({taken.__qualname__}).")
    REGISTERED[cls.name] = cls
    return cls


def check_options(cls: type[PruningMethod], values: dict) -> Any:
    """`cls.Options(**values)` validated (`pruning.options.check_fields`); unknown names raise ValueError."""
    known = [f.name for f in fields(cls.Options)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"Method {cls.name} has no option(s) {', '.join(unknown)}; its options: "
                         f"{', '.join(known) or 'none'}.")
    options = cls.Options(**values)
    check_fields(options, f"method {cls.name}")
    return options
