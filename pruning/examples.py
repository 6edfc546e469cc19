"""A run's training examples as token ids, and the targets of a batch of them: the two kinds of task.

- classification (labelled texts, `pruning.session.classification_examples`): one example per text,
  its target the class id. An encoder reads the text as it is (cut to `max_length` tokens, the last
  token kept); a prompted decoder (`core.prompting`) reads it inside the prompt template, so the
  *text* is cut to `max_length` tokens first (`cut_texts`): the prompt's closing part (the answer
  cue) always stays;
- language modelling (plain documents, a causal LM): each document is tokenised on its own and cut
  into consecutive pieces of `max_length` tokens, one example each; the targets of a batch are its
  next tokens (`pruning.losses.next_token_targets`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from core.batching import Encoded, collate
from core.loaded import LoadedModel
from pruning.losses import next_token_targets


@dataclass
class Examples:
    """Token ids per example and, for classification, their class ids."""

    enc: Encoded
    labels: torch.Tensor | None  # (N,) class ids; None: language modelling
    pad_id: int

    def __len__(self) -> int:
        return len(self.enc)

    @property
    def language_modelling(self) -> bool:
        return self.labels is None

    @property
    def longest(self) -> int:
        """Tokens of the longest example (its batch is the memory peak)."""
        return max(len(ids) for ids in self.enc.ids)

    def batch(self, idx: np.ndarray) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The padded batch of examples `idx` (input_ids, attention_mask (B, T)) and its targets: (B,)
        class ids, or (B, T) next-token ids (padding and the last position ignored)."""
        batch = collate([self.enc.ids[i] for i in idx], self.pad_id)
        if self.labels is None:
            return batch, next_token_targets(batch["input_ids"], batch["attention_mask"])
        return batch, self.labels[idx]


def cut_texts(tokenizer, texts: Sequence[str], max_length: int) -> tuple[list[str], int]:
    """`texts` with each cut to its first `max_length` tokens of the plain `tokenizer` (decoded back), and
    how many were cut."""
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    cut = [tokenizer.decode(x[:max_length]) if len(x) > max_length else t for t, x in zip(texts, ids)]
    return cut, sum(len(x) > max_length for x in ids)


def text_examples(loaded: LoadedModel, documents: Sequence[str], max_length: int) -> Examples:
    """Pieces of `max_length` tokens of every document (a last piece of one token, which predicts
    nothing, is dropped). ValueError for an encoder, or documents without two tokens."""
    if loaded.lm is None:
        raise ValueError(f"Language modelling needs a causal LM; {loaded.source} is an encoder classifier.")
    tokenizer = loaded.text_tokenizer
    documents = tokenizer(list(documents))["input_ids"]
    pieces = [ids[start:start + max_length] for ids in documents for start in range(0, len(ids), max_length)]
    pieces = [ids for ids in pieces if len(ids) > 1]
    if not pieces:
        raise ValueError("The training documents hold no text of two or more tokens.")
    split = sum(len(ids) > max_length for ids in documents)  # documents cut into several pieces
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Examples(enc=Encoded(ids=pieces, truncated=split, max_length=max_length), labels=None, pad_id=pad)
