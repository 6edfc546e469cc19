"""Vocabulary pruning to the tokens a task corpus uses (the count cutoff of Goodman & Gao 2000, for the embedding
table of a BERT-family encoder).

`corpus_vocabulary` counts the token ids the model's tokenizer gives the corpus and keeps those seen at least
`min_count` times plus every special token; `prune_vocabulary` slices the word-embedding rows to them (in their
original order: new id = rank among the kept ids) and rebuilds the WordPiece tokenizer over the kept tokens, so a
saved folder works on its own. Unknown tokens: WordPiece maps a word it cannot split into kept pieces to [UNK] as a
whole (not just the missing piece). A sentence whose tokens are all kept tokenises to the same pieces (greedy
longest-match over a subset of the vocabulary still finds each original piece, the longest one) and so gives the
same logits.

Only WordPiece tokenizers (BERT, MiniLM, MPNet) are supported: a byte-level BPE (Llama, SmolLM2) has no [UNK] and
its merges would need rewriting.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer

from core.adapter import Adapter
from core.loaded import LoadedModel


@dataclass
class Vocabulary:
    """Kept token ids (K,) ascending, in the original numbering; `counts[i]` is how often kept id i occurred in
    the corpus (specials kept at any count); `size` the original vocabulary; `unknown_share` the share of the
    corpus's tokens that become [UNK] (tokens seen fewer than min_count times)."""

    kept: list[int]
    counts: list[int]
    size: int
    unknown_share: float

    def describe(self) -> str:
        return (f"{len(self.kept):,} of {self.size:,} tokens kept ({len(self.kept) / self.size:.1%}); "
                f"{self.unknown_share:.2%} of the corpus's tokens become [UNK]")


def check_tokenizer(tokenizer) -> None:
    """ValueError unless `tokenizer` is a fast WordPiece tokenizer with an [UNK] token (what remapping needs)."""
    backend = getattr(tokenizer, "_tokenizer", None) or getattr(tokenizer, "backend_tokenizer", None)
    kind = json.loads(backend.to_str())["model"]["type"] if backend is not None else None
    if kind != "WordPiece" or tokenizer.unk_token_id is None:
        raise ValueError(f"Vocabulary pruning needs a WordPiece tokenizer with [UNK] (BERT family); this one is "
                         f"{kind or type(tokenizer).__name__}: a BPE has no unknown token to map removed ones to.")


def corpus_vocabulary(tokenizer, texts: list[str], min_count: int = 1) -> Vocabulary:
    """The ids `tokenizer` gives `texts` (special tokens added) seen >= `min_count` times, plus every special."""
    counts = Counter(i for ids in tokenizer(list(texts), add_special_tokens=True)["input_ids"] for i in ids)
    specials = set(tokenizer.all_special_ids)
    kept = sorted({i for i, c in counts.items() if c >= min_count} | specials)
    total = sum(counts.values())
    dropped = sum(c for i, c in counts.items() if c < min_count and i not in specials)
    return Vocabulary(kept, [counts.get(i, 0) for i in kept], len(tokenizer), dropped / max(1, total))


def remap_tokenizer(tokenizer, kept: list[int]):
    """A copy of the WordPiece `tokenizer` over the tokens `kept` (original ids, ascending), renumbered 0..K-1:
    vocabulary, special tokens, post-processor and padding ids all remapped."""
    check_tokenizer(tokenizer)
    new = {old: i for i, old in enumerate(kept)}
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec["model"]["vocab"] = {tok: new[i] for tok, i in spec["model"]["vocab"].items() if i in new}
    spec["added_tokens"] = [{**t, "id": new[t["id"]]} for t in spec["added_tokens"] if t["id"] in new]
    for special in (spec.get("post_processor") or {}).get("special_tokens", {}).values():
        special["ids"] = [new[i] for i in special["ids"]]
    if spec.get("padding"):
        spec["padding"]["pad_id"] = new[spec["padding"]["pad_id"]]
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        Path(tmp, "tokenizer.json").write_text(json.dumps(spec))
        for stale in ("vocab.txt", "special_tokens_map.json"):  # the slow files would disagree with the new ids
            Path(tmp, stale).unlink(missing_ok=True)
        return AutoTokenizer.from_pretrained(tmp, local_files_only=True, trust_remote_code=False)


def slice_embedding(embedding: nn.Embedding, kept: list[int]) -> nn.Embedding:
    """A new embedding (K, d) of the `kept` rows of `embedding` (V, d); padding_idx remapped when kept."""
    index = torch.tensor(kept)
    pad = embedding.padding_idx
    new_pad = kept.index(pad) if pad is not None and pad in kept else None
    small = nn.Embedding(len(kept), embedding.embedding_dim, padding_idx=new_pad)
    with torch.no_grad():
        small.weight.copy_(embedding.weight[index])
    return small


def prune_vocabulary(loaded: LoadedModel, vocabulary: Vocabulary) -> LoadedModel:
    """A copy of the encoder classifier `loaded` with the embedding rows and tokenizer cut to `vocabulary`."""
    if loaded.is_decoder:
        raise ValueError("Vocabulary pruning is for BERT-family encoders (WordPiece); a decoder's BPE has no [UNK].")
    tokenizer = remap_tokenizer(loaded.text_tokenizer, vocabulary.kept)
    model = copy.deepcopy(loaded.model)
    embeddings = model.get_input_embeddings()
    model.set_input_embeddings(slice_embedding(embeddings, vocabulary.kept))
    model.config.vocab_size = len(vocabulary.kept)
    if model.config.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    note = f"Vocabulary pruned to the task corpus: {vocabulary.describe()}."
    return dataclasses.replace(loaded, model=model.eval(), tokenizer=tokenizer, adapter=Adapter(model),
                               notes=[*loaded.notes, note],
                               fingerprint=f"{loaded.fingerprint}-vocab-{len(vocabulary.kept)}")
