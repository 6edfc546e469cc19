"""One LRP forward/backward pass over a padded batch, for either method and any explained logit.

In a method's mode (`analysis.conservative.conservative`, `analysis.attnlrp.attnlrp`) gradient x input is
that method's LRP, so one forward and one `torch.autograd.grad` give, per example: the relevance of every
head (its context at the W_O / o_proj input; query heads under GQA), of every token at the stream's input
(the embedding output), the share of every bias, and under AttnLRP the share the softmax absorbs:

    logit == input relevance + bias relevance + absorbed relevance     up to float error

(`absorbed` is 0 under conservative propagation). What is explained is an `Objective`: a classifier's
class logit (`ClassLogit`; for a prompted decoder the label word's LM-head logit) or a causal LM's
next-token logit at a chosen position (`NextTokenLogit`).

Where Captum fits, and why it is not the engine: `captum.attr.LayerGradientXActivation` accepts a
list of layers and does one pass for all of them, and the tests check that it gives the same head
relevance. But the conservation check also needs the gradient at the embedding output and at the
output of every Linear/LayerNorm (for the bias share) in the *same* pass, per example, which its
single `attribute_to_layer_input` switch cannot express without a second pass; so the pass
uses plain forward hooks (`analysis.conservative.record_activations`) and one `torch.autograd.grad`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from analysis.attnlrp import attnlrp, record_attention_probabilities, softmax_absorbed
from analysis.conservative import (
    Recording,
    conservative,
    record_activations,
    record_head_context,
    soft_cap,
)

Target = int | Sequence[int] | None


@dataclass(frozen=True)
class Method:
    """An LRP method: the mode that sets its rules, and what its bookkeeping must record."""

    mode: Callable  # model -> context manager putting the model in the method's mode
    qk_relevance: bool  # relevance reaches the Q and K projections, so their biases take a share
    absorbs: bool  # the softmax absorbs relevance: record the attention probabilities


METHODS = {"conservative": Method(conservative, qk_relevance=False, absorbs=False),
           "attnlrp": Method(attnlrp, qk_relevance=True, absorbs=True)}


def check_method(method: str, where: str) -> None:
    if method not in METHODS:
        raise ValueError(f"The 'method' parameter of {where} must be one of {', '.join(map(repr, METHODS))}. "
                         f"Got {method!r} instead.")


# ----------------------------------------------------------------------------- what is explained


def _targets(logits: torch.Tensor, target: Target) -> torch.Tensor:
    """(B,) class index per row: argmax for None, the same class for an int, or the given ids."""
    if target is None:
        return logits.argmax(dim=1)
    if isinstance(target, int):
        return torch.full((logits.shape[0],), target, dtype=torch.long)
    return torch.as_tensor(target, dtype=torch.long)


@dataclass(frozen=True)
class ClassLogit:
    """The classifier's logit of `target` (None: each row's predicted class; an int; or one id per row)."""

    target: Target = None

    def __call__(self, loaded, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> the explained logit (B,) and the class explained (B,) int64."""
        logits = loaded.model(**batch).logits  # (B, C)
        tgt = _targets(logits, self.target)
        return logits.gather(1, tgt[:, None])[:, 0], tgt


@dataclass(frozen=True)
class NextTokenLogit:
    """A causal LM's next-token logit: row b's LM-head logit of token `tokens[b]` at position `positions[b]`
    (after the final norm; Gemma's final soft-capping by the identity rule); token -1 = the predicted one."""

    positions: np.ndarray  # (B,) int, 0-based position in the row
    tokens: np.ndarray  # (B,) int, vocabulary id explained, or -1 for the argmax

    @classmethod
    def of(cls, ids: list[list[int]], position: int | None, where: str) -> NextTokenLogit:
        """The actual next token at `position` of each of N token-id lists (ValueError naming `where` if a
        text has no such position); at the last position, the predicted one.

        `position` None is each text's second-to-last token (its last token is explained; a one-token text
        explains the predicted next token); an int indexes every text like a Python list (-1 = last token).
        """
        if position is not None and not isinstance(position, (int, np.integer)):
            raise ValueError(f"The 'position' parameter of {where} must be an int or None. Got {position!r} instead.")
        positions, tokens = np.zeros(len(ids), dtype=np.int64), np.zeros(len(ids), dtype=np.int64)
        for i, x in enumerate(ids):
            p = max(len(x) - 2, 0) if position is None else int(position) + (len(x) if position < 0 else 0)
            if not 0 <= p < len(x):
                raise ValueError(f"The 'position' parameter of {where} must index a token of every text; text {i} "
                                 f"has {len(x)} tokens. Got {position} instead.")
            positions[i], tokens[i] = p, x[p + 1] if p + 1 < len(x) else -1
        return cls(positions, tokens)

    def rows(self, idx: np.ndarray) -> NextTokenLogit:
        """The objective of rows `idx` (a batch)."""
        return NextTokenLogit(self.positions[idx], self.tokens[idx])

    def __call__(self, loaded, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> the explained logit (B,) and the token explained (B,) int64."""
        hidden = loaded.adapter.base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                     use_cache=False).last_hidden_state  # (B, T, d)
        rows = torch.arange(hidden.shape[0])
        z = loaded.lm.get_output_embeddings()(hidden[rows, torch.as_tensor(self.positions)])  # (B, V)
        z = soft_cap(z, getattr(loaded.model.config, "final_logit_softcapping", None))
        given = torch.as_tensor(self.tokens, dtype=torch.long)
        tokens = torch.where(given >= 0, given, z.argmax(dim=1))
        return z.gather(1, tokens[:, None])[:, 0], tokens


Objective = Callable[[object, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]


# ----------------------------------------------------------------------------- the pass


def head_counts(adapter) -> list[int]:
    """Number of (query) heads of each layer (pruned layers may have fewer)."""
    return [adapter.num_heads(layer) for layer in range(len(adapter.layers))]


def bias_modules(adapter, *, qk: bool) -> list[nn.Module]:
    """Every Linear and LayerNorm with a bias between the stream's input and the logits; the Q and K
    projections only if `qk` (with constant attention no relevance passes through them: share 0)."""
    skip = {id(m) for m in adapter.embeddings.modules()}
    if not qk:
        skip |= {id(projection(layer)) for layer in range(len(adapter.layers))
                 for projection in (adapter.query, adapter.key)}
    return [m for m in adapter.model.modules()
            if isinstance(m, (nn.Linear, nn.LayerNorm)) and m.bias is not None and id(m) not in skip]


def per_head(ctx: torch.Tensor, grad: torch.Tensor | None, mask: torch.Tensor, heads: int) -> torch.Tensor:
    """sum over tokens and head dims of ctx * grad: (B, T, H*d) x2, mask (B, T) -> (B, H) float64."""
    if grad is None or heads == 0:
        return torch.zeros(ctx.shape[0], heads, dtype=torch.float64)
    per_token = (ctx.detach() * grad).view(ctx.shape[0], ctx.shape[1], heads, -1).sum(dim=3)  # (B, T, H)
    return (per_token * mask[:, :, None]).double().sum(dim=1)


def _bias_share(module: nn.Module, grad: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
    """sum of bias * grad at the module's output (B, [T,] D) over tokens and dims -> (B,) float64."""
    if grad is None:  # the module's output does not reach the explained logit
        return torch.zeros(mask.shape[0], dtype=torch.float64)
    if grad.dim() == 3:
        grad = torch.einsum("btd,bt->bd", grad, mask)  # summed over real tokens
    bias = module.bias.detach()
    if hasattr(module, "kv_index"):  # a sliced K/V projection whose output is expanded per query head
        bias = bias.unflatten(-1, (-1, module.head_dim)).index_select(-2, module.kv_index).flatten(-2)
    return grad.double() @ bias.double()


@contextlib.contextmanager
def grad_mode() -> Iterator[None]:
    """Gradients on, even when called under torch.inference_mode / no_grad (e.g. from a UI)."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


@contextlib.contextmanager
def _probabilities(adapter, record: bool) -> Iterator[Recording]:
    if not record:
        yield Recording([])
        return
    with record_attention_probabilities(adapter) as rec:
        yield rec


@dataclass
class BatchPass:
    """One pass over a padded batch of B examples, T tokens, L layers, at most H heads per layer."""

    heads: np.ndarray  # (B, L, H) float64 signed head relevance, NaN for missing heads
    logits: np.ndarray  # (B,) explained logit
    targets: np.ndarray  # (B,) explained class / token id
    tokens: np.ndarray  # (B, T) float64 relevance per token at the stream's input, 0 on padding
    bias: np.ndarray  # (B,) float64 bias share
    absorbed: np.ndarray  # (B,) float64 share absorbed by the softmax rule (AttnLRP; 0 for conservative)


def lrp_pass(loaded, batch: dict[str, torch.Tensor], objective: Objective, method: str = "conservative") -> BatchPass:
    """Explain `objective` on one batch by `method` ("conservative" or "attnlrp"); see the module docstring."""
    model, adapter, rules = loaded.model, loaded.adapter, METHODS[method]
    heads = head_counts(adapter)
    biases = bias_modules(adapter, qk=rules.qk_relevance)
    mask = batch["attention_mask"].to(torch.float32)
    with grad_mode(), rules.mode(model), \
            record_activations([adapter.embeddings], inputs=False, leaf=True) as emb, \
            record_head_context(model, adapter) as ctx, record_activations(biases, inputs=False) as outs, \
            _probabilities(adapter, rules.absorbs) as probs:
        explained, tgt = objective(loaded, batch)  # (B,), (B,)
        recorded = [*ctx.tensors, *emb.tensors, *outs.tensors, *probs.tensors]
        grads = torch.autograd.grad(explained.sum(), recorded, allow_unused=True)
        n_ctx, n_out = len(heads), len(outs.tensors)
        g_ctx, g_emb = grads[:n_ctx], grads[n_ctx]
        g_out, g_probs = grads[n_ctx + 1: n_ctx + 1 + n_out], grads[n_ctx + 1 + n_out:]
        per_example = np.full((mask.shape[0], len(heads), max(heads, default=0)), np.nan)
        for layer, h in enumerate(heads):
            per_example[:, layer, :h] = per_head(ctx.tensors[layer], g_ctx[layer], mask, h).numpy()
        tokens = (emb.tensors[0].detach() * g_emb * mask[:, :, None]).double().sum(dim=2)  # (B, T)
        bias = torch.zeros(mask.shape[0], dtype=torch.float64)
        for module, grad in zip(biases, g_out):
            bias += _bias_share(module, grad, mask)
        absorbed = torch.zeros(mask.shape[0], dtype=torch.float64)
        for p, grad in zip(probs.tensors, g_probs):
            absorbed += softmax_absorbed(p, grad)
    return BatchPass(per_example, explained.detach().double().numpy(), tgt.numpy(), tokens.numpy(), bias.numpy(),
                     absorbed.numpy())
