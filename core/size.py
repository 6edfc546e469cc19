"""Parameter counts and encoder FLOPs per example, read from the actual weight shapes.

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
    ffn: int  # both feed-forward projections

    @property
    def total(self) -> int:
        return self.attention + self.ffn

    @property
    def attention_share(self) -> float:
        return self.attention / self.total if self.total else 0.0


def encoder_flops(adapter: Adapter, seq_len: int) -> EncoderFlops:
    """FLOPs of the encoder layers (embeddings and classifier excluded) at `seq_len` tokens."""
    t = seq_len
    attention = ffn = 0
    for layer in range(len(adapter.layers)):
        inner, hidden = adapter.query(layer).weight.shape  # (H*d_h, d)
        attention += 2 * t * hidden * inner * 3  # Q, K, V
        attention += 2 * 2 * t * t * inner  # scores QK^T and context AV, summed over heads
        attention += 2 * t * inner * adapter.attention_output(layer).weight.shape[0]  # W_O
        units, hidden_in = adapter.ffn_in(layer).weight.shape  # (d_ff, d)
        ffn += 2 * t * hidden_in * units + 2 * t * units * adapter.ffn_out(layer).weight.shape[0]
    return EncoderFlops(seq_len=t, attention=attention, ffn=ffn)
