"""Voita et al. (2019): one hard-concrete gate per head, trained with the task loss and an L0 penalty.

    loss = CE (mixed with logit distillation when `distill`) + lambda sum_h P(z_h != 0)

Gates use beta = 0.33 and Voita's eval rule (a head is open if its expected gate exceeds 0.5). After
the gate phase the closed heads are removed and the smaller model is fine-tuned.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.loaded import LoadedModel
from pruning.gates import CoFiGates, L0HeadGates
from pruning.methods.base import register
from pruning.methods.gated import GatedMethod
from pruning.options import option


@dataclass
class L0Options:
    l0_lambda: float = option(0.02, "weight of sum_h P(head open) in the loss (larger closes more heads)", low=0.0)
    gate_lr: float = option(0.1, "Adam learning rate of the gates' log_alpha", low=0.0, open_low=True)


@register
class L0Heads(GatedMethod):
    name = "l0"
    order = 1
    summary = "Voita et al. 2019: L0 head gates, loss = task + lambda * expected open heads"
    Options = L0Options

    def make_gates(self, student: LoadedModel) -> CoFiGates:
        return L0HeadGates(student)

    def loss(self, step, labels, outputs, teacher_outputs, state, attention_mask, task):
        teacher_logits = teacher_outputs.logits if teacher_outputs is not None else None
        return {**task(outputs.logits, labels, teacher_logits), "l0": self.options.l0_lambda * self.gates.penalty()}
