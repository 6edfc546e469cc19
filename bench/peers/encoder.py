"""Structured pruning of the default encoder: HeadLab's one-shot baselines against Torch-Pruning and TextPruner.

Every result prunes attention heads and FFN units of the encoder to the same target (a fraction of the encoder
layers' weights; the hidden size and the embeddings are kept) and is then fine-tuned by the same code,
`core.finetune.finetune` (AdamW, linear decay), on the same training rows for the same number of steps:

- HeadLab: its one-shot baselines (`pruning.baselines.baseline_state`: heads by Michel importance, LRP relevance
  or at random, FFN units by magnitude, the keep fraction bisected to the target) and its structured one-shot
  methods (`flap`, `llm-pruner`: Taylor importance of coupled groups, `wanda-sp`; each with its defaults and
  the same calibration rows), sliced by `pruning.surgery.prune`;
- Torch-Pruning 1.6.1: its Hugging Face BERT recipe (examples/transformers/prune_hf_bert.py: `MetaPruner`,
  global pruning, heads grouped by `num_heads`, `prune_num_heads=True`, `prune_head_dims=False`, one step,
  head and channel ratio = the target) with `MagnitudeImportance(p=2)` or `GroupTaylorImportance` (the loss
  gradients of the same calibration rows HeadLab scores with), the embeddings and the classifier ignored so
  that, like HeadLab's, only heads and FFN units go;
- TextPruner 1.1.post2: `TransformerPruner` (heads and FFN units by its loss-gradient importance) if it runs;
  its `VocabularyPruner` (embedding rows of tokens unseen in the task's texts) against HeadLab's `pruning.vocab`.

Measured per result: encoder parameters (the layers' weights and biases), dev accuracy before and after the
fine-tune, seconds to prune (scores + selection + slicing), batch-1 and batch-32 latency interleaved in this
process with every other result and the dense model (`core.latency.compare`).
"""

from __future__ import annotations

import copy
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from bench.peers.headlab_method import one_shot
from core.data import TaskSplits, TextDataset
from core.evaluate import evaluate
from core.finetune import FinetuneConfig, finetune
from core.latency import Latency, compare, make_batch, settle_calls
from core.models import LoadedModel
from pruning.baselines import baseline_state
from pruning.session import classification_examples
from pruning.surgery import prune
from pruning.vocab import corpus_vocabulary, prune_vocabulary

MAX_LENGTH = 64  # tokens, as the default model was fine-tuned
BASELINES = ("importance", "relevance", "random")
METHODS = ("flap", "llm-pruner", "wanda-sp")  # HeadLab's structured one-shot methods that slice heads and FFN units


@dataclass
class Budget:
    """What every result gets: calibration rows for the scores and the fine-tune after pruning."""

    calibration: int = 256  # training rows the data-driven scores (Michel, LRP, Taylor) average over
    finetune_rows: int = 2048  # training rows of the fine-tune (one epoch, batch 32)
    epochs: int = 1


@dataclass
class Result:
    """One pruned model (the dense reference too) and its measurements."""

    tool: str  # "HeadLab", "Torch-Pruning", "TextPruner", "dense"
    method: str
    target: float | None
    model: torch.nn.Module | None = None
    prune_s: float = 0.0
    encoder_params: int = 0
    acc_pruned: float | None = None  # dev accuracy right after pruning
    acc_tuned: float | None = None  # dev accuracy after the fine-tune
    latency: dict[int, Latency] = field(default_factory=dict)  # batch size -> Latency
    error: str = ""  # why this result could not be made

    @property
    def name(self) -> str:
        return self.tool if self.target is None else f"{self.tool} {self.method} {self.target:.0%}"


def encoder_params(model: torch.nn.Module) -> int:
    """Parameters of the encoder's layers (attention and FFN weights and biases, LayerNorms)."""
    return sum(p.numel() for p in model.base_model.encoder.parameters())


def headlab(loaded: LoadedModel, method: str, target: float, rows: TextDataset) -> torch.nn.Module:
    """HeadLab's one-shot baseline `method` at `target`, sliced."""
    state = baseline_state(method, loaded, rows.texts, rows.labels, target, seed=0)
    return prune(loaded, state).model


def headlab_method(loaded: LoadedModel, method: str, target: float, rows: TextDataset) -> torch.nn.Module:
    """HeadLab's one-shot method `method` at `target`, calibrated on all of `rows`, sliced."""
    return one_shot(loaded, method, target, rows, classification_examples(loaded, rows, MAX_LENGTH)).model


def _calibration_batches(loaded: LoadedModel, rows: TextDataset, batch_size: int = 32) -> list[dict]:
    """The calibration rows as tokenized batches with their labels."""
    out = []
    for start in range(0, len(rows), batch_size):
        enc = loaded.tokenizer(rows.texts[start:start + batch_size], padding=True, truncation=True,
                               max_length=MAX_LENGTH, return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                    "labels": torch.tensor(rows.labels[start:start + batch_size])})
    return out


def torch_pruning(loaded: LoadedModel, importance: str, target: float, rows: TextDataset) -> torch.nn.Module:
    """Torch-Pruning's BERT recipe with `importance` ("magnitude" or "taylor") at `target` (see the docstring)."""
    import torch_pruning as tp
    from transformers.models.bert.modeling_bert import BertSelfAttention

    model = copy.deepcopy(loaded.model)
    batches = _calibration_batches(loaded, rows)
    example = {k: v for k, v in batches[0].items() if k != "labels"}
    num_heads = {}
    for m in model.modules():
        if isinstance(m, BertSelfAttention):
            num_heads[m.query] = num_heads[m.key] = num_heads[m.value] = m.num_attention_heads
    imp = (tp.importance.MagnitudeImportance(p=2, group_reduction="mean") if importance == "magnitude"
           else tp.importance.GroupTaylorImportance())
    pruner = tp.pruner.MetaPruner(
        model, example, global_pruning=True, importance=imp, iterative_steps=1, pruning_ratio=target,
        num_heads=num_heads, prune_head_dims=False, prune_num_heads=True, head_pruning_ratio=target,
        output_transform=lambda out: out.logits.sum(),
        ignored_layers=[model.base_model.embeddings, model.classifier],
    )
    if importance == "taylor":
        model.zero_grad()
        for batch in batches:
            (model(**batch).loss * len(batch["labels"]) / len(rows)).backward()
    for group in pruner.step(interactive=True):
        group.prune()
    model.zero_grad(set_to_none=True)
    for m in model.modules():  # the recipe's last step: the attention modules' sizes after pruning
        if isinstance(m, BertSelfAttention):
            m.num_attention_heads = pruner.num_heads[m.query]
            m.attention_head_size = m.query.out_features // m.num_attention_heads
            m.all_head_size = m.query.out_features
    return model.eval()


def text_pruner(loaded: LoadedModel, target: float, rows: TextDataset) -> torch.nn.Module:
    """TextPruner's TransformerPruner to round((1 - target) * heads) heads and (1 - target) * d_ff FFN units."""
    from textpruner import GeneralConfig, TransformerPruner, TransformerPruningConfig

    model = copy.deepcopy(loaded.model)
    config = model.config
    heads = round((1 - target) * config.num_hidden_layers * config.num_attention_heads)
    pruning = TransformerPruningConfig(target_ffn_size=round((1 - target) * config.intermediate_size),
                                       target_num_of_heads=heads, pruning_method="iterative", n_iters=1)
    pruner = TransformerPruner(model, transformer_pruning_config=pruning,
                               general_config=GeneralConfig(use_device="cpu", output_dir="/tmp/headlab-textpruner"))
    pruner.prune(dataloader=_calibration_batches(loaded, rows), adaptor=lambda out: out.loss, save_model=False)
    return model.eval()


@dataclass
class Vocabulary:
    """One tool's vocabulary pruning of the default encoder to the task's texts."""

    rows_before: int = 0
    rows_after: int = 0
    seconds: float = 0.0
    dev_accuracy: float | None = None  # no fine-tune after it; None: the tool's tokenizer is only saved to disk
    error: str = ""


def vocabulary_pruning(loaded: LoadedModel, splits: TaskSplits) -> dict[str, Vocabulary]:
    """HeadLab's `pruning.vocab` (tokens seen at least once, plus the specials) and TextPruner's
    `VocabularyPruner` on the train, dev and test texts; each tool's error is kept, not raised."""
    texts = splits.train.texts + splits.dev.texts + splits.test.texts

    def headlab_vocab():
        pruned = prune_vocabulary(loaded, corpus_vocabulary(loaded.tokenizer, texts))
        return pruned.model, pruned.tokenizer

    def textpruner_vocab():
        from textpruner import GeneralConfig, VocabularyPruner

        model = copy.deepcopy(loaded.model)
        VocabularyPruner(model, copy.deepcopy(loaded.tokenizer), general_config=GeneralConfig(
            use_device="cpu", output_dir="/tmp/headlab-textpruner")).prune(dataiter=texts, save_model=False)
        return model, None  # its renumbered vocabulary exists only in the files it saves: not evaluated

    out = {}
    for tool, build in (("HeadLab", headlab_vocab), ("TextPruner", textpruner_vocab)):
        result = Vocabulary(rows_before=loaded.model.base_model.embeddings.word_embeddings.num_embeddings)
        try:
            start = time.perf_counter()
            model, tokenizer = build()
            result.seconds = time.perf_counter() - start
            result.rows_after = model.base_model.embeddings.word_embeddings.num_embeddings
            if tokenizer is not None:
                result.dev_accuracy = evaluate(model, tokenizer, splits.dev, max_length=MAX_LENGTH).accuracy
        except Exception as exc:  # noqa: BLE001 - reported, the bench goes on
            result.error = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        out[tool] = result
    return out


def make(result: Result, build: Callable[[], torch.nn.Module], loaded: LoadedModel, splits: TaskSplits,
         budget: Budget) -> Result:
    """Prune by `build`, measure, fine-tune with the shared budget, measure again; errors are kept, not raised."""
    try:
        start = time.perf_counter()
        model = build()
        result.prune_s = time.perf_counter() - start
        result.model, result.encoder_params = model, encoder_params(model)
        result.acc_pruned = evaluate(model, loaded.tokenizer, splits.dev, max_length=MAX_LENGTH).accuracy
        train = splits.train.subset(budget.finetune_rows, seed=1)
        tuned = finetune(model, loaded.tokenizer, TaskSplits(train, splits.dev, splits.dev),
                         FinetuneConfig(epochs=budget.epochs, max_length=MAX_LENGTH))
        result.acc_tuned = tuned.dev_accuracy
    except Exception as exc:  # noqa: BLE001 - reported in the table, the bench goes on
        result.model = None
        result.error = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    return result


def run(loaded: LoadedModel, splits: TaskSplits, targets: tuple[float, ...], budget: Budget,
        log: Callable[[str], None] = print) -> list[Result]:
    """Every result at every target, then all of them timed together at batch 1 and 32."""
    rows = splits.train.subset(budget.calibration, seed=0)
    dense = Result("dense", "", None, model=loaded.model, encoder_params=encoder_params(loaded.model))
    dense.acc_pruned = dense.acc_tuned = evaluate(loaded.model, loaded.tokenizer, splits.dev,
                                                  max_length=MAX_LENGTH).accuracy
    results = [dense]
    for target in targets:
        builds = {("HeadLab", m): (lambda m=m, t=target: headlab(loaded, m, t, rows)) for m in BASELINES}
        builds |= {("HeadLab", m): (lambda m=m, t=target: headlab_method(loaded, m, t, rows)) for m in METHODS}
        builds |= {("Torch-Pruning", m): (lambda m=m, t=target: torch_pruning(loaded, m, t, rows))
                   for m in ("magnitude", "taylor")}
        builds[("TextPruner", "transformer")] = lambda t=target: text_pruner(loaded, t, rows)
        for (tool, method), build in builds.items():
            result = make(Result(tool, method, target), build, loaded, splits, budget)
            log(f"  {result.name}: " + (result.error or f"pruned in {result.prune_s:.1f} s, dev "
                                        f"{result.acc_pruned:.4f} -> {result.acc_tuned:.4f} after the fine-tune"))
            results.append(result)
    timed = {r.name: r.model for r in results if r.model is not None}
    for batch_size in (1, 32):
        batch = make_batch(loaded.tokenizer, splits.dev.texts, batch_size, MAX_LENGTH)
        for name, latency in compare(timed, batch, settle=settle_calls(batch_size)).items():
            next(r for r in results if r.name == name).latency[batch_size] = latency
    return results
