"""Parameter counts and layer FLOPs per example, read from the actual weight shapes.

Reading shapes (not the config) keeps the numbers right for physically pruned models too.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.adapter import Adapter


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
        inner, hidden = adapter.query(layer).weight.shape  # (H*d_h, d)
        kv = adapter.key(layer).weight.shape[0]  # (H_kv*d_h): = inner without GQA
        attention += 2 * t * hidden * (inner + 2 * kv)  # Q, K, V
        attention += 2 * 2 * t * t * inner  # scores QK^T and context AV, summed over query heads
        attention += 2 * t * inner * adapter.attention_output(layer).weight.shape[0]  # W_O
        for matrix in (adapter.ffn_gate(layer), adapter.ffn_in(layer), adapter.ffn_out(layer)):
            if matrix is not None:
                ffn += 2 * t * matrix.weight.numel()  # (out, in)
    return EncoderFlops(seq_len=t, attention=attention, ffn=ffn)
