"""AttnLRP (Achtibat et al., ICML 2024) by gradient x input, for BERT-family encoders and Llama-family decoders.

AttnLRP keeps every rule of `analysis.conservative` (LayerNorm/RMSNorm identity through 1/sigma, the
identity rule on elementwise activations, the uniform rule on the gated FFN product, linear layers by
the epsilon rule with epsilon -> 0, i.e. plain gradient x input) but lets relevance flow through the
attention probabilities as well:

- softmax s = softmax(x) by its Deep Taylor rule (paper, Prop. 3.1): R_x = x * (R_s - s * sum_j R_s_j).
  With R_s = s * g this *is* x * (the softmax's true gradient), so the softmax keeps its gradient;
- the two attention matmuls, scores = q k^T and context = probs @ v, are bilinear: the uniform rule
  (Prop. 3.3) gives each factor half the relevance of the product.

As in the authors' efficient implementation (`lxt.efficient.patches.wrap_attention_forward`), both
matmul rules are gradient scalings at the attention's inputs, because everything between them is
linear in the backward pass: v gets 1/2 of its gradient, q and k 1/4 (1/2 from probs @ v times 1/2
from q k^T). The model's own eager attention then runs unchanged (`model_attention`).

The softmax rule is not conservative: per query row it passes on sum_i x_i s_i (g_i - S) of the
relevance S = sum_j s_j g_j that reaches it (g the gradient at the probabilities), and the rest is
absorbed (the "bias" of the Taylor expansion). The row's logits x are the log-probabilities up to a
constant c per row, and c drops out (sum_i s_i (g_i - S) = 0), so what is absorbed is computed from the
probabilities alone:

    absorbed = 1/2 * sum over layers, heads, query rows of [S - sum_i s_i log(s_i) (g_i - S)]

(1/2: the probabilities carry half of the context's relevance). Conservation under AttnLRP is then

    logit = input relevance + bias relevance (every Linear/LayerNorm bias, Q and K included)
            + absorbed relevance                                        up to float error.

Only attention through transformers' `AttentionInterface` is supported (not MPNet, which computes its
softmax inline), and no attention-logit soft-capping (Gemma 2 style; Gemma 3 has none).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from analysis.conservative import Recording, model_attention, propagation_rules, scale_gradient
from core.adapter import Adapter

ATTNLRP_ATTENTION = "headlab_attnlrp"


def _attnlrp_attention(module, query, key, value, attention_mask, **kwargs):
    """The model's eager attention with AttnLRP's rules as gradient scalings: q, k x 1/4, v x 1/2.

    Shapes as in `eager_attention_forward`: query (B, H, T, d_h), key/value (B, H_kv, T, d_h) ->
    ((B, T, H, d_h), probs (B, H, T, T)). The probabilities keep their true gradient.
    """
    return model_attention(module)(module, scale_gradient(query, 0.25), scale_gradient(key, 0.25),
                                   scale_gradient(value, 0.5), attention_mask, **kwargs)


AttentionInterface.register(ATTNLRP_ATTENTION, _attnlrp_attention)
AttentionMaskInterface.register(ATTNLRP_ATTENTION, eager_mask)


def check_attnlrp(model: nn.Module) -> None:
    """Raise ValueError if AttnLRP cannot run on `model` (see the module docstring)."""
    adapter = Adapter(model)
    if not adapter.layout.pluggable_attention:
        raise ValueError(f"AttnLRP needs attention through transformers' AttentionInterface; "
                         f"{model.config.model_type} computes its softmax inline. Use method='conservative'.")
    if getattr(model.config, "attn_logit_softcapping", None):
        raise ValueError("AttnLRP has no rule for attention-logit soft-capping "
                         f"(attn_logit_softcapping={model.config.attn_logit_softcapping}). "
                         "Use method='conservative'.")


@contextlib.contextmanager
def attnlrp(model: nn.Module) -> Iterator[nn.Module]:
    """Put a model in AttnLRP mode: the shared rules of `analysis.conservative.propagation_rules` with
    AttnLRP's attention rule. Values unchanged (float rounding aside), only gradients change; everything
    is undone on exit. Raises ValueError where AttnLRP does not apply (`check_attnlrp`). Yields the model.
    """
    check_attnlrp(model)
    with propagation_rules(model, ATTNLRP_ATTENTION):
        yield model


@contextlib.contextmanager
def record_attention_probabilities(adapter) -> Iterator[Recording]:
    """Record each layer's attention probabilities (B, H, T, T), `tensors[l]` for layer l, attached to the
    graph (the second output of the layer's self-attention module). Hooks are removed on exit."""
    rec = Recording([None] * len(adapter.layers))

    def make_hook(layer: int):
        def hook(module, args, output):
            rec.tensors[layer] = output[1]
        return hook

    hooks = []
    try:
        for layer in range(len(adapter.layers)):
            hooks.append(adapter.self_attention(layer).register_forward_hook(make_hook(layer)))
        yield rec
    finally:
        for hook in hooks:
            hook.remove()


def softmax_absorbed(probs: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
    """Relevance the softmax rule absorbs in one layer: probs and their gradient (B, H, T, T) -> (B,) float64.

    1/2 * sum over heads and query rows of [S - sum_i s_i log(s_i) (g_i - S)], S = sum_j s_j g_j per row
    (see the module docstring; 0 log 0 = 0, so masked keys add nothing).
    """
    if grad is None:  # the layer's probabilities do not reach the explained logit
        return torch.zeros(probs.shape[0], dtype=torch.float64)
    s, g = probs.detach().double(), grad.double()
    total = (s * g).sum(dim=-1, keepdim=True)  # (B, H, T, 1)
    passed = (torch.xlogy(s, s) * (g - total)).sum(dim=-1)  # (B, H, T)
    return 0.5 * (total[..., 0] - passed).sum(dim=(1, 2))
