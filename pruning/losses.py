"""The loss of the task, with or without logit distillation: the part every method's fine-tune shares.

    task        CE(student logits, targets), times (1 - alpha_ce) when distilling
    distill_ce  alpha_ce T^2 KL(softmax(teacher / T) || softmax(student / T))   (`pruning.distill.logit_kl`)

Two kinds of task, told apart by the logits' shape:

- classification (an encoder's head, or a decoder's prompt read by `core.prompting.PromptClassifier`):
  logits (B, C), targets (B,) class ids; the KL is over the C classes, averaged over the batch;
- language modelling (a causal LM on plain text): logits (B, T, V) of every position, targets (B, T)
  the next token of each position (`next_token_targets`: the causal shift, IGNORE where the next
  position is padding or past the end); CE and KL (over the vocabulary) are averaged over the
  scored positions only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pruning.distill import logit_kl

IGNORE = -100  # a next-token target that is not scored (padding, the last position)


def next_token_targets(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) targets of a causal LM: position t predicts token t + 1, IGNORE where that token is padding
    (mask 0) or beyond the row. `input_ids`, `attention_mask` (B, T); any padding side."""
    targets = torch.full_like(input_ids, IGNORE)
    scored = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    targets[:, :-1] = torch.where(scored, input_ids[:, 1:], torch.full_like(input_ids[:, 1:], IGNORE))
    return targets


@dataclass(frozen=True)
class TaskLoss:
    """CE mixed (1 - alpha_ce) : alpha_ce with distillation at temperature T (fractions, T > 0)."""

    alpha_ce: float
    temperature: float

    def distill_ce(self, logits: torch.Tensor, teacher_logits: torch.Tensor,
                   targets: torch.Tensor | None = None) -> torch.Tensor:
        """alpha_ce T^2 KL of the student's logits to the teacher's, a scalar: (B, C) logits averaged over
        the batch, or (B, T, V) logits averaged over the positions whose (B, T) `targets` are scored."""
        if logits.dim() == 3:
            scored = _scored(logits, targets)
            logits, teacher_logits = logits[scored], teacher_logits[scored]  # (N, V) each
        return self.alpha_ce * logit_kl(logits.float(), teacher_logits.float(), self.temperature)

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor,
                 teacher_logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Named terms for (B, C) logits and (B,) class ids, or (B, T, V) logits and (B, T) next-token
        targets; CE alone without `teacher_logits`."""
        if logits.dim() == 3:
            _scored(logits, targets)
            ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)
        else:
            ce = F.cross_entropy(logits.float(), targets)
        if teacher_logits is None:
            return {"task": ce}
        return {"task": (1 - self.alpha_ce) * ce, "distill_ce": self.distill_ce(logits, teacher_logits, targets)}


def _scored(logits: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
    """The (B, T) bool mask of scored positions; ValueError if `targets` do not fit (B, T, V) `logits` or
    score nothing."""
    if targets is None or targets.shape != logits.shape[:2]:
        shape = None if targets is None else tuple(targets.shape)
        raise ValueError(f"Language-model logits {tuple(logits.shape)} need (B, T) next-token targets; got {shape}.")
    scored = targets != IGNORE
    if not bool(scored.any()):
        raise ValueError("No position has a next token to predict (every example is one token long).")
    return scored
