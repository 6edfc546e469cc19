"""`cluster`: pruning + clustering after Goodman & Gao (ICSLP 2000), transplanted from back-off n-grams to a
BERT-family encoder's embedding table (52% of MiniLM's parameters).

(a) Vocabulary pruning, the count cutoff: keep the tokens the run's training split uses at least `min_count` times,
    plus every special token; slice the word-embedding rows and rebuild the WordPiece tokenizer over them
    (`pruning.vocab`). A word the pruned vocabulary cannot split becomes [UNK] as a whole.
(b) k-means weight sharing (`pruning.kmeans_share`): the embedding table (and with `share_ffn` every FFN weight)
    quantised to a 2^bits-value codebook per tensor; the export stores codebook + indices. Storage only: the
    decoded weights are dense floats and run no faster.

One-shot: returns the dense structure with the changed `source` model. The run's fine-tune then trains that
model; the centroids are NOT fine-tuned (the paper's analogue, Deep Compression, trains them; here the loop
trains plain weights, which would move them off the codebook), so weight sharing refuses a fine-tune
(`finetune_steps` 0) and vocabulary pruning alone (bits 0) may fine-tune. The run's teacher reads the full
vocabulary's ids, so a fine-tune after vocabulary pruning runs without distillation.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

from core.loaded import LoadedModel
from pruning.gate_state import GateState
from pruning.kmeans_share import share_weights, shareable_names
from pruning.methods.base import OneShotResult, PruningMethod, register
from pruning.options import option
from pruning.vocab import check_tokenizer, corpus_vocabulary, prune_vocabulary


@register
class Cluster(PruningMethod):
    name = "cluster"
    summary = ("Goodman & Gao 2000 transplanted to the embedding table: vocabulary pruned to the tokens the "
               "training split uses (count cutoff; unknown words -> [UNK]) and k-means weight sharing (2^bits "
               "codebook; centroids not fine-tuned). Encoders with a WordPiece tokenizer; storage only, no speedup.")
    order = 75

    @dataclass
    class Options:
        min_count: int = option(1, "keep tokens seen at least this many times in the training split (plus "
                                   "specials); 0 keeps the whole vocabulary", low=0)
        bits: int = option(4, "k-means weight sharing: a codebook of 2^bits values per tensor (0: no sharing; "
                              "centroids are not fine-tuned, so > 0 needs finetune_steps 0)", low=0, high=8)
        share_ffn: bool = option(False, "also share every FFN weight (input and output), not only the embeddings")

    @classmethod
    def check_model(cls, options, loaded: LoadedModel) -> None:
        if loaded.is_decoder:
            raise ValueError("cluster is for BERT-family encoders: a decoder's byte-level BPE has no [UNK] to map "
                             "pruned tokens to, and its LM head would need the same cut.")
        if options.min_count > 0:
            check_tokenizer(loaded.text_tokenizer)

    @classmethod
    def check_config(cls, options, config) -> None:
        if options.bits > 0 and config.finetune_steps > 0:
            raise ValueError("cluster with bits > 0 shares weights once and does not fine-tune the centroids: set "
                             "finetune_steps 0 (or bits 0: vocabulary pruning only, then fine-tune).")
        if options.min_count > 0 and config.distill and config.finetune_steps > 0:
            raise ValueError("cluster's vocabulary pruning renumbers the tokens and the fine-tune's teacher reads the "
                             "full vocabulary's ids: fine-tune it without distill (--no-distill).")
        if options.min_count == 0 and options.bits == 0:
            raise ValueError("cluster with min_count 0 and bits 0 changes nothing.")

    def prune(self) -> OneShotResult:
        base, notes = self.context.base, []
        if self.options.min_count > 0:
            self.context.progress(0, 2, "counting the training split's tokens")
            vocabulary = corpus_vocabulary(base.text_tokenizer, self.context.train.texts, self.options.min_count)
            source = prune_vocabulary(base, vocabulary)
        else:
            source = dataclasses.replace(base, model=copy.deepcopy(base.model))
        if self.options.bits > 0:
            self.context.progress(1, 2, f"k-means sharing ({2 ** self.options.bits} values per tensor)")
            names = shareable_names(source, self.options.share_ffn)
            share_weights(source.model, names, self.options.bits)
            notes.append(f"k-means shared ({2 ** self.options.bits} values each, centroids not fine-tuned): "
                         f"{', '.join(names)}.")
        source = dataclasses.replace(source, notes=[*source.notes, *notes])
        return OneShotResult(GateState.dense(self.context.shape), source=source)
