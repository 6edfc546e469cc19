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
    """Where one architecture keeps the parts of an encoder layer: dotted attribute paths.

    Paths are relative to layer l (`base.encoder.layer[l]`), except the Q/K/V names, which are
    relative to `self_attention` (the module that also holds `num_attention_heads` and
    `attention_head_size`).
    """

    self_attention: str
    query: str  # Q/K/V projections: rows = heads x head_dim
    key: str
    value: str
    attention_output: str  # W_O: columns = heads x head_dim
    attention_norm: str  # the LayerNorm closing the attention sublayer: LN(W_O(ctx) + x)
    ffn_in: str
    ffn_out: str
    ffn_norm: str  # the LayerNorm closing the FFN sublayer
    embedding_tables: tuple[str, ...]  # `base.embeddings` tables summed before the embedding LayerNorm
    pluggable_attention: bool  # attention runs through transformers' AttentionInterface
    relative_bias: str | None = None  # path from `base` of a relative position bias table shared by all layers


# `modeling_bert` and its copies (RoBERTa, XLM-R, ELECTRA; MiniLM is a BertModel).
BERT_LAYOUT = Layout(
    self_attention="attention.self", query="query", key="key", value="value",
    attention_output="attention.output.dense", attention_norm="attention.output.LayerNorm",
    ffn_in="intermediate.dense", ffn_out="output.dense", ffn_norm="output.LayerNorm",
    embedding_tables=("word_embeddings", "position_embeddings", "token_type_embeddings"), pluggable_attention=True,
)
# `modeling_mpnet`: W_O (`o`) lives inside the self-attention next to q/k/v; no token types; one
# (buckets, heads) relative position bias computed once per forward and added to every layer's scores.
MPNET_LAYOUT = Layout(
    self_attention="attention.attn", query="q", key="k", value="v",
    attention_output="attention.attn.o", attention_norm="attention.LayerNorm",
    ffn_in="intermediate.dense", ffn_out="output.dense", ffn_norm="output.LayerNorm",
    embedding_tables=("word_embeddings", "position_embeddings"), pluggable_attention=False,
    relative_bias="encoder.relative_attention_bias",
)
LAYOUTS = {"bert": BERT_LAYOUT, "roberta": BERT_LAYOUT, "electra": BERT_LAYOUT, "xlm-roberta": BERT_LAYOUT,
           "mpnet": MPNET_LAYOUT}
SUPPORTED_MODEL_TYPES = tuple(LAYOUTS)


def unsupported(model_type: str) -> ModelError:
    return ModelError(
        f"Unsupported architecture '{model_type}'; HeadLab supports BERT-family encoders: "
        f"{', '.join(SUPPORTED_MODEL_TYPES)}."
    )


def _descend(module: torch.nn.Module, path: str) -> torch.nn.Module:
    """`module.a.b.c` for path "a.b.c" ("" is the module itself)."""
    return functools.reduce(getattr, path.split("."), module) if path else module


@dataclass
class Adapter:
    """The one place that knows where a BERT-family encoder keeps its parts.

    Layer l is `base.encoder.layer[l]`; inside it the parts sit where the `Layout` of the model's
    type says (BERT, RoBERTa, MiniLM and ELECTRA share `BERT_LAYOUT`, MPNet has `MPNET_LAYOUT`).
    Raises `ModelError` for a model type without a layout.
    """

    model: PreTrainedModel
    layout: Layout = field(init=False)

    PARTS = ("self_attention", "query", "key", "value", "attention_output", "attention_norm", "ffn_in", "ffn_out",
             "ffn_norm")

    def __post_init__(self) -> None:
        model_type = self.model.config.model_type
        if model_type not in LAYOUTS:
            raise unsupported(model_type)
        self.layout = LAYOUTS[model_type]

    @property
    def base(self) -> torch.nn.Module:
        return self.model.base_model

    @property
    def layers(self) -> torch.nn.ModuleList:
        return self.base.encoder.layer

    def _path(self, name: str) -> str:
        if name not in self.PARTS:
            raise ValueError(f"The 'name' parameter must be one of {', '.join(self.PARTS)}. Got {name!r} instead.")
        path = getattr(self.layout, name)
        return f"{self.layout.self_attention}.{path}" if name in ("query", "key", "value") else path

    def part(self, layer: int, name: str) -> torch.nn.Module:
        """The module `name` (one of `PARTS`) of layer `layer`."""
        return _descend(self.layers[layer], self._path(name))

    def set_part(self, layer: int, name: str, module: torch.nn.Module) -> None:
        """Put `module` in place of part `name` of layer `layer` (physical pruning)."""
        parent, _, attr = self._path(name).rpartition(".")
        setattr(_descend(self.layers[layer], parent), attr, module)

    def self_attention(self, layer: int) -> torch.nn.Module:
        """The module holding Q/K/V and the head counts `num_attention_heads`, `attention_head_size`."""
        return self.part(layer, "self_attention")

    def query(self, layer: int) -> torch.nn.Linear:
        """Q of layer `layer`, (H*d_h, d); `key` and `value` alike."""
        return self.part(layer, "query")

    def key(self, layer: int) -> torch.nn.Linear:
        return self.part(layer, "key")

    def value(self, layer: int) -> torch.nn.Linear:
        return self.part(layer, "value")

    def attention_output(self, layer: int) -> torch.nn.Linear:
        """W_O of layer `layer`: its input is the concatenated per-head context (B, T, H*d_h)."""
        return self.part(layer, "attention_output")

    def attention_norm(self, layer: int) -> torch.nn.LayerNorm:
        return self.part(layer, "attention_norm")

    def ffn_in(self, layer: int) -> torch.nn.Linear:
        return self.part(layer, "ffn_in")

    def ffn_out(self, layer: int) -> torch.nn.Linear:
        return self.part(layer, "ffn_out")

    def ffn_norm(self, layer: int) -> torch.nn.LayerNorm:
        return self.part(layer, "ffn_norm")

    def num_heads(self, layer: int) -> int:
        return self.self_attention(layer).num_attention_heads

    def head_dim(self, layer: int) -> int:
        return self.self_attention(layer).attention_head_size

    @property
    def embedding_tables(self) -> dict[str, torch.nn.Embedding]:
        """Name -> table of the embeddings summed before `base.embeddings.LayerNorm`, each (rows, d)."""
        return {name: getattr(self.base.embeddings, name) for name in self.layout.embedding_tables}

    @property
    def relative_bias(self) -> torch.nn.Embedding | None:
        """The relative position bias table (buckets, H) shared by every layer (MPNet), else None."""
        return _descend(self.base, self.layout.relative_bias) if self.layout.relative_bias else None


@dataclass(frozen=True)
class GateShape:
    """Sizes of an unpruned encoder: `layers` x `heads` heads of `head_dim`, FFN width, hidden size."""

    layers: int
    heads: int
    head_dim: int
    intermediate: int  # d_ff
    hidden: int  # d

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
        units = {adapter.ffn_in(i).weight.shape[0] for i in range(layers)}
        hidden = adapter.attention_output(0).weight.shape[0]  # rows of W_O = hidden size d
        if len(heads) != 1 or len(units) != 1:
            raise ValueError("Gates need layers of equal width (an unpruned model). "
                             f"Got heads per layer {sorted(heads)} and FFN widths {sorted(units)}.")
        return cls(layers=layers, heads=heads.pop(), head_dim=adapter.head_dim(0), intermediate=units.pop(),
                   hidden=hidden)


def as_adapter(arch):
    """The `Adapter` of a LoadedModel, an Adapter, or a bare transformers model."""
    if isinstance(arch, Adapter):
        return arch
    if hasattr(arch, "adapter"):
        return arch.adapter
    if isinstance(arch, nn.Module) and hasattr(arch, "base_model"):
        return Adapter(arch)
    raise ValueError(f"Expected a LoadedModel, an Adapter or a transformers model. Got {type(arch).__name__}.")
