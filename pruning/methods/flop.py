"""FLOP (Wang, Wohlwend, Lei, EMNLP 2020; github.com/asappresearch/flop): factorised low-rank pruning.

Every Linear of the layers (Q, K, V, attention output, FFN in and gate, FFN out) becomes W = P diag(z) Q from
its SVD (`pruning.factorised`), hard-concrete gates z on the rank-1 components train with the model under

    loss = task (+ logit distillation when the run distils) + lambda_1 (s-hat - t) + lambda_2 (s-hat - t)^2,
    s-hat = 1 - sum E[#open] (in + out) / sum in * out        (the factorised matrices' expected sparsity)

with the target t ramped linearly from 0 to `target_sparsity` over `warmup_steps` and the multipliers by
gradient ascent (`pruning.lagrangian`). At the end of the gate phase the gates are folded in and each matrix
keeps its open components as two thin matrices (`core.lowrank.LowRankLinear`) where k (in + out) < in * out,
else their dense product; the fine-tune trains the thin matrices and the export stores them (the live and
final speedups are those of the thin model). Simplified: the factorisation starts at full rank (exact)
rather than FLOP's r = in * out / (in + out); the gates start open (HeadLab's gate init, not N(0, 0.01)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.loaded import LoadedModel
from pruning.factorised import FactorisedLinear, compact, expected_sparsity, factorise, layer_linears
from pruning.lagrangian import LagrangianController, LagrangianFigures, TargetSchedule
from pruning.methods.base import PruningMethod, register
from pruning.methods.wanda import refuse_lora
from pruning.options import option


@dataclass
class FlopOptions:
    target_sparsity: float = option(0.5, "fraction of the factorised matrices' weights to remove (FLOP's s-hat)",
                                    low=0.0, high=1.0, open_low=True, open_high=True)
    warmup_steps: int = option(200, "steps over which the target rises linearly from 0", low=0)
    rank: int = option(0, "components per matrix (0: min(in, out), the exact factorisation)", low=0)
    gate_lr: float = option(0.1, "Adam learning rate of the components' gates", low=0.0, open_low=True)
    lambda_lr: float = option(0.1, "learning rate of the gradient ascent on lambda_1, lambda_2", low=0.0,
                              open_low=True)


@register
class Flop(LagrangianFigures, PruningMethod):
    name = "flop"
    order = 8
    summary = "FLOP (Wang et al. 2020): SVD-factorised layers, gates on rank-1 components, exported as thin matrices"
    Options = FlopOptions
    learned = True

    @property
    def schedule(self) -> TargetSchedule:
        return TargetSchedule(self.options.target_sparsity, warmup=self.options.warmup_steps)

    @classmethod
    def check_config(cls, options, config) -> None:
        if options.warmup_steps > config.steps:
            raise ValueError(f"warmup_steps ({options.warmup_steps}) must not exceed steps ({config.steps}): the "
                             "target must reach its final value.")
        if config.lora:
            refuse_lora(cls.name, config)

    def setup(self, student: LoadedModel) -> list[torch.nn.Parameter]:
        device = self.context.device
        self.model = student.model
        self.layers = factorise(student.model, layer_linears(student), self.options.rank or None)
        student.model.to(device)
        self.gates = torch.nn.ModuleList([m.gates for m in self.layers.values()])
        self.controller = LagrangianController().to(device)
        self._optimizers = {"gates": torch.optim.Adam(self.gates.parameters(), lr=self.options.gate_lr),
                            "lambdas": self.controller.optimizer(self.options.lambda_lr)}
        return []

    def loss(self, step, labels, outputs, teacher_outputs, state, attention_mask, task):
        teacher_logits = teacher_outputs.logits if teacher_outputs is not None else None
        return {**task(outputs.logits, labels, teacher_logits),
                "lagrangian": self.controller(expected_sparsity(self.layers), self.schedule.at(step))}

    def step(self, step: int) -> None:
        for opt in self._optimizers.values():
            opt.step()
        for gates in self.gates:
            gates.clamp_()

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return self._optimizers

    def modules(self) -> list[torch.nn.Module]:
        return [self.gates, self.controller]

    def exported(self, snapshot: LoadedModel) -> LoadedModel:
        """The eval snapshot (a copy of the student) with its factorised layers compacted, as exported now."""
        compact(snapshot.model, {n: m for n, m in snapshot.model.named_modules() if isinstance(m, FactorisedLinear)})
        return snapshot

    def finish_gates(self, step: int) -> dict[str, torch.Tensor]:
        """Fold the gates in: the student's factorised layers become thin matrices (or dense) in place."""
        compact(self.model, self.layers)
        return {}

    def expected_sparsity(self, step: int) -> float | None:
        return float(expected_sparsity(self.layers).detach())

    def progress_note(self, step: int) -> str:
        return f"target {self.schedule.at(step):.2f}"
