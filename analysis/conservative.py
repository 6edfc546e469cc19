"""Conservative propagation (Ali et al. 2022; AttnLRP, Achtibat et al. 2024) for BERT-family and MPNet classifiers.

Inside `conservative(model)` the model computes exactly the same numbers as usual (up to float
rounding), but its *gradient* is that of a network in which every non-linearity is frozen at its
current value. The network is then piecewise affine in its activations, so gradient x input is an
LRP rule that conserves relevance: for any activation x that separates the input from the logit,

    logit = sum(x * dlogit/dx) + sum over downstream biases b of sum(b * dlogit/db)

up to float error. The three rules (no model code is copied; everything is hooks or the
`AttentionInterface`, removed/restored in `finally`):

- attention probabilities are constants: softmax(QK^T) is computed from detached Q and K, so
  probs @ V is linear in V and no relevance leaks into the query/key paths (through the
  `AttentionInterface` where the model uses it; MPNet computes its softmax inline, so there forward
  hooks detach the outputs of its Q and K projections instead — its relative position bias depends
  on positions only, so the probabilities are constant in the input either way);
- LayerNorm divides by a detached standard deviation: y = (x - mean(x)) / std(x).detach() * w + b
  is affine in x (the mean subtraction stays, it is linear);
- elementwise activations (GELU, the pooler's tanh, ...) use the identity rule: the value is
  unchanged but the backward gain is act(x)/x, so x * grad_in == act(x) * grad_out.

`record_activations` / `record_head_context` keep the tensors one backward pass needs: the input of
each layer's W_O (the per-head context) and the encoder input (embedding output).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import transformers.activations as hf_act
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.models.bert.modeling_bert import eager_attention_forward

from core.adapter import Adapter

CONSERVATIVE_ATTENTION = "headlab_conservative"
_ZERO = 1e-6  # |x| below this counts as zero in the identity rule's act(x)/x

# Activations with act(0) == 0, so act(x)/x is a bounded gain. Names missing from an older
# transformers are skipped.
_IDENTITY_RULE_TYPES: tuple[type, ...] = (nn.GELU, nn.Tanh, nn.ReLU, nn.SiLU, nn.Mish) + tuple(
    getattr(hf_act, name)
    for name in ("GELUActivation", "NewGELUActivation", "FastGELUActivation", "QuickGELUActivation",
                 "ClippedGELUActivation", "AccurateGELUActivation", "GELUTanh", "SiLUActivation",
                 "MishActivation", "ReLUSquaredActivation")
    if hasattr(hf_act, name)
)


def _detached_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """BERT's eager attention with constant probabilities.

    The softmax is computed from detached query and key, which is the same as computing the
    probabilities and using `probs.detach() @ V`: the value is unchanged, gradients reach V only.
    Shapes as in `eager_attention_forward`: query/key/value (B, H, T, d_h) -> ((B, T, H, d_h), probs).
    """
    return eager_attention_forward(
        module, query.detach(), key.detach(), value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
    )


# Registered once at import. The mask function must be registered too: transformers silently builds
# *no* padding mask for an attention implementation it has no mask function for.
AttentionInterface.register(CONSERVATIVE_ATTENTION, _detached_attention)
AttentionMaskInterface.register(CONSERVATIVE_ATTENTION, eager_mask)


def _layernorm_constant_std(module: nn.LayerNorm, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: recompute LayerNorm with the standard deviation detached (affine in x)."""
    x = inputs[0]
    dims = tuple(range(-len(module.normalized_shape), 0))
    mean = x.mean(dim=dims, keepdim=True)
    var = x.var(dim=dims, keepdim=True, unbiased=False)
    y = (x - mean) / torch.sqrt(var + module.eps).detach()
    if module.weight is not None:
        y = y * module.weight
    if module.bias is not None:
        y = y + module.bias
    return y


def identity_rule(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """`y` = act(x) with the value of `y` and the gradient of x * (act(x)/x).detach().

    Near x = 0 the gain uses |x| = 1e-6 (with x's sign), so it stays finite; there x * gain differs
    from y by less than ~1e-6, far below float32 noise of the logit.
    """
    safe = torch.where(x.abs() > _ZERO, x, torch.full_like(x, _ZERO).copysign(x))
    gain = (y / safe).detach()
    return y.detach() + (x - x.detach()) * gain


def _detach_output(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: the same value without a gradient path (Q and K of a non-pluggable attention)."""
    return output.detach()


def _identity_rule_hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    return identity_rule(inputs[0], output)


@dataclass
class _FunctionalHeadActivation:
    """RoBERTa's classification head applies `torch.tanh` as a function between `dense` and
    `out_proj`, which no module hook sees. Keep dense's output z; in `out_proj`'s pre-hook replace
    y = tanh(z) (dropout is the identity in eval) by identity_rule(z, y)."""

    z: list[torch.Tensor] = field(default_factory=list)

    def keep(self, module, inputs, output) -> None:
        self.z[:] = [output]

    def replace(self, module, inputs):
        if not self.z:
            return None
        y = inputs[0]
        return (identity_rule(self.z.pop(), y), *inputs[1:])


def _functional_head_hooks(model: nn.Module) -> list:
    """Hooks for a classifier head with a functional activation (RoBERTa); [] when none is needed."""
    head = getattr(model, "classifier", None)
    if head is None or not all(isinstance(getattr(head, n, None), nn.Linear) for n in ("dense", "out_proj")):
        return []
    if any(isinstance(m, _IDENTITY_RULE_TYPES) for m in head.modules()):
        return []  # e.g. ELECTRA: a module activation, handled by the generic hook
    fix = _FunctionalHeadActivation()
    return [head.dense.register_forward_hook(fix.keep), head.out_proj.register_forward_pre_hook(fix.replace)]


@contextlib.contextmanager
def conservative(model: nn.Module) -> Iterator[nn.Module]:
    """Put a BERT-family model in conservative-propagation mode (see the module docstring).

    The model's outputs keep their values (float rounding aside); only gradients change. On exit, in
    `finally`, every hook is removed and the previous attention implementation is set back, so the
    model is exactly as before. The model is mutated while inside: do not share it with a thread
    that runs it at the same time (e.g. a cached model in two Streamlit sessions).

    Yields the model itself.
    """
    adapter = Adapter(model)
    pluggable = adapter.layout.pluggable_attention
    previous = model.config._attn_implementation
    hooks: list = []
    try:
        if pluggable:
            model.set_attn_implementation(CONSERVATIVE_ATTENTION)
        else:
            hooks += [projection(layer).register_forward_hook(_detach_output)
                      for layer in range(len(adapter.layers)) for projection in (adapter.query, adapter.key)]
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                hooks.append(module.register_forward_hook(_layernorm_constant_std))
            elif isinstance(module, _IDENTITY_RULE_TYPES):
                hooks.append(module.register_forward_hook(_identity_rule_hook))
        hooks += _functional_head_hooks(model)
        yield model
    finally:
        for hook in hooks:
            hook.remove()
        if pluggable:
            model.set_attn_implementation(previous)


@dataclass
class Recording:
    """Tensors captured during the last forward pass, one entry per recorded module, in module order.

    `tensors[i]` is None until module i has run. Recorded tensors stay attached to the graph, so
    `torch.autograd.grad(objective, recording.tensors)` gives the gradient at each of them.
    """

    tensors: list[torch.Tensor | None]


@contextlib.contextmanager
def record_activations(modules: Sequence[nn.Module], *, inputs: bool, leaf: bool = False) -> Iterator[Recording]:
    """Record the first input (`inputs=True`) or the output of each module on every forward pass.

    With `leaf=True` (outputs only) the output is replaced by a detached copy that requires grad: the
    gradient then starts there even if no parameter requires grad, and nothing below it is computed.
    Hooks are removed on exit. Hooks registered on the same modules earlier run first, so an output
    is recorded after e.g. `conservative`'s LayerNorm hook rewrote it.
    """
    if leaf and inputs:
        raise ValueError("The 'leaf' parameter of record_activations() needs inputs=False. Got inputs=True.")
    rec = Recording([None] * len(modules))
    hooks = []

    def make_hook(i: int):
        if inputs:
            def pre_hook(module, args):
                rec.tensors[i] = args[0]
            return pre_hook

        def hook(module, args, output):
            if leaf:
                output = output.detach().requires_grad_(True)
            rec.tensors[i] = output
            return output if leaf else None
        return hook

    try:
        for i, module in enumerate(modules):
            register = module.register_forward_pre_hook if inputs else module.register_forward_hook
            hooks.append(register(make_hook(i)))
        yield rec
    finally:
        for hook in hooks:
            hook.remove()


@contextlib.contextmanager
def record_head_context(model: nn.Module, adapter) -> Iterator[Recording]:
    """Record each layer's W_O input, the per-head context (B, T, H_l * d_h), `tensors[l]` for layer l."""
    if adapter.model is not model:
        raise ValueError("The 'adapter' parameter of record_head_context() must be the adapter of 'model'.")
    modules = [adapter.attention_output(layer) for layer in range(len(adapter.layers))]
    with record_activations(modules, inputs=True) as rec:
        yield rec
