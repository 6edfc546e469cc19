"""One of HeadLab's one-shot methods (its registered object) run outside a training run, as the peers bench
needs it: the method's defaults, a target, calibration examples given by the bench, the result sliced."""

from __future__ import annotations

from dataclasses import fields

import torch

from core.loaded import LoadedModel
from pruning.examples import Examples
from pruning.methods import registry
from pruning.methods.base import MethodContext, OneShotResult
from pruning.surgery import prune


def one_shot(loaded: LoadedModel, method: str, target: float, train, examples: Examples) -> LoadedModel:
    """`method` at `target_sparsity` = `target`, calibrating on all of `examples` (the token ids of `train`, a
    labelled `TextDataset` or documents), sliced from the copy whose weights the method changed where it does
    (e.g. FLAP's bias compensation). ValueError where the method does not apply to `loaded`."""
    cls = registry.get(method)
    wanted = {"target_sparsity": target, "calibration_examples": len(examples)}
    options = cls.Options(**{k: v for k, v in wanted.items() if k in {f.name for f in fields(cls.Options)}})
    cls.check_model(options, loaded)
    context = MethodContext(base=loaded, teacher=loaded, train=train, device=torch.device("cpu"), seed=0,
                            progress=lambda *_: None, examples=examples)
    result = OneShotResult.of(cls(options, context).prune())
    return prune(result.source or loaded, result.state)
