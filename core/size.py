"""Parameter counts and layer FLOPs per example, read from the actual weight shapes.

Reading shapes (not the config) keeps the numbers right for physically pruned models too.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.adapter import Adapter
from core.lowrank import weight_count


@dataclass
class EncoderFlops:
    """Floating-point operations (multiply and add counted separately) for one example of `seq_len` tokens."""

    seq_len: int
    attention: int  # Q/K/V/output projections plus the T x T score and context products
    ffn: int  # the feed-forward projections (2, or SwiGLU's 3)

    @property
    def total(self) -> int:
        return self.attention + self.ffn

    @property
    def attention_share(self) -> float:
        return self.attention / self.total if self.total else 0.0


def encoder_flops(adapter: Adapter, seq_len: int) -> EncoderFlops:
    """FLOPs of the encoder (or decoder) layers at `seq_len` tokens: their matrix products only.

    Counted: Q, K, V and W_O at their own widths (under GQA K/V have the kept KV heads' rows; the
    per-query-head expansion of unevenly pruned groups is a copy), the full T x T score and context
    products per query head (a decoder's causal mask hides half of them, but eager and SDPA kernels
    compute them all), and every FFN matrix (gate, up, down for SwiGLU). Not counted: embeddings,
    norms, softmax, RoPE, activations, and the classifier or LM head (a prompted decoder's head adds
    2 d V at each row's last token only).
    """
    t = seq_len
    attention = ffn = 0
    for layer in range(len(adapter.layers)):
        q, k, v, o = (adapter.query(layer), adapter.key(layer), adapter.value(layer),
                      adapter.attention_output(layer))
        attention += 2 * t * (weight_count(q) + weight_count(k) + weight_count(v))  # Q, K, V
        attention += 2 * 2 * t * t * q.out_features  # scores QK^T and context AV, summed over query heads
        attention += 2 * t * weight_count(o)  # W_O
        for matrix in (adapter.ffn_gate(layer), adapter.ffn_in(layer), adapter.ffn_out(layer)):
            if matrix is not None:
                ffn += 2 * t * weight_count(matrix)  # in * out, or k (in + out) for a low-rank layer
    return EncoderFlops(seq_len=t, attention=attention, ffn=ffn)
