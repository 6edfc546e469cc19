"""The one place that knows where an architecture keeps its parts: a `Layout` per model type and the
`Adapter` that reads a loaded model through it; `GateShape`, the unit counts of an unpruned model.

Everything else (analysis, gates, surgery, export) reaches a model's heads, Q/K/V/O, FFN and norms
through the adapter, never by attribute paths of its own.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedModel

from core.errors import ModelError


@dataclass(frozen=True)
class Layout:
    """Where one architecture keeps the parts of a transformer layer: dotted attribute paths.

    `family` is "encoder" (post-LayerNorm, BERT style: each sublayer ends in LN(branch + x)) or
    "decoder" (pre-norm, Llama style: x + branch(norm(x)), then a final norm before the LM head).
    Paths are relative to layer l (`base.<layers>[l]`), except the Q/K/V names, which are relative
    to `self_attention`, and `embedding_tables`, `embedding_norm`, `final_norm`, `relative_bias`,
    which are relative to `base`.
    """

    family: str
    layers: str  # the ModuleList of layers, from `base`
    self_attention: str
    query: str  # Q/K/V projections: rows = heads x head_dim (K/V: KV heads x head_dim under GQA)
    key: str
    value: str
    attention_output: str  # W_O: columns = heads x head_dim
    attention_norm: str  # encoder: the LayerNorm closing the attention sublayer; decoder: the norm opening it
    ffn_in: str  # encoder: the FFN's first dense; decoder: SwiGLU's up projection
    ffn_out: str  # the FFN's last dense (columns = FFN units)
    ffn_norm: str  # encoder: the LayerNorm closing the FFN; decoder: the norm opening it
    embedding_tables: tuple[str, ...]  # tables summed into the stream (paths from `base`)
    pluggable_attention: bool  # attention runs through transformers' AttentionInterface
    embedding_norm: str | None = None  # the LayerNorm over the embedding sum (encoders)
    final_norm: str | None = None  # the norm before the LM head (decoders)
    ffn_gate: str | None = None  # SwiGLU's gate projection: its rows go with `ffn_in`'s
    attention_branch: str | None = None  # module whose output the residual adds, if not W_O (Gemma3's post-norm)
    ffn_branch: str | None = None  # likewise for the FFN, if not `ffn_out`
    norm_offset: float = 0.0  # RMSNorm scales by (offset + weight): 1 for Gemma
    relative_bias: str | None = None  # a relative position bias table shared by all layers


# `modeling_bert` and its copies (RoBERTa, XLM-R, ELECTRA; MiniLM is a BertModel).
BERT_LAYOUT = Layout(
    family="encoder", layers="encoder.layer",
    self_attention="attention.self", query="query", key="key", value="value",
    attention_output="attention.output.dense", attention_norm="attention.output.LayerNorm",
    ffn_in="intermediate.dense", ffn_out="output.dense", ffn_norm="output.LayerNorm",
    embedding_tables=("embeddings.word_embeddings", "embeddings.position_embeddings",
                      "embeddings.token_type_embeddings"),
    pluggable_attention=True, embedding_norm="embeddings.LayerNorm",
)
# `modeling_mpnet`: W_O (`o`) lives inside the self-attention next to q/k/v; no token types; one
# (buckets, heads) relative position bias computed once per forward and added to every layer's scores.
MPNET_LAYOUT = Layout(
    family="encoder", layers="encoder.layer",
    self_attention="attention.attn", query="q", key="k", value="v",
    attention_output="attention.attn.o", attention_norm="attention.LayerNorm",
    ffn_in="intermediate.dense", ffn_out="output.dense", ffn_norm="output.LayerNorm",
    embedding_tables=("embeddings.word_embeddings", "embeddings.position_embeddings"), pluggable_attention=False,
    embedding_norm="embeddings.LayerNorm", relative_bias="encoder.relative_attention_bias",
)
# `modeling_llama` and its copies (Qwen2 adds Q/K/V biases): pre-norm RMSNorm, RoPE, GQA, SwiGLU
# down(silu(gate(x)) * up(x)); the LM head may share the token table (tied embeddings).
LLAMA_LAYOUT = Layout(
    family="decoder", layers="layers",
    self_attention="self_attn", query="q_proj", key="k_proj", value="v_proj",
    attention_output="self_attn.o_proj", attention_norm="input_layernorm",
    ffn_in="mlp.up_proj", ffn_out="mlp.down_proj", ffn_norm="post_attention_layernorm",
    embedding_tables=("embed_tokens",), pluggable_attention=True, final_norm="norm", ffn_gate="mlp.gate_proj",
)
# `modeling_gemma3` (text): "sandwich" norms — each branch output is RMS-normalised again before the
# residual adds it — RMSNorm scales by (1 + w), the token table is scaled by sqrt(d), Q/K get per-head norms.
GEMMA3_LAYOUT = Layout(
    family="decoder", layers="layers",
    self_attention="self_attn", query="q_proj", key="k_proj", value="v_proj",
    attention_output="self_attn.o_proj", attention_norm="input_layernorm",
    ffn_in="mlp.up_proj", ffn_out="mlp.down_proj", ffn_norm="pre_feedforward_layernorm",
    embedding_tables=("embed_tokens",), pluggable_attention=True, final_norm="norm", ffn_gate="mlp.gate_proj",
    attention_branch="post_attention_layernorm", ffn_branch="post_feedforward_layernorm", norm_offset=1.0,
)
LAYOUTS = {"bert": BERT_LAYOUT, "roberta": BERT_LAYOUT, "electra": BERT_LAYOUT, "xlm-roberta": BERT_LAYOUT,
           "mpnet": MPNET_LAYOUT, "llama": LLAMA_LAYOUT, "qwen2": LLAMA_LAYOUT, "gemma3_text": GEMMA3_LAYOUT}
SUPPORTED_MODEL_TYPES = tuple(LAYOUTS)
DECODER_MODEL_TYPES = tuple(name for name, layout in LAYOUTS.items() if layout.family == "decoder")


def unsupported(model_type: str) -> ModelError:
    return ModelError(
        f"Unsupported architecture '{model_type}'; HeadLab supports BERT-family encoders "
        f"({', '.join(t for t in SUPPORTED_MODEL_TYPES if t not in DECODER_MODEL_TYPES)}) and Llama-family "
        f"decoders ({', '.join(DECODER_MODEL_TYPES)})."
    )


def _descend(module: torch.nn.Module, path: str) -> torch.nn.Module:
    """`module.a.b.c` for path "a.b.c" ("" is the module itself)."""
    return functools.reduce(getattr, path.split("."), module) if path else module


@dataclass
class Adapter:
    """The one place that knows where a model keeps its parts.

    Layer l is `base.<layout.layers>[l]`; inside it the parts sit where the `Layout` of the model's
    type says (BERT, RoBERTa, MiniLM and ELECTRA share `BERT_LAYOUT`, MPNet has `MPNET_LAYOUT`,
    Llama/Qwen2 `LLAMA_LAYOUT`, Gemma3 `GEMMA3_LAYOUT`). Raises `ModelError` for a model type without
    a layout. Optional parts (`ffn_gate`, ...) are None where the architecture has none.
    """

    model: PreTrainedModel
    layout: Layout = field(init=False)

    PARTS = ("self_attention", "query", "key", "value", "attention_output", "attention_norm", "ffn_in", "ffn_out",
             "ffn_norm", "ffn_gate", "attention_branch", "ffn_branch")

    def __post_init__(self) -> None:
        model_type = self.model.config.model_type
        if model_type not in LAYOUTS:
            raise unsupported(model_type)
        self.layout = LAYOUTS[model_type]

    @property
    def is_decoder(self) -> bool:
        return self.layout.family == "decoder"

    @property
    def base(self) -> torch.nn.Module:
        return self.model.base_model

    @property
    def layers(self) -> torch.nn.ModuleList:
        return _descend(self.base, self.layout.layers)

    def _path(self, name: str) -> str | None:
        if name not in self.PARTS:
            raise ValueError(f"The 'name' parameter must be one of {', '.join(self.PARTS)}. Got {name!r} instead.")
        path = getattr(self.layout, name)
        if name in ("attention_branch", "ffn_branch") and path is None:
            return self._path("attention_output" if name == "attention_branch" else "ffn_out")
        return f"{self.layout.self_attention}.{path}" if name in ("query", "key", "value") else path

    def part(self, layer: int, name: str) -> torch.nn.Module | None:
        """The module `name` (one of `PARTS`) of layer `layer`; None for a part the layout lacks."""
        path = self._path(name)
        return None if path is None else _descend(self.layers[layer], path)

    def set_part(self, layer: int, name: str, module: torch.nn.Module) -> None:
        """Put `module` in place of part `name` of layer `layer` (physical pruning)."""
        parent, _, attr = self._path(name).rpartition(".")
        setattr(_descend(self.layers[layer], parent), attr, module)

    def self_attention(self, layer: int) -> torch.nn.Module:
        """The module holding Q/K/V (and the head size `attention_head_size` or `head_dim`)."""
        return self.part(layer, "self_attention")

    def query(self, layer: int) -> torch.nn.Linear:
        """Q of layer `layer`, (H*d_h, d); `key` and `value` alike, (H_kv*d_h, d)."""
        return self.part(layer, "query")

    def key(self, layer: int) -> torch.nn.Linear:
        return self.part(layer, "key")

    def value(self, layer: int) -> torch.nn.Linear:
        return self.part(layer, "value")

    def attention_output(self, layer: int) -> torch.nn.Linear:
        """W_O of layer `layer`: its input is the concatenated per-head context (B, T, H*d_h)."""
        return self.part(layer, "attention_output")

    def attention_norm(self, layer: int) -> torch.nn.Module:
        """Encoder: the LayerNorm closing the attention sublayer; decoder: the RMSNorm opening it."""
        return self.part(layer, "attention_norm")

    def ffn_in(self, layer: int) -> torch.nn.Linear:
        """The FFN's first dense (decoders: the up projection), (d_ff, d)."""
        return self.part(layer, "ffn_in")

    def ffn_gate(self, layer: int) -> torch.nn.Linear | None:
        """SwiGLU's gate projection (d_ff, d), None for a plain two-layer FFN."""
        return self.part(layer, "ffn_gate")

    def ffn_out(self, layer: int) -> torch.nn.Linear:
        return self.part(layer, "ffn_out")

    def ffn_norm(self, layer: int) -> torch.nn.Module:
        return self.part(layer, "ffn_norm")

    def attention_branch(self, layer: int) -> torch.nn.Module:
        """The module whose output (B, T, d) is the attention sublayer's contribution to the stream."""
        return self.part(layer, "attention_branch")

    def ffn_branch(self, layer: int) -> torch.nn.Module:
        return self.part(layer, "ffn_branch")

    def head_dim(self, layer: int) -> int:
        attention = self.self_attention(layer)
        return int(getattr(attention, "attention_head_size", None) or attention.head_dim)

    def num_heads(self, layer: int) -> int:
        """Query heads of `layer` (read from Q's rows, so right for pruned layers too)."""
        return self.query(layer).out_features // self.head_dim(layer)

    def num_kv_heads(self, layer: int) -> int:
        """Key/value heads of `layer` (= `num_heads` without GQA)."""
        return self.key(layer).out_features // self.head_dim(layer)

    @property
    def embedding_tables(self) -> dict[str, torch.nn.Embedding]:
        """Path (from `base`) -> table of the embeddings summed into the stream, each (rows, d)."""
        return {path: _descend(self.base, path) for path in self.layout.embedding_tables}

    @property
    def word_embeddings(self) -> torch.nn.Embedding:
        """The token table (V, d) (the first of `embedding_tables`)."""
        return _descend(self.base, self.layout.embedding_tables[0])

    @property
    def embeddings(self) -> torch.nn.Module:
        """The module whose output is the stream before layer 0: `base.embeddings` (encoders; it ends
        in `embedding_norm`) or the token table (decoders)."""
        return _descend(self.base, self.layout.embedding_tables[0].rpartition(".")[0]) if not self.is_decoder \
            else self.word_embeddings

    @property
    def embedding_norm(self) -> torch.nn.LayerNorm | None:
        return _descend(self.base, self.layout.embedding_norm) if self.layout.embedding_norm else None

    @property
    def final_norm(self) -> torch.nn.Module | None:
        return _descend(self.base, self.layout.final_norm) if self.layout.final_norm else None

    @property
    def relative_bias(self) -> torch.nn.Embedding | None:
        """The relative position bias table (buckets, H) shared by every layer (MPNet), else None."""
        return _descend(self.base, self.layout.relative_bias) if self.layout.relative_bias else None


@dataclass(frozen=True)
class GateShape:
    """Sizes of an unpruned model: `layers` x `heads` (query) heads of `head_dim`, FFN width, hidden size;
    `kv_heads` key/value heads per layer (fewer than `heads` under GQA: query head h reads KV head
    h // (heads // kv_heads))."""

    layers: int
    heads: int
    head_dim: int
    intermediate: int  # d_ff
    hidden: int  # d
    kv_heads: int | None = None  # None: = heads

    def __post_init__(self) -> None:
        if self.kv_heads is None:
            object.__setattr__(self, "kv_heads", self.heads)

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 without GQA)."""
        return self.heads // self.kv_heads if self.kv_heads else 1

    @classmethod
    def of(cls, arch) -> GateShape:
        """Shape of a `LoadedModel`, `Adapter`, transformers model or GateShape (read from weight shapes).

        Raises ValueError for a physically pruned model (layers of unequal width): gate the original.
        """
        if isinstance(arch, GateShape):
            return arch
        adapter = as_adapter(arch)
        layers = len(adapter.layers)
        if getattr(adapter.model, "headlab_pruning", None) is not None:
            raise ValueError("This model is already physically pruned; gates apply to the original (unpruned) model.")
        heads = {adapter.num_heads(i) for i in range(layers)}
        units = {adapter.ffn_in(i).out_features for i in range(layers)}  # (a low-rank layer has them too)
        hidden = adapter.attention_output(0).out_features  # rows of W_O = hidden size d
        if len(heads) != 1 or len(units) != 1:
            raise ValueError("Gates need layers of equal width (an unpruned model). "
                             f"Got heads per layer {sorted(heads)} and FFN widths {sorted(units)}.")
        return cls(layers=layers, heads=heads.pop(), head_dim=adapter.head_dim(0), intermediate=units.pop(),
                   hidden=hidden, kv_heads=adapter.num_kv_heads(0))


def as_adapter(arch):
    """The `Adapter` of a LoadedModel, an Adapter, or a bare transformers model."""
    if isinstance(arch, Adapter):
        return arch
    if hasattr(arch, "adapter"):
        return arch.adapter
    if isinstance(arch, nn.Module) and hasattr(arch, "base_model"):
        return Adapter(arch)
    raise ValueError(f"Expected a LoadedModel, an Adapter or a transformers model. Got {type(arch).__name__}.")
