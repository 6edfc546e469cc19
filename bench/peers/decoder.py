"""Width pruning of SmolLM2: Torch-Pruning's LLM recipe against HeadLab's structured one-shot methods at the
same size, neither recovered.

- Torch-Pruning 1.6.1, its examples/LLMs/prune_llm.py as written: `BasePruner` with
  `GroupMagnitudeImportance(p=2, group_reduction="mean")`, local (uniform) pruning of one ratio r for the
  hidden size (the embedding table's width, every RMSNorm, all projections' inputs), the MLP channels and the
  query heads (per key/value group under GQA: `num_heads` of q = 9, of k and v = 3; `prune_num_heads=True`,
  `prune_head_dims=False` so RoPE is untouched), `round_to=4`, the LM head ignored as a root; then the
  script's attribute updates (config sizes, heads, key/value groups). It has no recovery (its readme sends
  fine-tuning to other tools), so no result here is recovered.
  One departure, or it does not run at all: with transformers 5.23 its dependency graph never finishes (an
  endless loop in `_fix_dependency_graph_non_recursive`, as in its open issue #527 for Qwen3): the index
  mapping of the keys' path cycles through RoPE's `rotate_half` (slice, neg, concat) with indices growing by
  192 each turn. The graph is therefore traced with RoPE as the identity (`_rope_as_identity`). RoPE mixes
  only dimensions inside one head, and the recipe prunes whole heads and never head dimensions, so the groups
  are the same; magnitude importance reads weights only, and the pruned model runs with its real RoPE.
- HeadLab: `flap`, `llm-pruner`, `wanda-sp` (registered method objects, defaults, calibrated on the same Lee
  train pieces) at the sparsity of the layers' weights Torch-Pruning's result reached. HeadLab keeps the hidden
  size, so the embedding table stays whole where Torch-Pruning narrows it.

Measured per result: the layers' parameters and all (unique) parameters, perplexity on the Lee dev documents,
seconds to prune, prefill latency at batch 1 and 8 (64 tokens) interleaved with every other result and the
dense model in this process.
"""

from __future__ import annotations

import contextlib
import copy
import time
import traceback
from dataclasses import dataclass, field, replace

import torch

from bench.peers.headlab_method import one_shot
from core.latency import Latency, compare, make_batch
from core.lm_text import lee_splits
from core.loaded import LoadedModel
from core.perplexity import perplexity
from pruning.examples import text_examples

PIECE = 64  # tokens per calibration piece and per prefill row
METHODS = ("flap", "llm-pruner", "wanda-sp")


@dataclass
class Result:
    """One pruned SmolLM2 (or the dense one) and its measurements."""

    tool: str
    method: str
    ratio: float | None  # Torch-Pruning's width ratio r this result is matched to (None: dense)
    lm: torch.nn.Module | None = None
    prune_s: float = 0.0
    layer_params: int = 0
    all_params: int = 0
    perplexity: float | None = None
    latency: dict[int, Latency] = field(default_factory=dict)
    error: str = ""

    @property
    def name(self) -> str:
        return self.tool if self.ratio is None else f"{self.tool} {self.method} r={self.ratio:g}"


def layer_params(lm: torch.nn.Module) -> int:
    """Parameters of the decoder layers (attention, MLP, their norms)."""
    return sum(p.numel() for p in lm.model.layers.parameters())


@contextlib.contextmanager
def _rope_as_identity():
    """Llama's `apply_rotary_pos_emb` returns q and k unchanged inside the block (see the module docstring)."""
    from transformers.models.llama import modeling_llama

    real = modeling_llama.apply_rotary_pos_emb
    modeling_llama.apply_rotary_pos_emb = lambda q, k, cos, sin, *args, **kwargs: (q, k)
    try:
        yield
    finally:
        modeling_llama.apply_rotary_pos_emb = real


def torch_pruning(lm: torch.nn.Module, tokenizer, ratio: float) -> torch.nn.Module:
    """Torch-Pruning's prune_llm.py recipe at width ratio `ratio` on a copy of `lm` (see the docstring)."""
    import torch_pruning as tp

    model = copy.deepcopy(lm).eval()
    config = model.config
    inputs = torch.tensor(tokenizer.encode("Hello world.")).unsqueeze(0)
    num_heads = {}
    for layer in model.model.layers:
        attn = layer.self_attn
        num_heads[attn.q_proj] = config.num_attention_heads
        num_heads[attn.k_proj] = num_heads[attn.v_proj] = config.num_key_value_heads
    gqa = config.num_attention_heads != config.num_key_value_heads
    with _rope_as_identity():  # the graph is traced here
        pruner = tp.pruner.BasePruner(
            model, example_inputs=inputs,
            importance=tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"), global_pruning=False,
            output_transform=lambda x: x.logits, pruning_ratio=ratio, ignored_layers=[model.lm_head],
            num_heads=num_heads, prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=ratio, round_to=4,
        )
    for group in pruner.step(interactive=True):
        group.prune()
    config.hidden_size = model.lm_head.in_features  # the script's updates, for a Llama with separate q/k/v
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        heads = attn.q_proj.out_features // attn.head_dim
        config.num_attention_heads = heads
        if not gqa:
            config.num_key_value_heads = heads
        attn.num_key_value_groups = heads // config.num_key_value_heads
        config.intermediate_size = mlp.gate_proj.out_features
    return model


def measure(result: Result, build, dev_texts: list[str], tokenizer) -> Result:
    """Prune by `build` (returns the causal LM), count, and measure perplexity; errors are kept, not raised."""
    try:
        start = time.perf_counter()
        lm = build()
        result.prune_s = time.perf_counter() - start
        result.lm = lm.eval()
        result.layer_params = layer_params(lm)
        result.all_params = sum(p.numel() for p in lm.parameters())
        with torch.inference_mode():
            result.perplexity = perplexity(lm, tokenizer, dev_texts).perplexity
    except Exception as exc:  # noqa: BLE001 - reported in the table, the bench goes on
        result.lm, result.error = None, f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    return result


def run(loaded: LoadedModel, ratios: tuple[float, ...], calibration: int, log=print) -> list[Result]:
    """Dense, then per ratio Torch-Pruning's result and HeadLab's methods at its layer sparsity; all timed together."""
    lee = lee_splits()
    dev = list(lee.dev.documents)
    tokenizer = loaded.text_tokenizer
    examples = text_examples(loaded, lee.train.documents, PIECE)
    examples = replace(examples, enc=replace(examples.enc, ids=examples.enc.ids[:calibration]))
    dense = measure(Result("dense", "", None), lambda: loaded.lm, dev, tokenizer)
    results = [dense]
    for ratio in ratios:
        tp_result = measure(Result("Torch-Pruning", "magnitude", ratio), lambda r=ratio: torch_pruning(
            loaded.lm, tokenizer, r), dev, tokenizer)
        results.append(tp_result)
        log(f"  {tp_result.name}: " + (tp_result.error or f"{tp_result.layer_params / 1e6:.2f} M layer parameters, "
                                       f"ppl {tp_result.perplexity:.2f}, {tp_result.prune_s:.1f} s"))
        if tp_result.lm is None:
            continue
        sparsity = 1 - tp_result.layer_params / dense.layer_params
        for method in METHODS:
            ours = measure(Result("HeadLab", method, ratio),
                           lambda m=method, s=sparsity: one_shot(loaded, m, s, lee.train, examples).lm, dev,
                           tokenizer)
            log(f"  {ours.name} at sparsity {sparsity:.3f}: " + (ours.error or f"{ours.layer_params / 1e6:.2f} M "
                                                                   f"layer parameters, ppl {ours.perplexity:.2f}, "
                                                                   f"{ours.prune_s:.1f} s"))
            results.append(ours)
    timed = {r.name: r.lm for r in results if r.lm is not None}
    for batch_size in (1, 8):
        batch = make_batch(tokenizer, dev, batch_size, PIECE)
        for name, latency in compare(timed, batch).items():
            next(r for r in results if r.name == name).latency[batch_size] = latency
    return results
