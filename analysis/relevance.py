"""Which heads matter: LRP head relevance (Voita et al. 2019), Michel et al. 2019 importance, head masking.

Head relevance follows Voita with the conservative rules of Ali et al. 2022 (see
`analysis.conservative`): in conservative mode gradient x input is LRP, so the relevance of head h of
layer l for one example is

    r_lh = sum over tokens t and the head's d_h dims of ctx * dlogit/dctx,

ctx being the input of that layer's `attention.output.dense` (W_O), and `logit` the explained logit.
One forward and one backward pass per batch give every head of every layer, the relevance reaching
the input embeddings, and the share of every bias — which is how conservation is checked:

    logit == input_relevance + bias_relevance        (`convergence_delta` is the difference).

Where Captum fits, and why it is not the engine: `captum.attr.LayerGradientXActivation` accepts a
list of layers and does one pass for all of them, and the tests check that it gives the same head
relevance. But the conservation check also needs the gradient at the embedding output and at the
output of every Linear/LayerNorm (for the bias share) in the *same* pass, per example, which its
single `attribute_to_layer_input` switch cannot express without a second pass; so the pass here
uses plain forward hooks (`analysis.conservative.record_activations`) and one `torch.autograd.grad`.

The pooler's tanh (and RoBERTa/ELECTRA head activations) get the identity rule like GELU, so the
explanation starts at the logit itself, not at the classifier's input.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from analysis.conservative import conservative, record_activations, record_head_context
from core.batching import collate, encode, sorted_batches
from core.data import TextDataset
from core.evaluate import Progress

Target = int | Sequence[int] | None


# ----------------------------------------------------------------------------- result


@dataclass
class RelevanceResult:
    """Head relevance of N examples for a model with L layers and at most H heads per layer.

    Heads a (pruned) layer does not have are NaN in every (.., L, H) array and absent from `to_frame`.
    Relevance is in logit units before normalisation.
    """

    relevance: np.ndarray  # (L, H) mean over examples of |r_lh| / sum_lh |r_lh|; each example sums to 1
    relevance_signed: np.ndarray  # (L, H) mean over examples of r_lh / sum_lh |r_lh|
    per_example: np.ndarray  # (N, L, H) raw signed r_lh, logit units
    logits: np.ndarray  # (N,) the explained logit of each example
    targets: np.ndarray  # (N,) int, the class whose logit was explained
    input_relevance: np.ndarray  # (N,) sum over tokens and dims of emb * grad at the encoder input
    bias_relevance: np.ndarray  # (N,) sum over every downstream bias b (Linear, LayerNorm beta) of b * grad
    convergence_delta: np.ndarray  # (N,) logits - input_relevance - bias_relevance; ~0 (float error)
    truncated: int  # examples cut at max_length tokens

    def to_frame(self) -> pd.DataFrame:
        """One row per existing head: columns layer, head (0-based), relevance, relevance_signed."""
        layers, heads = np.nonzero(~np.isnan(self.relevance))
        return pd.DataFrame({
            "layer": layers,
            "head": heads,
            "relevance": self.relevance[layers, heads],
            "relevance_signed": self.relevance_signed[layers, heads],
        })


def normalise_examples(per_example: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, L, H) signed relevance -> ((L, H) mean |r|/sum|r|, (L, H) mean r/sum|r|); NaN heads stay NaN.

    An example whose heads all have zero relevance contributes zeros.
    """
    total = np.nansum(np.abs(per_example), axis=(1, 2), keepdims=True)  # (N, 1, 1)
    scale = np.divide(1.0, total, out=np.zeros_like(total), where=total > 0)
    return np.mean(np.abs(per_example) * scale, axis=0), np.mean(per_example * scale, axis=0)


# ----------------------------------------------------------------------------- shared mechanics


def _heads(adapter) -> list[int]:
    """Number of heads of each layer (pruned layers may have fewer)."""
    return [adapter.num_heads(layer) for layer in range(len(adapter.layers))]


def _bias_modules(adapter) -> list[nn.Module]:
    """Every Linear and LayerNorm with a bias between the embedding output and the logits, except the
    Q and K projections: with constant attention no relevance passes through them (share 0)."""
    skip = {id(m) for m in adapter.base.embeddings.modules()}
    skip |= {id(projection(layer)) for layer in range(len(adapter.layers))
             for projection in (adapter.query, adapter.key)}
    return [m for m in adapter.model.modules()
            if isinstance(m, (nn.Linear, nn.LayerNorm)) and m.bias is not None and id(m) not in skip]


def _per_head(ctx: torch.Tensor, grad: torch.Tensor | None, mask: torch.Tensor, heads: int) -> torch.Tensor:
    """sum over tokens and head dims of ctx * grad: (B, T, H*d) x2, mask (B, T) -> (B, H) float64."""
    if grad is None or heads == 0:
        return torch.zeros(ctx.shape[0], heads, dtype=torch.float64)
    prod = (ctx.detach() * grad * mask[:, :, None]).view(ctx.shape[0], ctx.shape[1], heads, -1)  # (B, T, H, d_h)
    return prod.double().sum(dim=(1, 3))


def _bias_share(module: nn.Module, grad: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
    """sum of bias * grad at the module's output (B, [T,] D) over tokens and dims -> (B,) float64."""
    if grad is None:  # the module's output does not reach the explained logit
        return torch.zeros(mask.shape[0], dtype=torch.float64)
    prod = grad * module.bias.detach()
    if prod.dim() == 3:
        prod = prod * mask[:, :, None]
    return prod.double().flatten(1).sum(dim=1)


def _targets(logits: torch.Tensor, target: Target) -> torch.Tensor:
    """(B,) class index per row: argmax for None, the same class for an int, or the given ids."""
    if target is None:
        return logits.argmax(dim=1)
    if isinstance(target, int):
        return torch.full((logits.shape[0],), target, dtype=torch.long)
    return torch.as_tensor(target, dtype=torch.long)


def _check_target(target: Target, n: int, classes: int, where: str) -> None:
    """Raise ValueError unless target is None, a class id, or n class ids."""
    if target is None:
        return
    values = [target] if isinstance(target, (int, np.integer)) else list(target)
    if not isinstance(target, (int, np.integer)) and len(values) != n:
        raise ValueError(f"The 'target' parameter of {where} must have one class per text ({n}). Got {len(values)}.")
    bad = [v for v in values if not isinstance(v, (int, np.integer)) or not 0 <= int(v) < classes]
    if bad:
        raise ValueError(f"The 'target' parameter of {where} must be None or class ids in 0..{classes - 1}. "
                         f"Got {bad[0]!r} instead.")


def _max_length(loaded, max_length: int | None, where: str) -> int:
    limit = loaded.max_length if max_length is None else min(int(max_length), loaded.max_length)
    if limit < 2:
        raise ValueError(f"The 'max_length' parameter of {where} must be >= 2. Got {max_length} instead.")
    return limit


def _check_texts(texts: Sequence[str], batch_size: int, where: str) -> None:
    if isinstance(texts, str) or len(texts) == 0:
        raise ValueError(f"The 'texts' parameter of {where} must be a non-empty list of strings. Got {texts!r}.")
    if batch_size < 1:
        raise ValueError(f"The 'batch_size' parameter of {where} must be >= 1. Got {batch_size} instead.")


@dataclass
class _BatchPass:
    """One conservative forward/backward pass over a padded batch of B examples, T tokens."""

    heads: np.ndarray  # (B, L, H) float64 signed head relevance, NaN for missing heads
    logits: np.ndarray  # (B,) explained logit
    targets: np.ndarray  # (B,) explained class
    tokens: np.ndarray  # (B, T) float64 relevance per token at the encoder input, 0 on padding
    bias: np.ndarray  # (B,) float64 bias share


@contextlib.contextmanager
def _grad_mode() -> Iterator[None]:
    """Gradients on, even when called under torch.inference_mode / no_grad (e.g. from a UI)."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def _conservative_pass(loaded, batch: dict[str, torch.Tensor], target: Target) -> _BatchPass:
    """Explain `target` logits of one batch in conservative mode (see module docstring)."""
    model, adapter = loaded.model, loaded.adapter
    heads = _heads(adapter)
    biases = _bias_modules(adapter)
    mask = batch["attention_mask"].to(torch.float32)
    with _grad_mode(), conservative(model), \
            record_activations([adapter.base.embeddings], inputs=False, leaf=True) as emb, \
            record_head_context(model, adapter) as ctx, record_activations(biases, inputs=False) as outs:
        logits = model(**batch).logits  # (B, C)
        tgt = _targets(logits, target)
        explained = logits.gather(1, tgt[:, None])[:, 0]  # (B,)
        grads = torch.autograd.grad(explained.sum(), [*ctx.tensors, *emb.tensors, *outs.tensors], allow_unused=True)
        g_ctx, g_emb, g_out = grads[: len(heads)], grads[len(heads)], grads[len(heads) + 1:]
        per_head = np.full((mask.shape[0], len(heads), max(heads, default=0)), np.nan)
        for layer, h in enumerate(heads):
            per_head[:, layer, :h] = _per_head(ctx.tensors[layer], g_ctx[layer], mask, h).numpy()
        tokens = (emb.tensors[0].detach() * g_emb * mask[:, :, None]).double().sum(dim=2)  # (B, T)
        bias = torch.zeros(mask.shape[0], dtype=torch.float64)
        for module, grad in zip(biases, g_out):
            bias += _bias_share(module, grad, mask)
    return _BatchPass(per_head, explained.detach().double().numpy(), tgt.numpy(), tokens.numpy(), bias.numpy())


# ----------------------------------------------------------------------------- head relevance


class HeadRelevance:
    """Voita et al. (2019) head relevance by conservative LRP (gradient x input in conservative mode).

    Args:
        loaded: a `core.models.LoadedModel` (eval mode; any attention implementation).
        max_length: tokens per text (default and cap: `loaded.max_length`); longer texts keep their
            first max_length-1 tokens and the closing special token.
    """

    def __init__(self, loaded, *, max_length: int | None = None):
        self.loaded = loaded
        self.max_length = max_length

    def attribute(
        self,
        texts: Sequence[str],
        *,
        target: Target = None,
        batch_size: int = 32,
        progress: Progress | None = None,
    ) -> RelevanceResult:
        """Relevance of every head for each text, with the conservation check.

        Args:
            texts: N sentences.
            target: None explains each text's predicted class; an int explains that class for all;
                a sequence of N ints explains one class per text.
            batch_size: texts per forward/backward pass (length-sorted batches, padding contributes 0).
            progress: called as `progress(done, total, "relevance")` after each batch.

        Returns:
            A `RelevanceResult` (shapes there), examples in the order of `texts`.
        """
        where = "HeadRelevance.attribute()"
        _check_texts(texts, batch_size, where)
        model, tokenizer = self.loaded.model, self.loaded.tokenizer
        if model.training:
            raise ValueError("HeadRelevance needs the model in eval mode (dropout breaks conservation).")
        _check_target(target, len(texts), model.config.num_labels, where)
        if target is not None:
            target = int(target) if isinstance(target, (int, np.integer)) else np.asarray(target, dtype=np.int64)
        enc = encode(tokenizer, list(texts), _max_length(self.loaded, self.max_length, where))
        n, heads = len(texts), _heads(self.loaded.adapter)
        per_example = np.zeros((n, len(heads), max(heads, default=0)))
        logits, targets = np.zeros(n), np.zeros(n, dtype=np.int64)
        inputs, bias = np.zeros(n), np.zeros(n)
        done = 0
        for idx in sorted_batches(enc, batch_size):
            batch = collate([enc.ids[i] for i in idx], tokenizer.pad_token_id)
            part = target if target is None or isinstance(target, int) else target[idx]
            out = _conservative_pass(self.loaded, batch, part)
            per_example[idx], logits[idx], targets[idx] = out.heads, out.logits, out.targets
            inputs[idx], bias[idx] = out.tokens.sum(axis=1), out.bias
            done += len(idx)
            if progress:
                progress(done, n, "relevance")
        relevance, signed = normalise_examples(per_example)
        return RelevanceResult(
            relevance=relevance, relevance_signed=signed, per_example=per_example, logits=logits, targets=targets,
            input_relevance=inputs, bias_relevance=bias, convergence_delta=logits - inputs - bias,
            truncated=enc.truncated,
        )


@dataclass
class TokenRelevance:
    """Conservative LRP of one sentence taken down to the encoder input (logit units).

    `relevance.sum() + bias == logit` up to float32 rounding (the conservation property).
    """

    tokens: list[str]  # T word pieces, specials included
    relevance: np.ndarray  # (T,) float64: sum over dims of emb * dlogit/demb at the embedding output
    bias: float  # share of the logit carried by the bias terms
    logit: float  # the explained logit
    target: int  # the explained class


def token_relevance(loaded, text: str, *, target: int | None = None) -> TokenRelevance:
    """Why this prediction: conservative LRP down to the encoder input, per token.

    `target` None explains the predicted class. The text is truncated to the model's maximum length.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"The 'text' parameter of token_relevance() must be a non-empty string. Got {text!r}.")
    _check_target(target, 1, loaded.model.config.num_labels, "token_relevance()")
    enc = encode(loaded.tokenizer, [text], _max_length(loaded, None, "token_relevance()"))
    out = _conservative_pass(loaded, collate(enc.ids, loaded.tokenizer.pad_token_id), target)
    return TokenRelevance(loaded.tokenizer.convert_ids_to_tokens(enc.ids[0]), out.tokens[0], float(out.bias[0]),
                          float(out.logits[0]), int(out.targets[0]))


# ----------------------------------------------------------------------------- Michel importance


def _gate_gradients(loaded, batch: dict[str, torch.Tensor], labels: torch.Tensor) -> np.ndarray:
    """(B, L, H) dL_b/dgate_lh = sum_t ctx * dL_b/dctx for a head gate at 1, L_b = cross-entropy of example b.

    Plain gradients (no conservative rules). The summed loss makes each example's gradient its own.
    """
    model, adapter = loaded.model, loaded.adapter
    heads = _heads(adapter)
    mask = batch["attention_mask"].to(torch.float32)
    with _grad_mode(), record_activations([adapter.base.embeddings], inputs=False, leaf=True), \
            record_head_context(model, adapter) as ctx:
        loss = F.cross_entropy(model(**batch).logits, labels, reduction="sum")
        grads = torch.autograd.grad(loss, ctx.tensors, allow_unused=True)
        out = np.full((mask.shape[0], len(heads), max(heads, default=0)), np.nan)
        for layer, h in enumerate(heads):
            out[:, layer, :h] = _per_head(ctx.tensors[layer], grads[layer], mask, h).numpy()
    return out


def michel_importance(loaded, texts: Sequence[str], labels: Sequence[int], *, batch_size: int = 32) -> np.ndarray:
    """Michel et al. (2019) head importance, (L, H) float64, NaN for heads a layer does not have.

    I_lh = mean over examples of |sum_t ctx_lh * dL/dctx_lh| (= |dL/dgate_lh| at gate 1), L the
    cross-entropy on the true `labels`, plain gradients; then each layer is divided by its L2 norm
    (as in Michel's code), so every row has norm 1.
    """
    where = "michel_importance()"
    _check_texts(texts, batch_size, where)
    if len(labels) != len(texts):
        raise ValueError(f"The 'labels' parameter of {where} must have one label per text ({len(texts)}). "
                         f"Got {len(labels)}.")
    _check_target(list(labels), len(texts), loaded.model.config.num_labels, where)
    enc = encode(loaded.tokenizer, list(texts), _max_length(loaded, None, where))
    labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    total = None
    for idx in sorted_batches(enc, batch_size):
        batch = collate([enc.ids[i] for i in idx], loaded.tokenizer.pad_token_id)
        part = np.abs(_gate_gradients(loaded, batch, labels_t[idx])).sum(axis=0)
        total = part if total is None else total + part
    importance = total / len(texts)
    norm = np.sqrt(np.nansum(importance**2, axis=1, keepdims=True))
    return importance / (norm + 1e-20)


# ----------------------------------------------------------------------------- head masking


@contextlib.contextmanager
def mask_heads(model: nn.Module, adapter, mask: np.ndarray) -> Iterator[nn.Module]:
    """Multiply each head's context by `mask[l, h]` (1 keeps, 0 removes) before W_O.

    transformers 5 has no `head_mask`, so this is a forward pre-hook on every layer's
    `attention.output.dense` reshaping its input to (B, T, H, d_h). `mask` is (L, H) with H at least
    the widest layer's heads (extra columns are ignored). Hooks are removed on exit. Yields the model.
    """
    if adapter.model is not model:
        raise ValueError("The 'adapter' parameter of mask_heads() must be the adapter of 'model'.")
    heads = _heads(adapter)
    mask = np.asarray(mask, dtype=np.float32)
    if mask.ndim != 2 or mask.shape[0] != len(heads) or mask.shape[1] < max(heads, default=0):
        raise ValueError(f"The 'mask' parameter of mask_heads() must have shape ({len(heads)}, "
                         f"{max(heads, default=0)}). Got {mask.shape} instead.")
    if not np.all(np.isfinite(mask)):
        raise ValueError("The 'mask' parameter of mask_heads() must be finite (0/1 per head). Got NaN or inf.")

    def make_hook(gate: torch.Tensor):
        def hook(module, args):
            x = args[0]
            gated = x.view(*x.shape[:-1], gate.shape[0], -1) * gate[:, None].to(x.dtype)  # (B, T, H, d_h)
            return (gated.view(x.shape), *args[1:])
        return hook

    hooks = []
    try:
        for layer, h in enumerate(heads):
            gate = torch.from_numpy(mask[layer, :h].copy())
            hooks.append(adapter.attention_output(layer).register_forward_pre_hook(make_hook(gate)))
        yield model
    finally:
        for hook in hooks:
            hook.remove()


# ----------------------------------------------------------------------------- table


def relevance_table(
    loaded,
    data: TextDataset,
    *,
    limit: int | None = 500,
    target: int | None = None,
    progress: Progress | None = None,
) -> pd.DataFrame:
    """Head relevance and Michel importance on (a seeded subset of `limit` rows of) `data`.

    Columns: layer, head (0-based), relevance (mean share, each example sums to 1), relevance_signed,
    importance (Michel, per-layer L2-normalised). `limit` None uses every row. The labels of `data`
    must be the model's class ids (e.g. `load_data(..., label_names=loaded.label_names)`).
    """
    if len(data) == 0:
        raise ValueError("The 'data' parameter of relevance_table() is empty: nothing to explain.")
    if limit is not None and limit < 1:
        raise ValueError(f"The 'limit' parameter of relevance_table() must be >= 1 or None. Got {limit} instead.")
    rows = data if limit is None else data.subset(limit, seed=0)
    frame = HeadRelevance(loaded).attribute(rows.texts, target=target, progress=progress).to_frame()
    importance = michel_importance(loaded, rows.texts, rows.labels)
    frame["importance"] = importance[frame["layer"], frame["head"]]
    return frame
