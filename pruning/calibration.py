"""Calibration passes of the one-shot methods: a few training examples through the unpruned model, and
what the methods read from them.

    batches          seeded examples of the run's training split as (inputs, targets) batches
    linear_inputs    per nn.Linear: statistics of its input features over the real (unpadded) tokens:
                     count n, sum, sum of squares (Wanda's ||X_j||_2 = sqrt(sum of squares), FLAP's
                     mean and variance) and optionally the Gram matrix X^T X (ZipLM's OBS Hessian 2 X^T X)
    stream           the residual stream at every layer boundary, L + 1 tensors (B, T, d) per batch
                     (ShortGPT's Block Influence, LaCo's similarity check)

Everything runs under `torch.no_grad()` on the model as it is (eval mode, the CPU copy of the run).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from core.loaded import LoadedModel
from pruning.distill import layer_outputs
from pruning.examples import Examples

Batch = tuple[dict[str, torch.Tensor], torch.Tensor]


def batches(examples: Examples, n: int, batch_size: int, seed: int) -> list[Batch]:
    """`n` examples (all if fewer) drawn without replacement (seeded), in batches of `batch_size`:
    (input_ids, attention_mask) and their targets ((B,) class ids, or (B, T) next tokens)."""
    if n < 1 or batch_size < 1:
        raise ValueError(f"Calibration needs at least one example and a batch size of 1 or more; got n={n}, "
                         f"batch_size={batch_size}.")
    order = np.random.default_rng(seed).permutation(len(examples))[:n]
    return [examples.batch(order[i:i + batch_size]) for i in range(0, len(order), batch_size)]


def module_of(loaded: LoadedModel, examples: Examples) -> torch.nn.Module:
    """What a batch of `examples` is fed to: the causal LM for language modelling, else the classifier
    (an encoder's head, or a decoder's prompt classifier)."""
    return loaded.lm if examples.language_modelling else loaded.model


def run(loaded: LoadedModel, examples: Examples, batch: Batch):
    """The outputs of `loaded` on one calibration batch (logits (B, C) or (B, T, V))."""
    kwargs = {"use_cache": False} if examples.language_modelling else {}
    return module_of(loaded, examples)(**batch[0], **kwargs)


@dataclass
class InputStats:
    """Statistics of one linear layer's input features over n tokens: sums (in,), squares (in,) and,
    when asked for, the Gram matrix (in, in), all float64."""

    n: int = 0
    sum: torch.Tensor | None = None
    squares: torch.Tensor | None = None
    gram: torch.Tensor | None = None
    with_gram: bool = field(default=False, repr=False)

    def add(self, x: torch.Tensor) -> None:
        """Add (N, in) tokens."""
        x = x.detach().double()
        if self.sum is None:
            self.sum, self.squares = x.sum(0), (x * x).sum(0)
            self.gram = x.T @ x if self.with_gram else None
        else:
            self.sum += x.sum(0)
            self.squares += (x * x).sum(0)
            if self.with_gram:
                self.gram += x.T @ x
        self.n += x.shape[0]

    @property
    def norm(self) -> torch.Tensor:
        """(in,) ||X_j||_2 over the tokens (Wanda)."""
        return self.squares.sqrt()

    @property
    def mean(self) -> torch.Tensor:
        """(in,) mean of each feature."""
        return self.sum / self.n

    @property
    def variance(self) -> torch.Tensor:
        """(in,) unbiased sample variance of each feature (FLAP's fluctuation), 0 for a single token."""
        if self.n < 2:
            return torch.zeros_like(self.sum)
        return ((self.squares - self.sum ** 2 / self.n) / (self.n - 1)).clamp_min(0)


def linear_inputs(loaded: LoadedModel, examples: Examples, calibration: list[Batch],
                  linears: dict[str, torch.nn.Linear], gram: bool | set[str] = False) -> dict[str, InputStats]:
    """Input statistics of each of `linears` (name -> module of `loaded`) over the real tokens of the
    `calibration` batches (padding positions are left out). `gram`: True for all, or the names whose
    Gram matrix X^T X is kept."""
    stats = {name: InputStats(with_gram=gram is True or (bool(gram) and name in gram)) for name in linears}
    current: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, args):
            x = args[0]  # (B, T, in)
            stats[name].add(x[current["mask"]] if x.dim() == 3 else x.reshape(-1, x.shape[-1]))
        return record

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in linears.items()]
    try:
        with torch.no_grad():
            for batch in calibration:
                current["mask"] = batch[0]["attention_mask"].bool()
                run(loaded, examples, batch)
    finally:
        for handle in handles:
            handle.remove()
    return stats


def stream(loaded: LoadedModel, examples: Examples, batch: Batch) -> list[torch.Tensor]:
    """The residual stream of `loaded` on `batch` at each layer boundary: L + 1 tensors (B, T, d) (the
    input of layer 0, then each layer's output; an encoder's after its LayerNorms)."""
    with torch.no_grad(), layer_outputs(loaded.adapter) as states:
        run(loaded, examples, batch)
    return list(states)
