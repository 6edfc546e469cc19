"""A model ready to run: the loaded classifier, its tokenizer and adapter, and what the Model page shows."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from transformers import PreTrainedModel

from core.adapter import Adapter
from core.prompting import PromptSpec


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
    encoder_parameters: int  # the layer stack's (encoder or decoder layers)
    family: str = "encoder"  # or "decoder"
    kv_heads: int = 0  # most key/value heads in any layer (< heads under GQA)


@dataclass
class LoadedModel:
    """A classifier ready to run: `model` is in eval mode, `label_names[i]` names logit i.

    For a decoder `model` is a `core.prompting.PromptClassifier` around the causal LM (`lm`) and
    `tokenizer` a `PromptTokenizer` (`text_tokenizer` is the plain one)."""

    model: PreTrainedModel
    tokenizer: object
    adapter: Adapter
    source: str
    path: Path
    label_names: list[str]
    has_classifier: bool
    fingerprint: str
    notes: list[str] = field(default_factory=list)
    prompt: PromptSpec | None = None  # decoders: how the causal LM is read as a classifier

    @property
    def is_decoder(self) -> bool:
        return self.adapter.is_decoder

    @property
    def lm(self) -> PreTrainedModel | None:
        """The causal LM inside a prompted decoder (for perplexity and generation), None for an encoder."""
        return getattr(self.model, "lm", None)

    @property
    def text_tokenizer(self):
        """The plain tokenizer (a decoder's `tokenizer` formats texts as prompts first)."""
        return getattr(self.tokenizer, "tokenizer", self.tokenizer)

    @property
    def max_length(self) -> int:
        """Longest input in tokens the position embeddings allow."""
        return int(min(self.model.config.max_position_embeddings, 512))

    def architecture(self) -> Architecture:
        cfg = self.model.config
        total = sum(p.numel() for p in self.model.parameters())
        emb = sum(p.numel() for p in self.adapter.embeddings.parameters())
        enc = sum(p.numel() for p in self.adapter.layers.parameters())
        layers = range(len(self.adapter.layers))
        # Read from weight shapes, not the config: a pruned model keeps its original config.
        return Architecture(
            model_type=cfg.model_type,
            layers=len(layers),
            heads=max((self.adapter.num_heads(i) for i in layers), default=0),
            hidden=self.adapter.word_embeddings.weight.shape[1],
            ffn=max((self.adapter.ffn_in(i).out_features for i in layers), default=0),
            vocab=cfg.vocab_size,
            parameters=total,
            embedding_parameters=emb,
            encoder_parameters=enc,
            family=self.adapter.layout.family,
            kv_heads=max((self.adapter.num_kv_heads(i) for i in layers), default=0),
        )
