"""Distillation losses of CoFi (Xia et al. 2022): logit KL at temperature T and layer matching.

    L_distill = alpha_layer * L_layer + alpha_ce * T^2 * KL(p_t^T || p_s^T)

    L_layer = sum over teacher layers i of MSE(W H_s^{m(i)}, H_t^i)

H are hidden states (B, T, d) after each layer, W a d x d linear map initialised to the identity
(`LayerMatcher`, trained with the model), and m(i) the student layer closest (smallest MSE) to
teacher layer i among the surviving ones, chosen every step under a monotone constraint
(`align_layers`: later teacher layers map to strictly later student layers), as in CoFi's
`layer_distill_version` 4.

Decoders: H is the residual stream after each decoder layer (`layer_outputs` captures it; the
transformers `hidden_states[-1]` of a causal LM is after the final norm instead), and each token's
state is divided by its root mean square before the MSE (`LayerMatcher(normalise=True)`). A pre-norm
stream is not normalised between layers: its scale grows with depth and a few "massive
activations" dwarf the rest (SmolLM2-135M: per-layer RMS 2 to 120, single values up to 2.5e4 on a
few tokens), so a raw MSE would match little but those; every layer reads the stream through an
RMSNorm, i.e. by its direction per token, which is what the normalised MSE compares.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn


def logit_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """T^2 * KL(p_t^T || p_s^T), averaged over the batch (a scalar tensor).

    `student`, `teacher`: logits (B, classes); p^T = softmax(logits / T). The T^2 factor keeps the
    gradient scale independent of T (Hinton et al. 2015). No gradient flows into `teacher`.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"Student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ.")
    if not temperature > 0:
        raise ValueError(f"The 'temperature' parameter of logit_kl() must be > 0. Got {temperature!r} instead.")
    log_s = F.log_softmax(student / temperature, dim=-1)
    log_t = F.log_softmax(teacher.detach() / temperature, dim=-1)
    return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * temperature**2


def teacher_layers(layers: int) -> list[int]:
    """The teacher layers (0-based) to match: every max(1, round(L / 4))-th layer, ending at the last one
    (CoFi's [2, 5, 8, 11] for 12 layers, [1, 3, 5] for 6, every layer for L <= 4)."""
    step = max(1, round(layers / 4))
    return list(range(layers - 1, -1, -step))[::-1]


def masked_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error over the real tokens: `a`, `b` (B, T, d), `mask` (B, T) 1 for real tokens
    (None: all). Mean over masked tokens and the d dims (scalar tensor)."""
    sq = (a - b).pow(2)  # (B, T, d)
    if mask is None:
        return sq.mean()
    m = mask.to(sq.dtype)[..., None]  # (B, T, 1)
    return (sq * m).sum() / (m.sum() * sq.shape[-1]).clamp_min(1.0)


def align_layers(losses: torch.Tensor, alive: torch.Tensor | None = None) -> list[int | None]:
    """m(i) for each teacher layer (rows of `losses`): the student layer with the smallest loss,
    monotone, chosen from the last teacher layer backwards (CoFi).

    `losses`: (n_teacher, L_student) MSE of every pair; `alive`: (L_student,) bool, student layers
    that still exist (None: all). Teacher row r may only take a surviving layer strictly below the one
    row r+1 took; if none is left, any surviving layer not above it (so several teacher layers may share
    one); None if no student layer survives at all.
    """
    n_teacher, n_student = losses.shape
    alive = torch.ones(n_student, dtype=torch.bool) if alive is None else alive.to(torch.bool).cpu()
    order = torch.argsort(losses.detach().cpu(), dim=1, stable=True)  # (n_teacher, L_s) best first
    alignment: list[int | None] = [None] * n_teacher
    last = n_student
    for row in range(n_teacher - 1, -1, -1):
        candidates = order[row]
        pick = candidates[(candidates < last) & alive[candidates]]
        if pick.numel() == 0:
            pick = candidates[(candidates <= last) & alive[candidates]] if last < n_student else pick
        if pick.numel() == 0:
            continue
        alignment[row] = int(pick[0])
        last = alignment[row]
    return alignment


def rms_normalised(h: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each token's state divided by its root mean square: (B, T, d) -> (B, T, d)."""
    return h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + eps)


@contextlib.contextmanager
def layer_outputs(adapter) -> Iterator[list[torch.Tensor]]:
    """The residual stream of the forward pass run inside the block, by forward hooks on the layers of
    `adapter` (a `core.adapter.Adapter`): the list gets the input of layer 0, then each layer's output,
    L + 1 tensors (B, T, d) in all, as `hidden_states` of a transformers model (but before any final
    norm). The hooks are removed on exit."""
    states: list[torch.Tensor] = []

    def first(module, args, kwargs):
        states.append(args[0] if args else kwargs["hidden_states"])

    def output(module, args, out):
        states.append(out[0] if isinstance(out, tuple) else out)

    layers = adapter.layers
    handles = [layers[0].register_forward_pre_hook(first, with_kwargs=True),
               *(layer.register_forward_hook(output) for layer in layers)]
    try:
        yield states
    finally:
        for handle in handles:
            handle.remove()


class LayerMatcher(nn.Module):
    """W (d x d, identity at init, with bias 0) and the layer-matching loss L_layer.

    Args:
        hidden: d, the hidden size of student and teacher.
        layers: teacher layers to match (0-based; default `teacher_layers(L)` once known).
        normalise: compare each token's states divided by their RMS (decoders, see the module docstring).
    """

    def __init__(self, hidden: int, layers: list[int] | None = None, *, normalise: bool = False):
        super().__init__()
        self.layers = layers
        self.normalise = normalise
        self.transform = nn.Linear(hidden, hidden)
        with torch.no_grad():
            self.transform.weight.copy_(torch.eye(hidden))
            self.transform.bias.zero_()

    def forward(self, student: list[torch.Tensor] | tuple[torch.Tensor, ...],
                teacher: list[torch.Tensor] | tuple[torch.Tensor, ...], *, alive: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, list[int | None]]:
        """L_layer and the alignment m(i).

        `student`, `teacher`: hidden states after each layer, L tensors (B, T, d) each (e.g.
        `outputs.hidden_states[1:]`); `alive` (L,) bool: student layers still present (e.g. mha gate
        > 0); `mask` (B, T) attention mask. Returns (scalar loss, one student layer index per matched
        teacher layer, None where nothing survives).
        """
        if len(student) != len(teacher):
            raise ValueError(f"Student and teacher have {len(student)} and {len(teacher)} layers; they must match.")
        layers = self.layers if self.layers is not None else teacher_layers(len(teacher))
        mapped = [self.transform(h) for h in student]  # L x (B, T, d)
        targets = {i: teacher[i].detach() for i in layers}
        if self.normalise:
            mapped = [rms_normalised(h) for h in mapped]
            targets = {i: rms_normalised(h) for i, h in targets.items()}
        losses = torch.stack([torch.stack([masked_mse(s, targets[i], mask) for s in mapped])
                              for i in layers])  # (n_teacher, L_s)
        alignment = align_layers(losses, alive)
        terms = [losses[row, col] for row, col in enumerate(alignment) if col is not None]
        total = torch.stack(terms).sum() if terms else losses.sum() * 0.0
        return total, alignment
