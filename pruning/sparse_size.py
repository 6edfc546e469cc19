"""What a weight-masked model (Wanda's unstructured or 2:4 sparsity) would weigh in a sparse format,
against the dense fp32 weights it really keeps: masks save nothing on the CPU's dense kernels (the zeros
are multiplied like any other number); only a sparse storage format or 2:4 sparse tensor cores (GPU)
turn them into bytes or time.

    CSR   per matrix: fp32 values + int32 column indices of the kept weights + int32 row pointers (rows + 1)
    2:4   per matrix: fp32 values of the kept half + a 2-bit position per kept value (NVIDIA's metadata)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

FP32 = 4  # bytes per value
INDEX = 4  # bytes per int32 index


def is_two_four(mask: torch.Tensor) -> bool:
    """True if every group of 4 consecutive inputs of every row of the (out, in) `mask` keeps exactly 2."""
    return mask.dim() == 2 and mask.shape[1] % 4 == 0 and bool(((mask != 0).reshape(mask.shape[0], -1, 4)
                                                              .sum(-1) == 2).all())


@dataclass(frozen=True)
class SparseSize:
    """Bytes of the masked matrices in each format and of the model's other parameters (dense fp32)."""

    matrices: int  # masked weight matrices
    elements: int  # their entries
    nonzeros: int  # entries the masks keep
    dense_bytes: int  # the masked matrices stored dense, fp32
    csr_bytes: int
    two_four_bytes: int | None  # None unless every mask is 2:4
    other_bytes: int  # every other parameter, dense fp32 (embeddings, norms, biases, unmasked matrices)

    @property
    def sparsity(self) -> float:
        """Fraction of the masked matrices' entries set to zero."""
        return 1 - self.nonzeros / self.elements if self.elements else 0.0

    def describe(self) -> str:
        mb = 1e6
        text = (f"{self.matrices} masked matrices, {self.sparsity:.1%} zeros: dense fp32 "
                f"{self.dense_bytes / mb:.2f} MB, CSR {self.csr_bytes / mb:.2f} MB")
        if self.two_four_bytes is not None:
            text += f", 2:4 {self.two_four_bytes / mb:.2f} MB"
        return text + f" (+ {self.other_bytes / mb:.2f} MB of other parameters, dense)"


def zero_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameter name -> 0/1 nonzero pattern of every nn.Linear weight of `model` holding a zero: the masks
    of a masked model read back from its weights (an exported Wanda run; trained weights hold few exact 0s,
    but a dequantised one, e.g. SmolLM2 from its GGUF, holds ~0.2 %). A tied weight (a decoder's LM head) is
    named as `named_parameters` names it."""
    names = {id(p): name for name, p in model.named_parameters()}
    return {names[id(m.weight)]: (m.weight.detach() != 0).float() for m in model.modules()
            if isinstance(m, nn.Linear) and id(m.weight) in names and bool((m.weight == 0).any())}


def sparse_size(model: nn.Module, masks: dict[str, torch.Tensor]) -> SparseSize:
    """The `SparseSize` of `model` with `masks` (parameter name -> 0/1 tensor of its (out, in) shape)."""
    unknown = sorted(set(masks) - {name for name, _ in model.named_parameters()})
    if unknown:
        raise ValueError(f"The masks name parameters the model does not have: {', '.join(unknown[:3])}.")
    elements = nonzeros = csr = two_four = 0
    all_two_four = bool(masks)
    for mask in masks.values():
        kept = int((mask != 0).sum())
        elements, nonzeros = elements + mask.numel(), nonzeros + kept
        csr += kept * (FP32 + INDEX) + (mask.shape[0] + 1) * INDEX
        all_two_four = all_two_four and is_two_four(mask)
        two_four += kept * FP32 + (kept * 2 + 7) // 8
    masked = {id(model.get_parameter(name)) for name in masks}
    other = sum(p.numel() for p in model.parameters() if id(p) not in masked)  # parameters() lists a tied one once
    return SparseSize(matrices=len(masks), elements=elements, nonzeros=nonzeros, dense_bytes=elements * FP32,
                      csr_bytes=csr, two_four_bytes=two_four if all_two_four else None, other_bytes=other * FP32)
