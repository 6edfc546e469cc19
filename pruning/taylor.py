"""LLM-Pruner's Taylor importance of coupled structures (Ma, Fang, Wang, NeurIPS 2023; horseee/LLM-Pruner).

A coupled group is everything that must go together when one unit goes. Per layer:

    attention unit   a head: its Q/K/V rows (and biases) and its W_O columns. Under GQA the unit is a KV
                     group (its K/V rows with every query head that reads them: their Q rows and W_O
                     columns), as the authors' llama3.py, rooted at k_proj, prunes it.
    MLP channel      its SwiGLU gate and up rows (an encoder's FFN-in row and bias) and its down-projection
                     (FFN-out) column.

A group's members are those slices, in execution order (Q, K, V, W_O; gate, up, down). With g the
gradient of the task loss on the calibration examples and W a member's elements:

    element-wise  I(W_i) = sum_k |g_k W_k - 1/2 H_kk W_k^2|,  H_kk = (1/N) sum_n g_{n,k}^2 (the Fisher diagonal
                  from one backward pass per example; the Hessian term only with `second_order`, the code's
                  param_mix; its default param_first leaves it out)
    vector-wise   I(W_i) = |sum_k g_k W_k|   (the paper drops the Hessian term here)

and a group's importance aggregates its members: sum (the default), prod, max, or last (the last member
executed: the W_O columns, the down-projection column). The authors' code reduces per head_dim channel
and then sums a head's channels; here each member is the whole slice, as the paper's formulas read
(the same for sum).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from core.adapter import GateShape
from core.loaded import LoadedModel
from pruning.calibration import Batch, run
from pruning.examples import Examples
from pruning.losses import TaskLoss

IMPORTANCES = ("element", "vector")
AGGREGATIONS = ("sum", "prod", "max", "last")
KINDS = ("attention", "mlp")


@dataclass
class Member:
    """One coupled slice of a group: the parameters it cuts (a weight and maybe its bias) and, for each,
    the axis along which the units lie (0: rows, 1: columns)."""

    name: str
    parts: list[tuple[nn.Parameter, int]]


def members(loaded: LoadedModel, layer: int, kind: str) -> list[Member]:
    """The members of layer `layer`'s groups of `kind` ("attention" or "mlp"), in execution order."""
    a = loaded.adapter

    def rows(name: str, module: nn.Linear) -> Member:
        parts = [(module.weight, 0)] + ([(module.bias, 0)] if module.bias is not None else [])
        return Member(name, parts)

    if kind == "attention":
        return [rows("query", a.query(layer)), rows("key", a.key(layer)), rows("value", a.value(layer)),
                Member("attention_output", [(a.attention_output(layer).weight, 1)])]
    if kind == "mlp":
        gate = a.ffn_gate(layer)
        return [*([rows("ffn_gate", gate)] if gate is not None else []), rows("ffn_in", a.ffn_in(layer)),
                Member("ffn_out", [(a.ffn_out(layer).weight, 1)])]
    raise ValueError(f"The 'kind' parameter of members() must be one of {', '.join(KINDS)}. Got {kind!r} instead.")


def units(loaded: LoadedModel, kind: str) -> int:
    """Groups of `kind` per layer: KV groups (heads without GQA) or FFN channels."""
    shape = GateShape.of(loaded)
    return shape.kv_heads if kind == "attention" else shape.intermediate


def _loss(loaded: LoadedModel, examples: Examples, batch: Batch) -> torch.Tensor:
    """The task loss on `batch`: next-token CE (documents) or classification CE (labelled rows)."""
    return TaskLoss(0.0, 1.0)(run(loaded, examples, batch).logits, batch[1])["task"]


@dataclass
class Gradients:
    """Gradient of the mean calibration loss per parameter and, for the second-order term, the Fisher
    diagonal (1/N) sum_n g_n^2 from one backward pass per example (None without it)."""

    grad: dict[nn.Parameter, torch.Tensor]
    fisher: dict[nn.Parameter, torch.Tensor] | None


def gradients(loaded: LoadedModel, examples: Examples, calibration: Sequence[Batch],
              params: Sequence[nn.Parameter], second_order: bool = False) -> Gradients:
    """Gradients of the task loss of `loaded` (eval mode: no dropout) w.r.t. `params`: each batch's mean
    loss weighted by its share of the examples (one batch: the authors' single backward pass). The
    model's weights and `requires_grad` flags are left as they were; no `.grad` is written."""
    params = list(params)
    flags = [p.requires_grad for p in params]
    total = sum(int(b[0]["input_ids"].shape[0]) for b in calibration)
    try:
        for p in params:
            p.requires_grad_(True)
        grad = {p: torch.zeros_like(p, dtype=torch.float32) for p in params}
        for batch in calibration:
            share = batch[0]["input_ids"].shape[0] / total
            for p, g in zip(params, torch.autograd.grad(_loss(loaded, examples, batch), params, allow_unused=True)):
                if g is not None:
                    grad[p] += share * g.float()
        fisher = None
        if second_order:
            fisher = {p: torch.zeros_like(p, dtype=torch.float32) for p in params}
            for inputs, targets in calibration:
                for i in range(inputs["input_ids"].shape[0]):
                    one = ({k: v[i:i + 1] for k, v in inputs.items()}, targets[i:i + 1])
                    for p, g in zip(params, torch.autograd.grad(_loss(loaded, examples, one), params,
                                                                allow_unused=True)):
                        if g is not None:
                            fisher[p] += g.float() ** 2 / total
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    return Gradients(grad, fisher)


def element_scores(param: nn.Parameter, grads: Gradients) -> torch.Tensor:
    """g W, minus 1/2 H_kk W^2 with the Fisher diagonal when there is one (the shape of `param`)."""
    w = param.detach().float()
    score = grads.grad[param] * w
    if grads.fisher is not None:
        score = score - 0.5 * grads.fisher[param] * w * w
    return score


def member_importance(member: Member, count: int, grads: Gradients, importance: str) -> torch.Tensor:
    """(count,) importance of each unit's slice of `member` (element- or vector-wise)."""
    if importance not in IMPORTANCES:
        raise ValueError(f"The 'importance' parameter must be one of {', '.join(IMPORTANCES)}. "
                         f"Got {importance!r} instead.")
    total = torch.zeros(count)
    for param, axis in member.parts:
        per_unit = element_scores(param, grads).movedim(axis, 0).reshape(count, -1)  # (units, elements)
        total += per_unit.abs().sum(1) if importance == "element" else per_unit.sum(1)
    return total if importance == "element" else total.abs()


def aggregate(per_member: torch.Tensor, how: str) -> torch.Tensor:
    """A group's importance from its members' (M, units) importances, members in execution order."""
    if how == "sum":
        return per_member.sum(0)
    if how == "prod":
        return per_member.prod(0)
    if how == "max":
        return per_member.max(0).values
    if how == "last":
        return per_member[-1]
    raise ValueError(f"The 'aggregation' parameter must be one of {', '.join(AGGREGATIONS)}. Got {how!r} instead.")


@dataclass
class GroupScores:
    """Taylor importance of every coupled group: attention (L, units: KV groups or heads), mlp (L, d_ff)."""

    attention: torch.Tensor
    mlp: torch.Tensor

    def of(self, kind: str) -> torch.Tensor:
        return self.attention if kind == "attention" else self.mlp


def group_scores(loaded: LoadedModel, examples: Examples, calibration: Sequence[Batch], *,
                 importance: str = "element", aggregation: str = "sum", second_order: bool = False,
                 layers: Sequence[int] | None = None) -> GroupScores:
    """LLM-Pruner's importance of every group of `layers` (all by default; other layers score 0)."""
    if second_order and importance != "element":
        raise ValueError("The second-order (Hessian) term applies to element-wise importance only.")
    aggregate(torch.zeros(1, 1), aggregation)  # ValueError for an unknown aggregation before any pass
    shape = GateShape.of(loaded)
    layers = list(range(shape.layers)) if layers is None else list(layers)
    groups = {(layer, kind): members(loaded, layer, kind) for layer in layers for kind in KINDS}
    params = [p for ms in groups.values() for m in ms for p, _ in m.parts]
    grads = gradients(loaded, examples, calibration, params, second_order)
    out = {kind: torch.zeros(shape.layers, units(loaded, kind)) for kind in KINDS}
    for (layer, kind), ms in groups.items():
        count = units(loaded, kind)
        out[kind][layer] = aggregate(torch.stack([member_importance(m, count, grads, importance) for m in ms]),
                                     aggregation)
    return GroupScores(attention=out["attention"], mlp=out["mlp"])
