"""SMP (Jiang et al., ACL 2023, "Pruning Pre-trained Language Models Without Fine-Tuning";
github.com/kongds/SMP): the weights stay frozen; only a score per weight (and the classifier) learn.

    W' = M (.) W,   M = TopK(S)   (the k highest scores of each matrix kept),
    dL/dS = dL/dW' (.) W          (straight-through: S receives the gradient M would)

over every Linear of every layer (Q, K, V, attention output, FFN in, FFN out); scores start at 0 and
learn by Adam at `mask_lr` (paper: 2e-2) with an L1 term `l1` * mean|S|; the kept fraction falls from 1
to 1 - target_sparsity on the cubic schedule (`pruning.schedule`; cubic as in the authors' `schedule_threshold`),
every `interval` steps. Simplified: one kept share for every matrix (SMP-S allocates it per layer by the scores'
mean sigmoid), and the authors train the scores for 12 epochs from the pre-trained model and classify through the
MLM head's label words: at HeadLab's budgets of a few hundred steps the model falls to the majority class
(measured in the README: after 120 steps its masks overlap the magnitude mask only as a random mask does and
score like one). Both phases train only the classification head: the fine-tune
after the gate phase keeps the backbone frozen and the masks applied. The masks are unstructured: the model keeps
its dense shape and its dense CPU speed (the run record states the size in a sparse format). Encoders only (a
prompted decoder has no classification head of its own to train).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.utils import parametrize

from core.loaded import LoadedModel
from pruning.methods.base import PruningMethod, register
from pruning.methods.wanda import layer_linears, refuse_lora
from pruning.options import option
from pruning.schedule import CubicSchedule


def top_mask(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """0/1 mask of `scores`' shape keeping its `keep` largest entries (ties: lower index first)."""
    flat = scores.detach().reshape(-1)
    mask = torch.zeros_like(flat)
    mask[torch.sort(-flat, stable=True).indices[:keep]] = 1.0
    return mask.reshape(scores.shape)


class TopKMasked(torch.nn.Module):
    """A parametrization W -> M (.) W with M the top `keep()` scores and a straight-through gradient to the
    scores. `scores` is held as a plain attribute: it belongs to the method, not to the model's optimizer."""

    def __init__(self, scores: torch.Tensor, keep):
        super().__init__()
        self.scores, self.keep = scores, keep

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        s = self.scores
        mask = top_mask(s, self.keep(s.numel()))
        return weight * (mask + s - s.detach())


@dataclass
class SMPOptions:
    target_sparsity: float = option(0.6, "fraction of the layers' weights masked at the end (per Linear)", low=0.0,
                                    high=1.0, open_low=True, open_high=True)
    mask_lr: float = option(2e-2, "Adam learning rate of the scores (paper: 2e-2)", low=0.0, open_low=True)
    l1: float = option(0.0, "weight of the L1 term mean |S| on the scores", low=0.0)
    start_step: int = option(0, "t0: the step where the kept fraction starts to fall", low=0)
    interval: int = option(10, "steps between updates of the kept fraction", low=1)
    updates: int = option(0, "updates of the kept fraction (0: as many as fit before the gate phase ends)", low=0)


@register
class SMP(PruningMethod):
    name = "smp"
    order = 7
    summary = "SMP (Jiang et al. 2023): frozen weights, learned per-weight mask scores (TopK, straight-through)"
    Options = SMPOptions
    learned = True
    frozen_backbone = True

    @classmethod
    def check_config(cls, options, config) -> None:
        o = options
        CubicSchedule.fitted(o.target_sparsity, 0.0, o.start_step, o.interval, o.updates, config.steps)
        refuse_lora(cls.name, config)

    @classmethod
    def check_model(cls, options, loaded: LoadedModel) -> None:
        if loaded.is_decoder:
            raise ValueError("smp learns masks over a frozen backbone with a trained classification head (Jiang "
                             "et al.: BERT on GLUE); a prompted decoder has no head of its own: use wanda or "
                             "gradual.")

    def setup(self, student: LoadedModel) -> list[torch.nn.Parameter]:
        o, c = self.options, self.context
        self.schedule = CubicSchedule.fitted(o.target_sparsity, 0.0, o.start_step, o.interval, o.updates,
                                             c.gate_steps)
        self.sparsity = 0.0
        self.linears = {name: m for layer in range(c.shape.layers) for name, m in layer_linears(student, layer).items()}
        self.scores = torch.nn.ParameterDict({
            name.replace(".", "/"): torch.nn.Parameter(torch.zeros_like(m.weight)) for name, m in self.linears.items()})
        for name, module in self.linears.items():
            module.weight.requires_grad_(False)
            parametrize.register_parametrization(module, "weight", TopKMasked(self.scores[name.replace(".", "/")],
                                                                              self.keep))
        self._optimizers = {"scores": torch.optim.Adam(self.scores.parameters(), lr=o.mask_lr)}
        return []

    def keep(self, numel: int) -> int:
        """Weights a matrix of `numel` keeps at the current sparsity."""
        return max(1, numel - int(round(self.sparsity * numel)))

    def step(self, step: int) -> None:
        self._optimizers["scores"].step()
        if self.schedule.updates_at(step):
            self.sparsity = self.schedule.at(step)

    def loss(self, step, labels, outputs, teacher_outputs, state, attention_mask, task):
        teacher_logits = teacher_outputs.logits if teacher_outputs is not None else None
        terms = task(outputs.logits, labels, teacher_logits)
        if self.options.l1 > 0:
            terms["l1"] = self.options.l1 * torch.stack([s.abs().mean() for s in self.scores.values()]).mean()
        return terms

    def finish_gates(self, step: int) -> dict[str, torch.Tensor]:
        """The final masks; the parametrizations come off (the frozen weights return unmasked: the session
        applies the masks to the sliced model)."""
        self.sparsity = self.schedule.final
        masks = {name: top_mask(self.scores[name.replace(".", "/")], self.keep(m.weight.numel())).cpu()
                 for name, m in self.linears.items()}
        for module in self.linears.values():
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        return masks

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return self._optimizers

    def modules(self) -> list[torch.nn.Module]:
        return [self.scores]

    def target(self, step: int) -> float | None:
        return self.schedule.at(step)

    def expected_sparsity(self, step: int) -> float | None:
        return self.sparsity

    def progress_note(self, step: int) -> str:
        return f"sparsity {self.sparsity:.2f} of {self.options.target_sparsity:.2f}"

    def state_dict(self) -> dict:
        return {**super().state_dict(), "sparsity": self.sparsity}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.sparsity = float(state["sparsity"])
