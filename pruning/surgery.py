"""Physical pruning: turn a `GateState` into a smaller model that computes what the gated model computes.

`prune(loaded, state)` works on a deep copy (the cached model is never touched):

1. fold soft gate values into the weights (head gates into W_O's columns, mha and hidden gates into
   W_O's rows and bias, intermediate gates into the FFN output's columns, ffn and hidden gates into
   its rows and bias, hidden gates into the embedding tables and every LayerNorm's weight and bias);
2. slice every module as the gate state's plan says (`core.structure.apply_plan`, which also
   describes how sublayers with nothing left, MPNet's shared position bias and GQA are handled).

Decoders fold the same gates where their branches end (`_fold_decoder`).
"""

from __future__ import annotations

import copy
import hashlib

import torch

from core.adapter import Adapter, GateShape, as_adapter
from core.loaded import LoadedModel
from core.structure import PruningInfo, PruningPlan, apply_plan, branch_ends, causal_lm
from pruning.gate_state import GateState


@torch.no_grad()
def fold_gates(arch, state: GateState) -> None:
    """Multiply the weights of `arch` (an unpruned model, changed in place!) by the gate values.

    Afterwards the ungated model computes what the gated one did, up to the units whose gate is
    0 (their weights are zeroed; `apply_plan` removes them).
    """
    a = as_adapter(arch)
    s = state.detach()
    if a.is_decoder:
        _fold_decoder(a, s)
        return
    z = s.hidden  # (d,)
    dh = GateShape.of(a).head_dim
    emb = a.base.embeddings
    for table in a.embedding_tables.values():
        table.weight.mul_(z)  # (rows, d): the embedding sum is scaled before its LayerNorm
    emb.LayerNorm.weight.mul_(z)
    emb.LayerNorm.bias.mul_(z)
    for layer in range(len(a.layers)):
        w_o = a.attention_output(layer)  # (d, H*d_h)
        row = z * s.mha[layer]
        w_o.weight.mul_(row[:, None] * s.head[layer].repeat_interleave(dh)[None, :])
        w_o.bias.mul_(row)
        w_out = a.ffn_out(layer)  # (d, d_ff)
        row = z * s.ffn[layer]
        w_out.weight.mul_(row[:, None] * s.intermediate[layer][None, :])
        w_out.bias.mul_(row)
        for norm in (a.attention_norm(layer), a.ffn_norm(layer)):
            norm.weight.mul_(z)
            norm.bias.mul_(z)


def _scale_rms_norm(norm: torch.nn.Module, factor: torch.Tensor, offset: float) -> None:
    """Make an RMSNorm scaling by (offset + w) scale by (offset + w) * factor (d,) instead."""
    norm.weight.copy_((offset + norm.weight) * factor - offset)


def _fold_decoder(a, s: GateState) -> None:
    """Decoders: head / unit gates into the columns of o_proj / down_proj; mha / ffn times hidden gates
    into the branch (the rows and bias of o_proj / down_proj, or the scale of Gemma3's post-norm); the
    hidden gates into the token table's columns. A tied LM head reads the table too, so then the final
    norm's scale is divided by the kept hidden gates: the head sees W z / z = W. Pre-norms need nothing:
    they read the (already scaled) stream and write no stream."""
    z = s.hidden  # (d,)
    offset = a.layout.norm_offset
    dh = GateShape.of(a).head_dim
    table = a.word_embeddings
    head = causal_lm(a.model).get_output_embeddings()
    tied = head.weight is table.weight
    table.weight.mul_(z)  # (V, d)
    if tied:
        _scale_rms_norm(a.final_norm, torch.where(z > 0, 1 / z.clamp_min(1e-30), 1.0), offset)
    for layer in range(len(a.layers)):
        units = {"mha": s.head[layer].repeat_interleave(dh), "ffn": s.intermediate[layer]}  # input gates
        for group, inner, branch in branch_ends(a, layer):
            inner.weight.mul_(units[group][None, :])  # (d, H*d_h) or (d, d_ff)
            row = z * getattr(s, group)[layer]
            if branch is inner:
                inner.weight.mul_(row[:, None])
                if inner.bias is not None:
                    inner.bias.mul_(row)
            else:  # a post-norm (Gemma3): its output is the branch
                _scale_rms_norm(branch, row, offset)


def prune(loaded, state: GateState):
    """A physically pruned copy of `loaded` (a `core.models.LoadedModel`) that computes what
    `pruning.hooks.gated(loaded, state)` computes (to float rounding, ~1e-6).

    Soft gate values are folded into the weights; units with gate 0 are removed (see the module
    docstring for sublayers left empty). `loaded` is not changed. Returns a new `LoadedModel`
    sharing the tokenizer, with `model.headlab_pruning` set and a one-line note of what was kept.
    """
    shape = GateShape.of(loaded)  # ValueError for an already pruned model
    if not isinstance(state, GateState):
        raise ValueError(f"The 'state' parameter of prune() must be a GateState. Got {type(state).__name__} instead.")
    if not state.matches(shape):
        raise ValueError(f"The 'state' parameter of prune() has sizes (layers, heads, d_ff, hidden) {state.shape}; "
                         f"the model has ({shape.layers}, {shape.heads}, {shape.intermediate}, {shape.hidden}).")
    state = state.detach()
    plan = PruningPlan.from_state(state)
    model = copy.deepcopy(loaded.model)
    for module in model.modules():  # hooks on the original (e.g. a `gated` block elsewhere) must not follow
        for hooks in (module._forward_hooks, module._forward_pre_hooks, module._forward_hooks_with_kwargs,
                      module._forward_pre_hooks_with_kwargs, module._forward_hooks_always_called):
            hooks.clear()
        if getattr(module, "_output_capturing_hooks_installed", False):
            # transformers installs its output_attentions / hidden_states hooks once per model, on first
            # use; they were just cleared, so let it install them again on the copy.
            module._output_capturing_hooks_installed = False
    model.eval()
    adapter = Adapter(model)
    if not state.is_dense():  # a dense state changes nothing (and a model of low-rank layers has no weights to fold)
        fold_gates(adapter, state)
        apply_plan(adapter, plan)
    # on the causal LM of a prompted decoder (its PromptClassifier reads it from there)
    causal_lm(model).headlab_pruning = PruningInfo(plan=plan, gate_state=state.to_dict(), original=shape)
    digest = hashlib.sha1(f"{loaded.fingerprint}:{state.to_json()}".encode()).hexdigest()[:12]
    return LoadedModel(
        model=model, tokenizer=loaded.tokenizer, adapter=adapter, source=f"{loaded.source} (pruned)",
        path=loaded.path, label_names=list(loaded.label_names), has_classifier=loaded.has_classifier,
        fingerprint=digest, notes=[*loaded.notes, f"Pruned: {plan.describe(shape)}."], prompt=loaded.prompt,
    )
