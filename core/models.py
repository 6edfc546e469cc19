"""Load a classifier (built-in name or local Hugging Face folder) with its tokenizer and adapter.

Every load is local (`local_files_only=True`), never runs remote code, and reads weights from
safetensors only. Bad folders raise `ModelError` with one line fit for a UI box or the CLI.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel
from transformers.utils import logging as hf_logging

from core.paths import models_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# A fresh head's "MISSING classifier.weight" report and per-load bars would drown the CLI's own output;
# HeadLab states what matters itself (LoadedModel.notes).
hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()

BUILTIN_MODELS = {
    "default": "all-MiniLM-L6-v2 fine-tuned on Rotten Tomatoes (6 layers x 12 heads)",
    "minilm-l3": "paraphrase-MiniLM-L3-v2 fine-tuned on Rotten Tomatoes (3 layers x 12 heads)",
    "mpnet": "all-mpnet-base-v2 fine-tuned on Rotten Tomatoes (12 layers x 12 heads x 768; optional: a 404 MB "
             "download and about an hour of fine-tuning per epoch on 2 cores)",
}
PREPARED_BY_ALL = ("default", "minilm-l3")  # `prepare all` (run by make); the bigger MPNet only on request
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "sentencepiece.bpe.model")


class ModelError(ValueError):
    """A model folder HeadLab cannot use; the message is one line for a UI error box or the CLI."""


class ModelNotPrepared(ModelError):
    """A built-in model that has not been fine-tuned on this machine yet (`python -m core prepare`)."""

    def __init__(self, name: str):
        super().__init__(
            f"The built-in model '{name}' is not prepared yet: run `python -m core prepare {name}` "
            "(fine-tunes it once, a few minutes on 2 cores) or press 'Prepare' in the app."
        )
        self.name = name


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


def _unsupported(model_type: str) -> ModelError:
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
            raise _unsupported(model_type)
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


@dataclass
class Architecture:
    """What the Model page shows: sizes of the encoder and parameter counts."""

    model_type: str
    layers: int
    heads: int  # most heads in any layer (pruned layers may have fewer)
    hidden: int
    ffn: int  # widest FFN of any layer
    vocab: int
    parameters: int
    embedding_parameters: int
    encoder_parameters: int


@dataclass
class LoadedModel:
    """A classifier ready to run: `model` is in eval mode, `label_names[i]` names logit i."""

    model: PreTrainedModel
    tokenizer: object
    adapter: Adapter
    source: str
    path: Path
    label_names: list[str]
    has_classifier: bool
    fingerprint: str
    notes: list[str] = field(default_factory=list)

    @property
    def max_length(self) -> int:
        """Longest input in tokens the position embeddings allow."""
        return int(min(self.model.config.max_position_embeddings, 512))

    def architecture(self) -> Architecture:
        cfg = self.model.config
        total = sum(p.numel() for p in self.model.parameters())
        emb = sum(p.numel() for p in self.adapter.base.embeddings.parameters())
        enc = sum(p.numel() for p in self.adapter.layers.parameters())
        layers = range(len(self.adapter.layers))
        # Read from weight shapes, not the config: a pruned model keeps its original config.
        return Architecture(
            model_type=cfg.model_type,
            layers=len(layers),
            heads=max((self.adapter.num_heads(i) for i in layers), default=0),
            hidden=self.adapter.base.embeddings.word_embeddings.weight.shape[1],
            ffn=max((self.adapter.ffn_in(i).weight.shape[0] for i in layers), default=0),
            vocab=cfg.vocab_size,
            parameters=total,
            embedding_parameters=emb,
            encoder_parameters=enc,
        )


def builtin_dir(name: str) -> Path:
    """Folder where the built-in model `name` is (or will be) saved after fine-tuning."""
    return models_dir() / name


def resolve(spec: str) -> Path:
    """Turn `default`, `minilm-l3` or a path into a model folder; raise if a built-in is not ready."""
    if spec in BUILTIN_MODELS:
        path = builtin_dir(spec)
        if not (path / "config.json").exists():
            raise ModelNotPrepared(spec)
        return path
    return Path(spec).expanduser()


def _weight_file(path: Path) -> Path:
    single = path / "model.safetensors"
    if single.exists():
        return single
    if (path / "model.safetensors.index.json").exists():
        return path / "model.safetensors.index.json"
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise ModelError(
            f"{path} holds only pickle weights (.bin/.pt); HeadLab loads safetensors only. "
            "Re-save the model with save_pretrained(safe_serialization=True)."
        )
    raise ModelError(f"{path} has no model.safetensors: not a saved Hugging Face model folder.")


def _weight_keys(weights: Path) -> list[str]:
    """Tensor names in the checkpoint; raises ModelError if the file is corrupt."""
    if weights.name.endswith(".index.json"):
        try:
            return list(json.loads(weights.read_text())["weight_map"])
        except (OSError, ValueError, KeyError) as exc:
            raise ModelError(f"{weights} is not a valid safetensors index ({exc}).") from exc
    try:
        with safe_open(str(weights), framework="pt") as f:
            return list(f.keys())
    except Exception as exc:  # safetensors raises its own SafetensorError and OSError variants
        raise ModelError(f"{weights} is corrupt or unreadable ({type(exc).__name__}: {exc}).") from exc


def folder_fingerprint(path: Path, weights: Path, extra: tuple[str, ...] = ()) -> str:
    """Short stable id of a model folder: hash of config.json (+ the `extra` files in it) and the weight
    file's size and head/tail bytes (config.json's for a non-safetensors weight file)."""
    digest = hashlib.sha1(b"".join((path / name).read_bytes() for name in ("config.json", *extra)))
    target = weights if weights.suffix == ".safetensors" else path / "config.json"
    size = target.stat().st_size
    with open(target, "rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        digest.update(f.read())
    digest.update(str(size).encode())
    return digest.hexdigest()[:12]


def inspect_folder(path: Path) -> tuple[object, Path, bool]:
    """Validate a model folder without loading weights: (config, weight file, has_classifier)."""
    if not path.exists():
        raise ModelError(f"{path} does not exist.")
    if not path.is_dir():
        raise ModelError(f"{path} is not a folder; point HeadLab at a Hugging Face model folder.")
    if not (path / "config.json").exists():
        raise ModelError(f"{path} has no config.json: not a Hugging Face model folder.")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # unknown model_type, bad JSON, ...
        raise ModelError(f"{path}/config.json cannot be read ({exc}).".replace("\n", " ")) from exc
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise _unsupported(config.model_type)
    if not any((path / name).exists() for name in TOKENIZER_FILES):
        raise ModelError(f"{path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}).")
    weights = _weight_file(path)
    keys = _weight_keys(weights)
    has_classifier = any(k.startswith("classifier.") for k in keys)
    return config, weights, has_classifier


def load_model(
    spec: str,
    *,
    attn_implementation: str = "eager",
    label_names: list[str] | None = None,
) -> LoadedModel:
    """Load `default`, `minilm-l3` or a local folder as a sequence classifier in eval mode.

    A folder without a classification head is loaded with a fresh head sized by `label_names`
    (default two labels) and `has_classifier=False`: it must be fine-tuned before its accuracy
    means anything. Attention is eager so attention maps are available.
    """
    path = resolve(spec)
    if (path / "pruning.json").is_file():  # a HeadLab export: its modules are re-sliced before loading
        from pruning.export import load_pruned  # lazy: core does not depend on pruning otherwise

        return load_pruned(path, attn_implementation=attn_implementation, source=spec)
    config, weights, has_classifier = inspect_folder(path)
    notes: list[str] = []
    kwargs: dict = {}
    if not has_classifier:
        names = label_names or ["0", "1"]
        kwargs = {"num_labels": len(names), "id2label": dict(enumerate(names)),
                  "label2id": {n: i for i, n in enumerate(names)}}
        notes.append("This model has no classification head: fine-tune it before trusting accuracy.")
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, local_files_only=True, trust_remote_code=False, use_safetensors=True,
            attn_implementation=attn_implementation, **kwargs,
        )
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        raise ModelError(f"{path} could not be loaded ({type(exc).__name__}: {exc}).".replace("\n", " ")) from exc
    model.eval()
    id2label = model.config.id2label
    names = [str(id2label[i]) for i in range(model.config.num_labels)]
    return LoadedModel(
        model=model, tokenizer=tokenizer, adapter=Adapter(model), source=spec, path=path,
        label_names=names, has_classifier=has_classifier, fingerprint=folder_fingerprint(path, weights),
        notes=notes,
    )
