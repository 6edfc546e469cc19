"""Layer-by-layer calibration, as Wanda's and Wanda-sp's authors run it: layer l's Linear inputs are
measured on what the *already pruned* layers 0..l-1 output, then the method prunes layer l (changes its
weights in place) and its new outputs feed layer l + 1.

One forward pass of the whole model records each layer's call (its hidden-state input for layer 0, the
other arguments for every layer: attention masks, position embeddings, ... which do not depend on the
hidden states), stopping after the last layer; then each layer runs twice on the calibration batches
(statistics, then its pruned outputs). Cost: about two passes of the layer stack, no LM head.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from core.adapter import Adapter
from core.loaded import LoadedModel
from pruning.calibration import Batch, InputStats, run
from pruning.examples import Examples

LayerLinears = Callable[[int], dict[str, torch.nn.Linear]]  # layer -> the Linears to measure (name -> module)
Prune = Callable[[int, dict[str, InputStats]], None]  # layer, its Linears' input statistics -> change the weights


def editable_copy(loaded: LoadedModel, tag: str) -> LoadedModel:
    """A copy of `loaded` whose weights a method may change (eval mode, hooks not copied: `loaded` has
    none during a run); its fingerprint is `loaded`'s with `tag` mixed in (a `pruning.surgery.prune` of it
    is then not taken for one of `loaded`)."""
    model = copy.deepcopy(loaded.model).eval()
    digest = hashlib.sha1(f"{loaded.fingerprint}:{tag}".encode()).hexdigest()[:12]
    return dataclasses.replace(loaded, model=model, adapter=Adapter(model), fingerprint=digest,
                               notes=list(loaded.notes))


class _Stop(Exception):
    """Raised after the last layer: the calibration pass needs nothing beyond it."""


@dataclass
class _Call:
    """One recorded layer call: positional arguments after the hidden states, keyword arguments."""

    args: tuple
    kwargs: dict


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _record_calls(loaded: LoadedModel, examples: Examples, calibration: list[Batch]):
    """The input (B, T, d) of layer 0 per batch and every layer's other call arguments per batch."""
    layers = loaded.adapter.layers
    inputs: list[torch.Tensor] = []
    calls: list[list[_Call]] = [[] for _ in layers]

    def recorder(index: int):
        def hook(module, args, kwargs):
            if index == 0:
                inputs.append(_hidden(args, kwargs))
            calls[index].append(_Call(args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        return hook

    def stop(module, args, output):
        raise _Stop

    handles = [layer.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles.append(layers[-1].register_forward_hook(stop))
    try:
        with torch.no_grad():
            for batch in calibration:
                try:
                    run(loaded, examples, batch)
                except _Stop:
                    pass
    finally:
        for handle in handles:
            handle.remove()
    return inputs, calls


def _layer_output(layer: torch.nn.Module, hidden: torch.Tensor, call: _Call) -> torch.Tensor:
    out = layer(hidden, *call.args, **call.kwargs)
    return out[0] if isinstance(out, tuple) else out


def sequential_prune(loaded: LoadedModel, examples: Examples, calibration: list[Batch], linears: LayerLinears,
                     prune: Prune, progress: Callable[[int, int, str], None] | None = None) -> None:
    """Prune `loaded` (changed in place: pass a copy) layer by layer: for each layer l, the input
    statistics (`pruning.calibration.InputStats` over the real, unpadded tokens) of `linears(l)` on the
    calibration batches as layers 0..l-1 are after pruning, then `prune(l, stats)`, which changes layer l's
    weights; its outputs are then recomputed for layer l + 1."""
    inputs, calls = _record_calls(loaded, examples, calibration)
    masks = [batch[0]["attention_mask"].bool() for batch in calibration]
    hidden = list(inputs)
    layers = loaded.adapter.layers
    with torch.no_grad():
        for index, layer in enumerate(layers):
            prune(index, _measure(layer, hidden, calls[index], masks, linears(index)))
            hidden = [_layer_output(layer, hidden[b], call) for b, call in enumerate(calls[index])]
            if progress is not None:
                progress(index + 1, len(layers), f"layer {index + 1}/{len(layers)} pruned")


def _measure(layer: torch.nn.Module, hidden: list[torch.Tensor], calls: list[_Call], masks: list[torch.Tensor],
             modules: dict[str, torch.nn.Linear]) -> dict[str, InputStats]:
    """Input statistics of `modules` (inside `layer`) over the real tokens of `layer` run on each batch
    `hidden[b]` (B, T, d) with its recorded call and (B, T) attention mask."""
    stats = {name: InputStats() for name in modules}
    current: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, args):
            stats[name].add(args[0][current["mask"]])  # (B, T, in) -> (tokens, in)
        return record

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in modules.items()]
    try:
        for b, call in enumerate(calls):
            current["mask"] = masks[b]
            _layer_output(layer, hidden[b], call)
    finally:
        for handle in handles:
            handle.remove()
    return stats
