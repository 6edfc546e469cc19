"""Which heads matter: LRP head relevance (Voita et al. 2019), Michel et al. 2019 importance, head masking.

Head relevance follows Voita with one of two LRP methods by gradient x input (`analysis.lrp_pass`):
"conservative" (CP-LRP, Ali et al. 2022: attention probabilities constant, `analysis.conservative`) or
"attnlrp" (Achtibat et al. 2024: relevance through the softmax too, `analysis.attnlrp`). The relevance of
head h of layer l for one example is

    r_lh = sum over tokens t and the head's d_h dims of ctx * dlogit/dctx,

ctx being the input of that layer's W_O (`attention.output.dense`, a decoder's `o_proj`: one slice per
*query* head under GQA), and `logit` the explained logit. One forward and one backward pass per batch give
every head of every layer, the relevance reaching the stream's input (embedding output), the share of
every bias and, under AttnLRP, the share the softmax rule absorbs — which is how conservation is checked:

    logit == input_relevance + bias_relevance + absorbed_relevance   (`convergence_delta` is the difference).

What is explained: for a classifier the class logit (`attribute`, `token_relevance`; for a prompted decoder
the label word's LM-head logit at the prompt's last token, `core.prompting`); for a causal LM on plain text
the next-token logit of the actual next token at a chosen position (`attribute_next_token`,
`next_token_relevance`).

Captum gives the same head relevance but not, in the same pass, the shares the check needs (see
`analysis.lrp_pass`).

The pooler's tanh (and RoBERTa/ELECTRA head activations) get the identity rule like GELU, so the
explanation starts at the logit itself, not at the classifier's input.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from analysis.conservative import record_activations, record_head_context
from analysis.lrp_pass import (
    ClassLogit,
    NextTokenLogit,
    Objective,
    Target,
    check_method,
    grad_mode,
    head_counts,
    lrp_pass,
    per_head,
)
from core.batching import Encoded, collate, encode, sorted_batches
from core.data import TextDataset
from core.evaluate import Progress

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
    targets: np.ndarray  # (N,) int, the class (next-token: the vocabulary id) whose logit was explained
    input_relevance: np.ndarray  # (N,) sum over tokens and dims of emb * grad at the stream's input
    bias_relevance: np.ndarray  # (N,) sum over every downstream bias b (Linear, LayerNorm beta) of b * grad
    absorbed_relevance: np.ndarray  # (N,) absorbed by AttnLRP's softmax rule (0 for "conservative")
    convergence_delta: np.ndarray  # (N,) logits - input - bias - absorbed; ~0 (float error)
    truncated: int  # examples cut at max_length tokens
    method: str = "conservative"  # "conservative" or "attnlrp"
    positions: np.ndarray | None = None  # (N,) next-token relevance: the position explained; else None

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


# ----------------------------------------------------------------------------- validation


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


def _check_eval(loaded, where: str) -> None:
    if (loaded.lm or loaded.model).training:  # a PromptClassifier's own flag is not its LM's
        raise ValueError(f"{where} needs the model in eval mode (dropout breaks conservation).")


def _check_decoder(loaded, where: str) -> None:
    if not loaded.is_decoder:
        raise ValueError(f"{where} explains a causal LM's next token; {loaded.model.config.model_type} is an "
                         "encoder. Use the class logit (attribute / token_relevance).")


def _encode_text(loaded, texts: Sequence[str], max_length: int) -> Encoded:
    """Plain text for a causal LM (no prompt): the text tokenizer's ids, the first `max_length` kept."""
    full = loaded.text_tokenizer(list(texts), add_special_tokens=True, truncation=False)["input_ids"]
    return Encoded(ids=[x[:max_length] for x in full], truncated=sum(len(x) > max_length for x in full),
                   max_length=max_length)


# ----------------------------------------------------------------------------- head relevance


class HeadRelevance:
    """Voita et al. (2019) head relevance by LRP (gradient x input in the method's mode).

    Args:
        loaded: a `core.models.LoadedModel` (eval mode; any attention implementation): an encoder
            classifier or a prompted decoder.
        method: "conservative" (CP-LRP, default) or "attnlrp" (AttnLRP; needs attention through
            transformers' AttentionInterface, so not MPNet).
        max_length: tokens per text (default and cap: `loaded.max_length`). Classification keeps the
            first max_length-1 tokens and the closing token; next-token relevance the first max_length.
    """

    def __init__(self, loaded, *, method: str = "conservative", max_length: int | None = None):
        check_method(method, "HeadRelevance()")
        self.loaded = loaded
        self.method = method
        self.max_length = max_length

    def attribute(
        self,
        texts: Sequence[str],
        *,
        target: Target = None,
        batch_size: int = 32,
        progress: Progress | None = None,
    ) -> RelevanceResult:
        """Relevance of every head for each text's class logit, with the conservation check.

        Args:
            texts: N sentences (a decoder formats each through its prompt).
            target: None explains each text's predicted class; an int explains that class for all;
                a sequence of N ints explains one class per text.
            batch_size: texts per forward/backward pass (length-sorted batches, padding contributes 0).
            progress: called as `progress(done, total, "relevance")` after each batch.

        Returns:
            A `RelevanceResult` (shapes there), examples in the order of `texts`.
        """
        where = "HeadRelevance.attribute()"
        _check_texts(texts, batch_size, where)
        _check_eval(self.loaded, where)
        _check_target(target, len(texts), self.loaded.model.config.num_labels, where)
        if target is not None:
            target = int(target) if isinstance(target, (int, np.integer)) else np.asarray(target, dtype=np.int64)
        enc = encode(self.loaded.tokenizer, list(texts), _max_length(self.loaded, self.max_length, where))

        def objective(idx: np.ndarray) -> Objective:
            return ClassLogit(target if target is None or isinstance(target, int) else target[idx])
        return self._run(enc, self.loaded.tokenizer.pad_token_id, objective, batch_size, progress)

    def attribute_next_token(
        self,
        texts: Sequence[str],
        *,
        position: int | None = None,
        batch_size: int = 8,
        progress: Progress | None = None,
    ) -> RelevanceResult:
        """Relevance of every head for a causal LM's next-token logit on plain text (no prompt).

        Args:
            texts: N texts, tokenized by `loaded.text_tokenizer` (with its special tokens).
            position: the 0-based token position whose next-token logit is explained, Python-style
                (negative counts from each text's end). The logit explained is that of the actual next
                token; at the last token (-1), of the model's predicted next token. None (default): each
                text's second-to-last token, i.e. the logit of its actual last token.
            batch_size, progress: as in `attribute`.

        Returns:
            A `RelevanceResult`; `targets` are the vocabulary ids explained, `positions` the positions.
        """
        where = "HeadRelevance.attribute_next_token()"
        _check_texts(texts, batch_size, where)
        _check_eval(self.loaded, where)
        _check_decoder(self.loaded, where)
        enc = _encode_text(self.loaded, texts, _max_length(self.loaded, self.max_length, where))
        explained = NextTokenLogit.of(enc.ids, position, where)
        result = self._run(enc, self.loaded.text_tokenizer.pad_token_id or 0, explained.rows, batch_size, progress)
        result.positions = explained.positions
        return result

    def _run(self, enc: Encoded, pad_id: int, objective: Callable[[np.ndarray], Objective], batch_size: int,
             progress: Progress | None) -> RelevanceResult:
        """Length-sorted batches of `enc` through `lrp_pass`, each explaining `objective(indices)`."""
        n, heads = len(enc), head_counts(self.loaded.adapter)
        per_example = np.zeros((n, len(heads), max(heads, default=0)))
        logits, targets = np.zeros(n), np.zeros(n, dtype=np.int64)
        inputs, bias, absorbed = np.zeros(n), np.zeros(n), np.zeros(n)
        done = 0
        for idx in sorted_batches(enc, batch_size):
            batch = collate([enc.ids[i] for i in idx], pad_id)
            out = lrp_pass(self.loaded, batch, objective(idx), self.method)
            per_example[idx], logits[idx], targets[idx] = out.heads, out.logits, out.targets
            inputs[idx], bias[idx], absorbed[idx] = out.tokens.sum(axis=1), out.bias, out.absorbed
            done += len(idx)
            if progress:
                progress(done, n, "relevance")
        relevance, signed = normalise_examples(per_example)
        return RelevanceResult(
            relevance=relevance, relevance_signed=signed, per_example=per_example, logits=logits, targets=targets,
            input_relevance=inputs, bias_relevance=bias, absorbed_relevance=absorbed,
            convergence_delta=logits - inputs - bias - absorbed, truncated=enc.truncated, method=self.method,
        )


@dataclass
class TokenRelevance:
    """LRP of one text taken down to the stream's input (logit units).

    `relevance.sum() + bias + absorbed == logit` up to float32 rounding (the conservation property).
    """

    tokens: list[str]  # T tokens, specials (and a decoder's prompt) included
    relevance: np.ndarray  # (T,) float64: sum over dims of emb * dlogit/demb at the embedding output
    bias: float  # share of the logit carried by the bias terms
    logit: float  # the explained logit
    target: int  # the explained class (next-token: the vocabulary id)
    absorbed: float = 0.0  # share absorbed by AttnLRP's softmax rule (0 for "conservative")
    method: str = "conservative"
    position: int | None = None  # next-token relevance: the position explained


def _check_text(text: str, where: str) -> None:
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"The 'text' parameter of {where} must be a non-empty string. Got {text!r}.")


def token_relevance(loaded, text: str, *, target: int | None = None, method: str = "conservative") -> TokenRelevance:
    """Why this prediction: LRP of the class logit down to the input, per token (a decoder's prompt included).

    `target` None explains the predicted class. The text is truncated to the model's maximum length.
    `method`: "conservative" or "attnlrp" (see `HeadRelevance`).
    """
    where = "token_relevance()"
    _check_text(text, where)
    check_method(method, where)
    _check_target(target, 1, loaded.model.config.num_labels, where)
    enc = encode(loaded.tokenizer, [text], _max_length(loaded, None, where))
    out = lrp_pass(loaded, collate(enc.ids, loaded.tokenizer.pad_token_id), ClassLogit(target), method)
    return TokenRelevance(loaded.tokenizer.convert_ids_to_tokens(enc.ids[0]), out.tokens[0], float(out.bias[0]),
                          float(out.logits[0]), int(out.targets[0]), float(out.absorbed[0]), method)


def next_token_relevance(loaded, text: str, *, position: int | None = None,
                         method: str = "conservative") -> TokenRelevance:
    """LRP of a causal LM's next-token logit on plain `text` down to its tokens (`position` as in
    `HeadRelevance.attribute_next_token`: default the logit of the text's actual last token)."""
    where = "next_token_relevance()"
    _check_text(text, where)
    check_method(method, where)
    _check_decoder(loaded, where)
    enc = _encode_text(loaded, [text], _max_length(loaded, None, where))
    explained = NextTokenLogit.of(enc.ids, position, where)
    out = lrp_pass(loaded, collate(enc.ids, loaded.text_tokenizer.pad_token_id or 0), explained, method)
    return TokenRelevance(loaded.text_tokenizer.convert_ids_to_tokens(enc.ids[0]), out.tokens[0],
                          float(out.bias[0]), float(out.logits[0]), int(out.targets[0]), float(out.absorbed[0]),
                          method, int(explained.positions[0]))


# ----------------------------------------------------------------------------- Michel importance


def _gate_gradients(loaded, batch: dict[str, torch.Tensor], labels: torch.Tensor) -> np.ndarray:
    """(B, L, H) dL_b/dgate_lh = sum_t ctx * dL_b/dctx for a head gate at 1, L_b = cross-entropy of example b.

    Plain gradients (no conservative rules). The summed loss makes each example's gradient its own.
    """
    model, adapter = loaded.model, loaded.adapter
    heads = head_counts(adapter)
    mask = batch["attention_mask"].to(torch.float32)
    with grad_mode(), record_activations([adapter.embeddings], inputs=False, leaf=True), \
            record_head_context(model, adapter) as ctx:
        loss = F.cross_entropy(model(**batch).logits, labels, reduction="sum")
        grads = torch.autograd.grad(loss, ctx.tensors, allow_unused=True)
        out = np.full((mask.shape[0], len(heads), max(heads, default=0)), np.nan)
        for layer, h in enumerate(heads):
            out[:, layer, :h] = per_head(ctx.tensors[layer], grads[layer], mask, h).numpy()
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
    heads = head_counts(adapter)
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
    method: str = "conservative",
) -> pd.DataFrame:
    """Head relevance by `method` ("conservative" or "attnlrp", see `HeadRelevance`) and Michel importance
    on (a seeded subset of `limit` rows of) `data`.

    Columns: layer, head (0-based; query heads for a decoder), relevance (mean share, each example sums
    to 1), relevance_signed, importance (Michel, per-layer L2-normalised). `limit` None uses every row.
    The labels of `data` must be the model's class ids (e.g. `load_data(..., label_names=loaded.label_names)`).
    """
    check_method(method, "relevance_table()")
    if len(data) == 0:
        raise ValueError("The 'data' parameter of relevance_table() is empty: nothing to explain.")
    if limit is not None and limit < 1:
        raise ValueError(f"The 'limit' parameter of relevance_table() must be >= 1 or None. Got {limit} instead.")
    rows = data if limit is None else data.subset(limit, seed=0)
    frame = HeadRelevance(loaded, method=method).attribute(rows.texts, target=target, progress=progress).to_frame()
    importance = michel_importance(loaded, rows.texts, rows.labels)
    frame["importance"] = importance[frame["layer"], frame["head"]]
    return frame
