"""A memory budget check before training starts: refuse a run that cannot fit, with one clear line,
instead of being killed by the out-of-memory killer (or CUDA) half-way through.

The estimate (bytes, fp32 everywhere, so it also bounds a bf16-autocast run on CUDA) of one training
process with P student parameters of which T train (T = P, or the LoRA adapters' with LoRA), P_t
teacher parameters, b examples per step of s tokens (the longest training example, at most
max_length plus a decoder's prompt: batches pad to their longest, so the batch holding it is the
peak), L layers of hidden size h, a (query) heads of size d_h, kv key/value heads and FFN width f:

    weights 4 P; gradients + AdamW (2 moments) 4 T (1 + 2)
    eval snapshot (a pruned copy of the student, at most its size)   4 P; with LoRA 8 P (the merged copy
        it is pruned from, then the pruned copy)
    teacher (a separate copy: distillation and the latency reference)   4 P_t
    activations saved for backward, per layer and token:
      encoder (post-LayerNorm, GELU)
        floats  8 h (Q/K/V input, Q, K, V, context, FFN input, both LayerNorm inputs)
              + 2 f (GELU input and output) + 2 a s (softmax output, attention dropout output)
              + (learned gates only) 5 h + f (the gated context, sublayer and hidden outputs, units)
        bytes   a s + 2 h (dropout masks)
      decoder (pre-RMSNorm, RoPE, GQA, SwiGLU; no dropout; no KV cache: training runs use_cache=False)
        floats  4 h (both norms' input and output) + (a + 2 kv) d_h (Q, K, V after RoPE)
              + 2 a d_h (K and V repeated to every query head) + a d_h (the context) + h (W_O's output)
              + 4 f (gate output, its SiLU, up output, their product)
              + 2 a s with eager attention (scores and softmax output; sdpa keeps no attention map)
              + (learned gates only) a d_h + 5 h + f
      LoRA adds, per layer and token, the r-dim output of each adapter's A (7 r for a decoder's
        Q/K/V/O/gate/up/down, 6 r for an encoder's) and, with dropout, a dropped copy of each adapter's
        input (floats) and its mask (bytes): 5 h + a d_h + f numbers for a decoder, 5 h + f for an encoder
      plus, per token: the embeddings' h floats (+ h mask bytes for an encoder), a decoder's final norm
      2 h; with layer matching the teacher's L + 1 hidden states and the matcher's 2 L mapped copies
      (3 L + 1) h; a language-modelling loss keeps 8 V floats of logits (student's, teacher's, their
      log-softmaxes at T and 1, the scored rows' copies, the gradient);
      activations = b s (L * layer + per-token extras)
    runtime   512 MiB per process (Python, torch, tokenizer; the CUDA context on a GPU)
    total     (sum of the above) * 1.2 (allocator slack)

Gates and Lagrange multipliers (< 0.1% of P), CoFi's d x d layer matcher and the teacher's transient
no-grad activations (one layer at a time) fall within the slack. On the CPU all processes of a node
share its memory, so the budget is the per-process total times the processes on the node; on CUDA
each process has its own GPU.
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
LOGIT_COPIES = 8  # (B, T, V) tensors a language-modelling loss with distillation holds at its peak


@dataclass(frozen=True)
class Workload:
    """What a training forward pass keeps beyond the layers' shape (the default: an encoder classifier
    trained in full)."""

    decoder: bool = False
    eager: bool = True  # attention probabilities materialised (a decoder with sdpa keeps none)
    vocab: int = 0  # logits kept per token for the loss: V for language modelling, 0 for a classifier
    hidden_states: bool = False  # layer matching keeps the teacher's hidden states and the matcher's copies
    lora_rank: int = 0  # 0: no LoRA
    lora_dropout: bool = False  # LoRA dropout > 0 (a dropped copy of each adapter's input)


@dataclass
class MemoryEstimate:
    """Peak memory of one training process, in bytes, and what the device has available."""

    weights: int  # student weights + gradients and AdamW moments of the trained ones + the eval snapshot(s)
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


def _layer_bytes(shape: GateShape, s: int, gated: bool, work: Workload) -> int:
    """Bytes one layer saves per token (see the module docstring)."""
    h, f, a, kv, dh = shape.hidden, shape.intermediate, shape.heads, shape.kv_heads, shape.head_dim
    if work.decoder:
        floats = 4 * h + (a + 2 * kv) * dh + 3 * a * dh + h + 4 * f + (2 * a * s if work.eager else 0)
        floats += a * dh + 5 * h + f if gated else 0
        masks, adapters, adapted_inputs = 0, 7, 5 * h + a * dh + f
    else:
        floats = 8 * h + 2 * f + 2 * a * s + (5 * h + f if gated else 0)
        masks, adapters, adapted_inputs = a * s + 2 * h, 6, 5 * h + f
    if work.lora_rank:
        floats += adapters * work.lora_rank + (adapted_inputs if work.lora_dropout else 0)
        masks += adapted_inputs if work.lora_dropout else 0
    return FLOAT * floats + masks


def activation_bytes(shape: GateShape, batch: int, seq_len: int, *, gated: bool,
                     work: Workload = Workload()) -> int:
    """Bytes of activations saved for backward by `batch` examples of `seq_len` tokens (see the module
    docstring); `gated`: the hooks of learned gates save their products too."""
    h, layers = shape.hidden, shape.layers
    token = FLOAT * (h + (2 * h if work.decoder else 0)) + (0 if work.decoder else h)
    token += FLOAT * (3 * layers + 1) * h if work.hidden_states else 0
    token += FLOAT * LOGIT_COPIES * work.vocab
    return batch * seq_len * (layers * _layer_bytes(shape, seq_len, gated, work) + token)


def estimate(parameters: int, teacher_parameters: int, shape: GateShape, batch: int, seq_len: int, *,
             gated: bool, device: str = "cpu", processes: int = 1, available: int | None = None,
             trainable: int | None = None, work: Workload = Workload()) -> MemoryEstimate:
    """The estimate for a student of `parameters`, `trainable` of them with gradients and AdamW moments
    (None: all), and a teacher of `teacher_parameters` (counts); layer sizes `shape`, `batch` examples
    of `seq_len` tokens per process and step, the forward pass described by `work`."""
    trainable = parameters if trainable is None else trainable
    snapshots = 2 if work.lora_rank else 1
    weights = FLOAT * (parameters * (1 + snapshots) + trainable * 3)  # weights, snapshot(s); grads, 2 moments
    teacher = FLOAT * teacher_parameters
    activations = activation_bytes(shape, batch, seq_len, gated=gated, work=work)
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
