"""Conservative propagation (CP-LRP, Ali et al. 2022) for BERT-family, MPNet and Llama-family models, and
the rules every LRP method here shares (AttnLRP, `analysis.attnlrp`, swaps only the attention rule).

Inside `conservative(model)` the model computes exactly the same numbers as usual (up to float
rounding), but its *gradient* is that of a network in which every non-linearity is frozen at its
current value. The network is then piecewise affine in its activations, so gradient x input is an
LRP rule that conserves relevance: for any activation x that separates the input from the logit,

    logit = sum(x * dlogit/dx) + sum over downstream biases b of sum(b * dlogit/db)

up to float error. The rules (no model code is copied; everything is hooks or the
`AttentionInterface`, removed/restored in `finally`):

- attention probabilities are constants: the model's own eager attention (GQA, sliding windows,
  soft-capping as its modeling file does them) runs on detached Q and K, so probs @ V is linear in V
  and no relevance leaks into the query/key paths (through the `AttentionInterface` where the model
  uses it; MPNet computes its softmax inline, so there forward hooks detach the outputs of its Q and K
  projections instead — its relative position bias depends on positions only, so the probabilities
  are constant in the input either way). RoPE only rotates Q and K, so it needs no rule;
- LayerNorm divides by a detached standard deviation: y = (x - mean(x)) / std(x).detach() * w + b
  is affine in x (the mean subtraction stays, it is linear); RMSNorm multiplies by a detached
  1/rms: y = x * rsqrt(mean(x^2) + eps).detach() * (offset + w), offset 1 for Gemma;
- elementwise activations (GELU, SiLU, the pooler's tanh, ...) use the identity rule: the value is
  unchanged but the backward gain is act(x)/x, so x * grad_in == act(x) * grad_out;
- the gated FFN product act(gate(x)) * up(x) (SwiGLU, GeGLU) uses the uniform rule: the gradient at
  the product is halved, so each factor gets half the product's relevance (a * grad_a == b * grad_b
  == product * grad_product / 2) and the two halves add back to the whole;
- the final logit soft-capping of a prompted Gemma (cap * tanh(z / cap)) uses the identity rule.

`record_activations` / `record_head_context` keep the tensors one backward pass needs: the input of
each layer's W_O (the per-head context; query heads under GQA) and the stream's input (embedding output).
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import transformers.activations as hf_act
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

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


def model_attention(module: nn.Module) -> Callable:
    """The eager attention function of the modeling file that defines `module` (BERT's, Llama's with
    GQA, Gemma3's with soft-capping, ...), so a rule changes gradients only, never the computation."""
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise ValueError(f"{type(module).__name__} has no eager_attention_forward in its modeling file; "
                         "LRP needs the model's eager attention.")
    return fn


def _detached_attention(module, query, key, value, attention_mask, **kwargs):
    """The model's eager attention with constant probabilities.

    The softmax is computed from detached query and key, which is the same as computing the
    probabilities and using `probs.detach() @ V`: the value is unchanged, gradients reach V only.
    Shapes as in `eager_attention_forward`: query (B, H, T, d_h), key/value (B, H_kv, T, d_h) ->
    ((B, T, H, d_h), probs (B, H, T, T)).
    """
    return model_attention(module)(module, query.detach(), key.detach(), value, attention_mask, **kwargs)


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


def _is_rmsnorm(module: nn.Module) -> bool:
    """transformers' RMSNorm classes (LlamaRMSNorm, Qwen2RMSNorm, Gemma3RMSNorm, ...): no bias."""
    return type(module).__name__.endswith("RMSNorm") and isinstance(getattr(module, "weight", None), torch.Tensor)


def _rmsnorm_constant_scale(module: nn.Module, inputs: tuple, output: torch.Tensor, *, offset: float) -> torch.Tensor:
    """Forward hook: the same output, with the gradient of x * (rsqrt(mean(x^2) + eps) * (offset + w)).detach().

    The factor is recomputed from the module's eps (`variance_epsilon` or `eps`) over the last dim.
    """
    x = inputs[0]
    eps = getattr(module, "variance_epsilon", None)
    eps = module.eps if eps is None else eps
    scale = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps) * (offset + module.weight.float())
    return output.detach() + (x - x.detach()) * scale.detach().to(x.dtype)


def scale_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    """`x` with its gradient multiplied by `factor` on the way back (the value is exactly x)."""
    return x.detach() + (x - x.detach()) * factor


def _halve_product_gradient(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook on the FFN's down projection of a gated FFN: its input is act(gate) * up;
    halving the gradient there gives each factor half the product's relevance (the uniform rule)."""
    return (scale_gradient(args[0], 0.5), *args[1:])


def identity_rule(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """`y` = act(x) with the value of `y` and the gradient of x * (act(x)/x).detach().

    Near x = 0 the gain uses |x| = 1e-6 (with x's sign), so it stays finite; there x * gain differs
    from y by less than ~1e-6, far below float32 noise of the logit.
    """
    safe = torch.where(x.abs() > _ZERO, x, torch.full_like(x, _ZERO).copysign(x))
    gain = (y / safe).detach()
    return y.detach() + (x - x.detach()) * gain


def soft_cap(z: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Logit soft-capping cap * tanh(z / cap) (Gemma) by the identity rule; z itself when cap is None/0."""
    return identity_rule(z, torch.tanh(z / cap) * cap) if cap else z


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


@dataclass
class _PromptSoftCap:
    """A prompted decoder (`core.prompting.PromptClassifier`) soft-caps its label logits with a functional
    tanh after the LM head. Keep the LM head's output (B, V); in the classifier's forward hook replace
    the capped logits y by identity_rule(z, y), z the uncapped label logits."""

    z: list[torch.Tensor] = field(default_factory=list)

    def keep(self, module, inputs, output) -> None:
        self.z[:] = [output]

    def replace(self, module, inputs, output):
        output.logits = identity_rule(self.z.pop()[:, module.label_ids], output.logits)
        return output


def _soft_cap_hooks(model: nn.Module) -> list:
    """Hooks for a prompted decoder whose config soft-caps the final logits; [] otherwise."""
    lm = getattr(model, "lm", None)
    if lm is None or not getattr(model.config, "final_logit_softcapping", None):
        return []
    fix = _PromptSoftCap()
    return [lm.get_output_embeddings().register_forward_hook(fix.keep), model.register_forward_hook(fix.replace)]


def _pretrained(model: nn.Module) -> nn.Module:
    """The transformers model that owns the attention setting (a PromptClassifier's causal LM)."""
    return getattr(model, "lm", model)


@contextlib.contextmanager
def propagation_rules(model: nn.Module, attention: str | None) -> Iterator[nn.Module]:
    """The rules every method shares (norms, activations, the gated product, soft-capping; see the module
    docstring) with `attention`, a name registered in transformers' `AttentionInterface`, as the rule for
    attention (None leaves the attention implementation alone).

    The model's outputs keep their values (float rounding aside); only gradients change. On exit, in
    `finally`, every hook is removed and the previous attention implementation is set back. Yields the model.
    """
    adapter = Adapter(model)
    owner = _pretrained(model)
    previous = model.config._attn_implementation
    norm_hook = functools.partial(_rmsnorm_constant_scale, offset=adapter.layout.norm_offset)
    hooks: list = []
    try:
        if attention is not None:
            owner.set_attn_implementation(attention)
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                hooks.append(module.register_forward_hook(_layernorm_constant_std))
            elif _is_rmsnorm(module):
                hooks.append(module.register_forward_hook(norm_hook))
            elif isinstance(module, _IDENTITY_RULE_TYPES):
                hooks.append(module.register_forward_hook(_identity_rule_hook))
        hooks += [adapter.ffn_out(layer).register_forward_pre_hook(_halve_product_gradient)
                  for layer in range(len(adapter.layers)) if adapter.ffn_gate(layer) is not None]
        hooks += _functional_head_hooks(model) + _soft_cap_hooks(model)
        yield model
    finally:
        for hook in hooks:
            hook.remove()
        if attention is not None:
            owner.set_attn_implementation(previous)


@contextlib.contextmanager
def conservative(model: nn.Module) -> Iterator[nn.Module]:
    """Put a model (BERT family, MPNet, a prompted Llama-family decoder) in conservative-propagation mode
    (see the module docstring).

    The model's outputs keep their values (float rounding aside); only gradients change. On exit, in
    `finally`, every hook is removed and the previous attention implementation is set back, so the
    model is exactly as before. The model is mutated while inside: do not share it with a thread
    that runs it at the same time (e.g. a cached model in two Streamlit sessions).

    Yields the model itself.
    """
    adapter = Adapter(model)
    if adapter.layout.pluggable_attention:
        with propagation_rules(model, CONSERVATIVE_ATTENTION):
            yield model
        return
    hooks = [projection(layer).register_forward_hook(_detach_output)
             for layer in range(len(adapter.layers)) for projection in (adapter.query, adapter.key)]
    try:
        with propagation_rules(model, None):
            yield model
    finally:
        for hook in hooks:
            hook.remove()


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
