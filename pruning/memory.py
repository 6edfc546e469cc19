"""A memory budget check before training starts: refuse a run that cannot fit, with one clear line,
instead of being killed by the out-of-memory killer (or CUDA) half-way through.

The estimate (bytes, fp32 everywhere, so it also bounds a bf16-autocast run on CUDA) of one training
process with P student parameters, P_t teacher parameters, b examples per step of s tokens (the
longest training example, at most max_length: batches pad to their longest, so the batch holding it
is the peak), L layers of hidden size h, a heads and FFN width f:

    weights + gradients + AdamW (2 moments)   4 P (1 + 1 + 2)
    eval snapshot (a pruned copy of the student, at most its size)   4 P
    teacher (a separate copy: distillation and the latency reference)   4 P_t
    activations saved for backward, per layer and token:
        floats  8 h (Q/K/V input, Q, K, V, context, FFN input, both LayerNorm inputs)
              + 2 f (GELU input and output) + 2 a s (softmax output, attention dropout output)
              + (learned gates only) 5 h + f (the gated context, sublayer and hidden outputs, units)
        bytes   a s + 2 h (dropout masks)
      plus the embeddings' h floats + h mask bytes per token;  activations = b s (L * layer + embedding)
    runtime   512 MiB per process (Python, torch, tokenizer; the CUDA context on a GPU)
    total     (sum of the above) * 1.2 (allocator slack)

Gates and Lagrange multipliers (< 0.1% of P) and the teacher's transient no-grad activations fall
within the slack. On the CPU all processes of a node share its memory, so the budget is the
per-process total times the processes on the node; on CUDA each process has its own GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.adapter import GateShape
from core.weights import available_memory

FLOAT = 4  # bytes per fp32 number
RUNTIME = 512 * 2**20  # bytes per process outside the tensors counted here
SLACK = 1.2  # allocator fragmentation and framework buffers
GIB = 2**30


@dataclass
class MemoryEstimate:
    """Peak memory of one training process, in bytes, and what the device has available."""

    weights: int  # student weights + gradients + AdamW moments + the eval snapshot
    teacher: int
    activations: int
    runtime: int
    total: int  # (weights + teacher + activations + runtime) * SLACK, per process
    processes: int  # processes sharing this memory (the node's processes on CPU, 1 per GPU)
    needed: int  # total * processes
    available: int | None  # free bytes on the device now (None: unknown, no check)
    device: str
    batch: int  # examples per process and step
    seq_len: int  # tokens per example (the longest training example)

    @property
    def fits(self) -> bool:
        return self.available is None or self.needed <= self.available

    def message(self) -> str:
        """One line saying what does not fit and what to change."""
        parts = f"weights, gradients, AdamW and snapshot {self.weights / GIB:.1f} GiB, teacher " \
                f"{self.teacher / GIB:.1f} GiB, activations {self.activations / GIB:.1f} GiB for {self.batch} " \
                f"examples x {self.seq_len} tokens, runtime and 20% slack"
        if self.processes > 1:
            parts += f"; {self.total / GIB:.1f} GiB per process x {self.processes} processes"
        return (f"Training needs about {self.needed / GIB:.1f} GiB on {self.device} ({parts}) "
                f"but only {(self.available or 0) / GIB:.1f} GiB are available; lower batch_size or max_length, "
                "use fewer processes or a smaller model.")


def activation_bytes(shape: GateShape, batch: int, seq_len: int, *, gated: bool) -> int:
    """Bytes of activations saved for backward by `batch` examples of `seq_len` tokens (see the module
    docstring); `gated`: the hooks of learned gates save their products too."""
    h, f, a, s = shape.hidden, shape.intermediate, shape.heads, seq_len
    floats = 8 * h + 2 * f + 2 * a * s + (5 * h + f if gated else 0)
    layer = FLOAT * floats + a * s + 2 * h
    embedding = FLOAT * h + h
    return batch * s * (shape.layers * layer + embedding)


def estimate(parameters: int, teacher_parameters: int, shape: GateShape, batch: int, seq_len: int, *,
             gated: bool, device: str = "cpu", processes: int = 1, available: int | None = None) -> MemoryEstimate:
    """The estimate for a student of `parameters` and a teacher of `teacher_parameters` (counts),
    encoder sizes `shape`, `batch` examples of `seq_len` tokens per process and step."""
    weights = FLOAT * parameters * 5  # weights, gradients, 2 AdamW moments, eval snapshot
    teacher = FLOAT * teacher_parameters
    activations = activation_bytes(shape, batch, seq_len, gated=gated)
    total = round((weights + teacher + activations + RUNTIME) * SLACK)
    return MemoryEstimate(weights=weights, teacher=teacher, activations=activations, runtime=RUNTIME, total=total,
                          processes=processes, needed=total * processes, available=available, device=device,
                          batch=batch, seq_len=seq_len)


def available_bytes(device: torch.device) -> int | None:
    """Free memory on `device` in bytes: CUDA's free memory on that GPU, or the CPU's MemAvailable
    (`core.weights.available_memory`); None when the platform does not say."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return available_memory()


def check(memory: MemoryEstimate) -> MemoryEstimate:
    """`memory` if it fits; ValueError with `memory.message()` otherwise."""
    if not memory.fits:
        raise ValueError(memory.message())
    return memory
