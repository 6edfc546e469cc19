"""A model ready to run: the loaded classifier, its tokenizer and adapter, and what the Model page shows."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from transformers import PreTrainedModel

from core.adapter import Adapter


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
