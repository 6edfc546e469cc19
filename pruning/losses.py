"""The loss of the task, with or without logit distillation: the part every method's fine-tune shares.

    task        CE(student logits, labels), times (1 - alpha_ce) when distilling
    distill_ce  alpha_ce T^2 KL(softmax(teacher / T) || softmax(student / T))   (`pruning.distill.logit_kl`)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pruning.distill import logit_kl


@dataclass(frozen=True)
class TaskLoss:
    """CE mixed (1 - alpha_ce) : alpha_ce with distillation at temperature T (fractions, T > 0)."""

    alpha_ce: float
    temperature: float

    def distill_ce(self, logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """alpha_ce T^2 KL of (B, C) logits to the teacher's (B, C), a scalar."""
        return self.alpha_ce * logit_kl(logits.float(), teacher_logits.float(), self.temperature)

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor,
                 teacher_logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Named terms for (B, C) logits and (B,) class ids; CE alone without `teacher_logits`."""
        ce = F.cross_entropy(logits.float(), labels)
        if teacher_logits is None:
            return {"task": ce}
        return {"task": (1 - self.alpha_ce) * ce, "distill_ce": self.distill_ce(logits, teacher_logits)}
