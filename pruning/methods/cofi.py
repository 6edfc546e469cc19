"""CoFi (Xia et al. 2022): coarse- and fine-grained gates (attention and FFN sublayers, heads, FFN units,
hidden dims), distillation from the dense teacher and a Lagrangian to a ramped target sparsity.

    loss = alpha_ce T^2 KL(teacher || student) + alpha_layer L_layer + L_c
    L_c  = lambda_1 (s-hat - t) + lambda_2 (s-hat - t)^2      (lambdas by gradient ascent)

The target t is 0 for `prefinetune_steps` (a plain distillation fine-tune), then rises linearly to
`target_sparsity` over `warmup_steps` and holds. L_layer matches each teacher layer to the closest
surviving student layer through one learned d x d map (`pruning.distill.LayerMatcher`; a decoder's
residual stream is compared per token after RMS normalisation). After the gate phase the
deterministic structure is sliced and fine-tuned with distillation. With `contrastive` CAP's terms
(`pruning.contrastive`) join the gate phase's loss. The task's logits are a
classifier's (B, C) or a causal LM's (B, T, V) (`pruning.losses`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.adapter import GateShape
from core.loaded import LoadedModel
from pruning.contrastive import ContrastiveOptions, ContrastiveTerms
from pruning.distill import LayerMatcher
from pruning.gates import CoFiGates
from pruning.lagrangian import LagrangianController, LagrangianFigures, TargetSchedule
from pruning.methods.base import register
from pruning.methods.gated import GatedMethod
from pruning.options import option
from pruning.size import expected_sparsity


@dataclass
class CoFiOptions(ContrastiveOptions):
    target_sparsity: float = option(0.6, "fraction of the layers' weights to remove", low=0.0, high=1.0,
                                    open_high=True)
    prefinetune_steps: int = option(20, "plain fine-tune steps before pruning starts (CoFi: 100)", low=0)
    warmup_steps: int = option(200, "steps over which the target rises linearly from 0 to target_sparsity",
                               low=0)
    gate_lr: float = option(0.1, "Adam learning rate of the gates' log_alpha (CoFi: 0.01 over far more steps)",
                            low=0.0, open_low=True)
    lambda_lr: float = option(0.1, "learning rate of the gradient ascent on lambda_1, lambda_2", low=0.0,
                              open_low=True)
    alpha_layer: float = option(0.5, "weight of layer matching (CoFi: 0.9, 0.7 or 0.5)", low=0.0, high=1.0)


@register
class CoFi(LagrangianFigures, GatedMethod):
    name = "cofi"
    order = 0
    summary = "CoFi (Xia et al. 2022): gates on sublayers, heads, FFN units and hidden dims, to a target sparsity"
    Options = CoFiOptions
    distills_always = True

    @property
    def schedule(self) -> TargetSchedule:
        o = self.options
        return TargetSchedule(o.target_sparsity, start=o.prefinetune_steps, warmup=o.warmup_steps)

    @classmethod
    def check_config(cls, options, config) -> None:
        """The target must reach its final value within the gate phase."""
        if options.prefinetune_steps + options.warmup_steps > config.steps:
            raise ValueError(f"prefinetune_steps + warmup_steps ({options.prefinetune_steps} + "
                             f"{options.warmup_steps}) must not exceed steps ({config.steps}): the target must "
                             "reach its final value.")
        if options.contrastive and config.data_spec.is_text:
            raise ValueError("CAP's supervised terms need labelled examples; run cofi without --contrastive on "
                             "language-modelling text.")

    def check_teacher(self, teacher: LoadedModel) -> None:
        """Layer matching needs a teacher with the model's layer count and hidden size."""
        ours, theirs = self.context.shape, GateShape.of(teacher)
        if (theirs.layers, theirs.hidden) != (ours.layers, ours.hidden):
            raise ValueError(f"CoFi's layer matching needs a teacher with the model's {ours.layers} layers "
                             f"and hidden size {ours.hidden}; the teacher has {theirs.layers} and {theirs.hidden}.")

    def make_gates(self, student: LoadedModel) -> CoFiGates:
        return CoFiGates(student)

    def setup(self, student: LoadedModel) -> list[torch.nn.Parameter]:
        super().setup(student)
        device = self.context.device
        self.controller = LagrangianController().to(device)
        self.matcher = LayerMatcher(self.context.shape.hidden, normalise=student.is_decoder).to(device)
        self._optimizers["lambdas"] = self.controller.optimizer(self.options.lambda_lr)
        self.cap = ContrastiveTerms(self.options, student.is_decoder, device) if self.options.contrastive else None
        return list(self.matcher.parameters())

    def modules(self) -> list[torch.nn.Module]:
        return [self.gates, self.controller, self.matcher]

    def pruning(self, step: int) -> bool:
        return self.schedule.pruning(step)

    def needs_hidden_states(self) -> bool:
        return self.options.alpha_layer > 0 or self.options.contrastive

    def needs_teacher(self, distill: bool) -> bool:
        return True

    def loss(self, step, labels, outputs, teacher_outputs, state, attention_mask, task):
        """T^2 KL to the teacher's logits, layer matching, CAP's terms and (while pruning) the Lagrangian."""
        terms = {"distill_ce": task.distill_ce(outputs.logits, teacher_outputs.logits, labels)}
        if self.options.alpha_layer > 0:
            layer, _ = self.matcher([h.float() for h in outputs.hidden_states[1:]],
                                    [h.float() for h in teacher_outputs.hidden_states[1:]],
                                    alive=state.mha.detach() > 0, mask=attention_mask)
            terms["distill_layer"] = self.options.alpha_layer * layer
        if self.cap is not None:
            terms.update(self.cap(outputs, teacher_outputs, labels, attention_mask, self.batch_inputs))
        if self.pruning(step):
            terms["lagrangian"] = self.controller(expected_sparsity(self.gates, model=self.context.sizes),
                                                  self.schedule.at(step))
        return terms

    def progress_note(self, step: int) -> str:
        return f"target {self.schedule.at(step):.2f}" if self.pruning(step) else ""
