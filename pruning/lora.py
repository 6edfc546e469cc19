"""LoRA (Hu et al. 2021) on every layer's projections, through `peft`: train low-rank deltas with the
base weights frozen, then merge them into the weights before anything is folded, sliced or exported.

    W x  ->  W x + (alpha / r) B A dropout(x)        A (r, in) random, B (out, r) zero at the start

The adapted modules are each layer's Q, K, V, W_O and the FFN's projections (SwiGLU's gate, up and
down for decoders; the two dense layers for encoders), found through the model's `core.adapter`.
`add_lora` injects the adapters in place (`peft.inject_adapter_in_model`: the modules stay where
they were, each `nn.Linear` replaced by a peft wrapper with the same input and output, so the gate
hooks of `pruning.hooks` attach to the wrappers and gate the LoRA path too; attach them *after*
`add_lora`) and freezes every other parameter. `merge_lora` folds W + (alpha / r) B A into each
base `nn.Linear` and puts it back in the wrapper's place, so the merged model holds no peft module
(and an exported folder needs no peft). `pruning.surgery.prune` reads and scales the base weights,
so it must only ever see merged models (`merged_copy` for an eval snapshot of a training model).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from core.adapter import Adapter
from core.loaded import LoadedModel

PARTS = ("query", "key", "value", "attention_output", "ffn_gate", "ffn_in", "ffn_out")  # adapter parts LoRA adapts


@dataclass(frozen=True)
class LoraSettings:
    """Rank r (>= 1), scale numerator alpha (> 0; the delta is scaled by alpha / r) and the dropout
    probability on each adapter's input (in [0, 1))."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0


def target_names(adapter: Adapter) -> list[str]:
    """Full module names (from `adapter.model`) of the projections LoRA adapts, layer by layer: those that
    compute a plain `nn.Linear` forward. A sliced model's K/V of a GQA layer whose groups keep unequal
    numbers of query heads expand their output per query head (`core.structure`), which a low-rank delta
    of the Linear's own width would not fit: they keep their weights in a LoRA fine-tune. Projections
    sliced to nothing (a removed block or sublayer) have nothing to adapt and get no adapter."""
    names = {id(module): name for name, module in adapter.model.named_modules()}
    parts = (adapter.part(layer, part) for layer in range(len(adapter.layers)) for part in PARTS)
    return [names[id(m)] for m in parts
            if m is not None and type(m).forward is nn.Linear.forward and m.weight.numel() > 0]


def lora_parameters(adapter: Adapter, rank: int) -> int:
    """Parameters of rank-`rank` adapters on the modules `add_lora` adapts: r (in + out) each."""
    modules = (adapter.model.get_submodule(name) for name in target_names(adapter))
    return sum(rank * (m.in_features + m.out_features) for m in modules)


def add_lora(loaded: LoadedModel, settings: LoraSettings) -> int:
    """Inject LoRA adapters into `loaded.model` in place (see the module docstring); only their
    parameters train afterwards. Returns the number of trainable parameters."""
    if has_lora(loaded.model):
        raise ValueError("The model already has LoRA adapters; merge them first (`merge_lora`).")
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=target_names(loaded.adapter), bias="none")
    inject_adapter_in_model(config, loaded.model)
    return sum(p.numel() for p in loaded.model.parameters() if p.requires_grad)


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA delta of `model` into its base `nn.Linear`, in place, and put the base layer where
    the wrapper was (hooks on the wrappers go with them). Returns `model`; a model without LoRA is
    returned unchanged."""
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge(safe_merge=True)
            model.set_submodule(name, module.get_base_layer())
    if hasattr(model, "peft_config"):  # what `inject_adapter_in_model` recorded on the model
        del model.peft_config
    return model


def merged_copy(loaded: LoadedModel) -> LoadedModel:
    """`loaded` itself without LoRA; else a copy with the deltas merged and no hooks (`loaded` is not
    changed)."""
    if not has_lora(loaded.model):
        return loaded
    model = merge_lora(_copy_without_hooks(loaded.model))
    return dataclasses.replace(loaded, model=model, adapter=Adapter(model), notes=list(loaded.notes))


def _copy_without_hooks(model: nn.Module) -> nn.Module:
    """A deep copy of `model` whose modules have no forward hooks. Hooks that are bound methods (the
    gate hooks') would otherwise be copied with their owner, handles included, and such a copy cannot
    be copied again (as `pruning.surgery.prune` does)."""
    memo = {id(hooks): type(hooks)() for module in model.modules() for hooks in _hook_dicts(module)}
    copied = copy.deepcopy(model, memo)
    for module in copied.modules():
        if getattr(module, "_output_capturing_hooks_installed", False):
            module._output_capturing_hooks_installed = False  # transformers installs them again on first use
    return copied


def _hook_dicts(module: nn.Module) -> tuple[dict, ...]:
    return (module._forward_hooks, module._forward_pre_hooks, module._forward_hooks_with_kwargs,
            module._forward_pre_hooks_with_kwargs, module._forward_hooks_always_called)
