"""Where gates act inside a model: forward hooks that apply a `GateState` without changing any weight.

For layer l of a BERT-family encoder (post-LayerNorm: sublayer output = LN(dropout(dense(x)) + input);
module names from the model's `core.models.Layout`, W_O is `attention.output.dense` in BERT and
`attention.attn.o` in MPNet):

    head[l, h]       pre-hook on W_O: its input (B, T, H*d_h) is viewed as (B, T, H, d_h) and head
                     h's context multiplied by the gate
    mha[l]           hook on W_O: its output (incl. bias) times mha[l] * hidden, so mha[l] = 0
                     leaves LN(input): the residual passes through the LayerNorm
    intermediate[l]  pre-hook on the FFN output dense: the (B, T, d_ff) activations times the gates
    ffn[l]           hook on the FFN output dense: its output (incl. bias) times ffn[l] * hidden
    hidden[k]        (CoFi) the embedding sum before its LayerNorm, every sublayer output (above) and
                     every LayerNorm output are multiplied by the hidden gates, and each LayerNorm
                     normalises over the kept dims (hidden > 0) only; closed dims stay exactly 0

MPNet's relative position bias needs no hook: it only shifts attention scores inside a head,
whose context the head gate then scales.

For layer l of a Llama-family decoder (pre-norm: x + branch(norm(x)); the branch is W_O / the down
projection, or Gemma3's post-norm after them; names from the adapter):

    head[l, h]       pre-hook on W_O (o_proj), as above; h is a *query* head: under GQA its KV head
                     keeps serving the group's other heads
    mha[l]           hook on the attention branch: its output (B, T, d) times mha[l] * hidden
    intermediate[l]  pre-hook on the down projection: the (B, T, d_ff) SwiGLU activations times the gates
    ffn[l]           hook on the FFN branch: its output times ffn[l] * hidden
    hidden[k]        (CoFi) the token table's output and every branch output (above) are multiplied by
                     the hidden gates, so the residual stream is 0 in closed dims; every RMSNorm (the
                     pre-norms, Gemma3's post-norms, the final norm) normalises over the kept dims only,
                     scaling by (offset + weight) (`layout.norm_offset`); its closed dims are exactly 0

`pruning.surgery.prune` builds a smaller model that computes the same function. Gate tensors may
require grad (learned gates): everything here is differentiable in the gate values.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from core.adapter import GateShape, as_adapter
from core.structure import branch_ends, rms_norm_eps
from pruning.gate_state import GateState


class GateHooks:
    """Hooks applying a GateState to a model; `update(state)` swaps the values without re-hooking.

    Use through `gated(...)`, or `attach()` / `remove()` by hand (e.g. once around a training loop,
    calling `update(gates.sample())` every step).
    """

    def __init__(self, arch, state: GateState):
        self.adapter = as_adapter(arch)
        self.model = self.adapter.model
        self.shape = GateShape.of(self.adapter)
        self._handles: list = []
        self.update(state)

    def update(self, state: GateState) -> None:
        """Use `state` from the next forward pass on (ValueError if its sizes differ from the model's)."""
        if not isinstance(state, GateState):
            raise ValueError(f"The 'state' parameter must be a GateState. Got {type(state).__name__} instead.")
        if not state.matches(self.shape):
            s = self.shape
            raise ValueError(f"The gate state has sizes (layers, heads, d_ff, hidden) {state.shape}; the model has "
                             f"({s.layers}, {s.heads}, {s.intermediate}, {s.hidden}).")
        hidden = state.hidden
        self._hidden_active = hidden.requires_grad or not bool((hidden.detach() == 1).all())
        if self._hidden_active and hasattr(self.adapter.base, "embeddings_project"):
            raise ValueError("Hidden-dim gates are not supported for models with an embedding projection (ELECTRA).")
        self._keep = torch.nonzero(hidden.detach() > 0).flatten()  # (d',) kept hidden dims
        if self._keep.numel() == 0:
            raise ValueError("The gate state closes every hidden dim; keep at least one.")
        self.state = state

    # ------------------------------------------------------------------ hooks

    def _heads(self, layer: int):
        def hook(module, args):
            x = args[0]  # (B, T, H*d_h)
            gate = self.state.head[layer].to(x.device, x.dtype)  # (H,)
            gated = x.reshape(*x.shape[:-1], gate.shape[0], -1) * gate[:, None]  # (B, T, H, d_h)
            return (gated.reshape(x.shape), *args[1:])
        return hook

    def _units(self, layer: int):
        def hook(module, args):
            x = args[0]  # (B, T, d_ff)
            return (x * self.state.intermediate[layer].to(x.device, x.dtype), *args[1:])
        return hook

    def _sublayer(self, group: str, layer: int):
        def hook(module, args, output):  # output (B, T, d), dense incl. bias
            scale = getattr(self.state, group)[layer]
            if self._hidden_active:
                scale = scale * self.state.hidden
            return output * scale.to(output.device, output.dtype)
        return hook

    def _table(self, module, args, output):  # decoders: the token table's output (B, T, d) times the hidden gates
        if not self._hidden_active:
            return None
        return output * self.state.hidden.to(output.device, output.dtype)

    def _rms_norm(self, module, args, output):
        """An RMSNorm over the kept dims only: x_k / sqrt(mean_k(x_k^2) + eps) * (offset + w_k), 0 elsewhere."""
        if not self._hidden_active:
            return None
        keep = self._keep.to(output.device)
        x = args[0].index_select(-1, keep).float()  # (B, T, d')
        scale = self.adapter.layout.norm_offset + module.weight.index_select(0, keep).float()
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + rms_norm_eps(module)) * scale
        return torch.zeros_like(output).index_copy(-1, keep, y.to(output.dtype))

    def _layer_norm(self, pre_scale: bool):
        def hook(module, args, output):
            if not self._hidden_active:
                return None
            z = self.state.hidden.to(output.device, output.dtype)  # (d,)
            keep = self._keep.to(output.device)
            x = args[0] * z if pre_scale else args[0]  # (B, T, d)
            y = F.layer_norm(x.index_select(-1, keep), (keep.numel(),), module.weight[keep], module.bias[keep],
                             module.eps)  # (B, T, d')
            return torch.zeros_like(x).index_copy(-1, keep, y) * z
        return hook

    def attach(self) -> GateHooks:
        """Register every hook (idempotent)."""
        if self._handles:
            return self
        if self.adapter.is_decoder:
            self._attach_decoder()
            return self
        a = self.adapter
        h = self._handles
        h.append(a.base.embeddings.LayerNorm.register_forward_hook(self._layer_norm(pre_scale=True)))
        for layer in range(self.shape.layers):
            h.append(a.attention_output(layer).register_forward_pre_hook(self._heads(layer)))
            h.append(a.attention_output(layer).register_forward_hook(self._sublayer("mha", layer)))
            h.append(a.ffn_out(layer).register_forward_pre_hook(self._units(layer)))
            h.append(a.ffn_out(layer).register_forward_hook(self._sublayer("ffn", layer)))
            h.append(a.attention_norm(layer).register_forward_hook(self._layer_norm(pre_scale=False)))
            h.append(a.ffn_norm(layer).register_forward_hook(self._layer_norm(pre_scale=False)))
        return self

    def _attach_decoder(self) -> None:
        a = self.adapter
        h = self._handles
        h.append(a.word_embeddings.register_forward_hook(self._table))
        for layer in range(self.shape.layers):
            h.append(a.attention_output(layer).register_forward_pre_hook(self._heads(layer)))
            h.append(a.ffn_out(layer).register_forward_pre_hook(self._units(layer)))
            for group, inner, branch in branch_ends(a, layer):
                if branch is not inner:  # a post-norm (Gemma3): normalise over the kept dims, then scale
                    h.append(branch.register_forward_hook(self._rms_norm))
                h.append(branch.register_forward_hook(self._sublayer(group, layer)))
            h.append(a.attention_norm(layer).register_forward_hook(self._rms_norm))
            h.append(a.ffn_norm(layer).register_forward_hook(self._rms_norm))
        h.append(a.final_norm.register_forward_hook(self._rms_norm))

    def remove(self) -> None:
        """Remove every hook; the model is exactly as before."""
        while self._handles:
            self._handles.pop().remove()


@contextlib.contextmanager
def gated(model_or_loaded, state: GateState) -> Iterator[GateHooks]:
    """Run `model_or_loaded` (LoadedModel, Adapter or transformers model) with `state` applied.

    No weight is changed; hooks are removed on exit even on error. Yields the `GateHooks` (its
    `.model` is the gated model; `.update(state)` changes the gates inside the block).

        with gated(loaded, GateState.from_closed_heads(loaded, [(0, 1)])):
            logits = loaded.model(**batch).logits
    """
    hooks = GateHooks(model_or_loaded, state)
    hooks.attach()
    try:
        yield hooks
    finally:
        hooks.remove()
