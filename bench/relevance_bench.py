"""Head relevance benchmark: (a) speed on dev sentences, (b) faithfulness of head rankings.

(a) times `HeadRelevance.attribute` for each method (conservative LRP, AttnLRP) on a fixed dev subset
    (one warm-up, then timed repeats, interleaved), next to the plain forward pass of `core.evaluate`
    on the same texts (so the ratio holds on a loaded machine) and a Captum `LayerGradientXActivation`
    pass over every W_O (conservative head relevance only); prints seconds per example and each
    method's conservation error. A decoder explains its prompted label word's logit.
(b) ranks heads on a fixed subset of the ranking split (train by default, so dev accuracy is not
    measured on the sentences that chose the heads), masks 0/30/50/70/90% of them in increasing order of
    |relevance| (each method), signed relevance and Michel importance, and against random orders (mean
    of seeds), and prints dev accuracy for each.

Run: .venv/bin/python -m bench.relevance_bench [--model default|smollm2] [--n 500] [--seeds 5]
     [--rank-split train] [--part all|a|b] [--no-captum]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch
from captum.attr import LayerGradientXActivation

from analysis.conservative import conservative
from analysis.lrp_pass import METHODS
from analysis.relevance import HeadRelevance, mask_heads, michel_importance
from core.batching import collate, encode, sorted_batches
from core.data import TextDataset, load_data
from core.evaluate import evaluate
from core.models import LoadedModel, load_model

FRACTIONS = (0.0, 0.3, 0.5, 0.7, 0.9)


def captum_head_relevance(loaded: LoadedModel, texts: list[str], batch_size: int = 32) -> np.ndarray:
    """(N, L, H) head relevance of the predicted class by Captum, one attribute() call per batch."""
    adapter, tokenizer = loaded.adapter, loaded.tokenizer
    layers = len(adapter.layers)
    wo = [adapter.attention_output(layer) for layer in range(layers)]
    forward = lambda ids, mask: loaded.model(input_ids=ids, attention_mask=mask).logits  # noqa: E731
    enc = encode(tokenizer, texts, loaded.max_length)
    out = np.zeros((len(texts), layers, adapter.num_heads(0)))
    with conservative(loaded.model):
        lgxa = LayerGradientXActivation(forward, wo)
        for idx in sorted_batches(enc, batch_size):
            batch = collate([enc.ids[i] for i in idx], tokenizer.pad_token_id)
            ids, mask = batch["input_ids"], batch["attention_mask"]
            with torch.no_grad():
                target = forward(ids, mask).argmax(1).tolist()
            attrs = lgxa.attribute(ids, target=target, additional_forward_args=(mask,), attribute_to_layer_input=True)
            for layer, a in enumerate(attrs):
                per_head = (a.detach() * mask[:, :, None]).view(len(idx), a.shape[1], adapter.num_heads(layer), -1)
                out[idx, layer] = per_head.sum((1, 3)).numpy()  # (B, H)
    return out


def timed(fns: dict[str, object], repeats: int) -> tuple[dict[str, list[float]], dict[str, object]]:
    """Seconds of `repeats` calls of each fn() after one warm-up call each, interleaved (a, b, a, b, ...) so
    load from other processes hits every variant alike; also the last result of each."""
    results = {name: fn() for name, fn in fns.items()}
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            results[name] = fn()
            seconds[name].append(time.perf_counter() - start)
    return seconds, results


def _spread(seconds: list[float]) -> str:
    return f"median {statistics.median(seconds):.2f} s (min {min(seconds):.2f}, max {max(seconds):.2f})"


def speed(loaded: LoadedModel, sample: TextDataset, repeats: int, captum: bool) -> None:
    """Print (a): seconds for relevance of the sample by each method (and Captum's), the plain forward pass
    for scale, and each method's conservation error."""
    fns = {"forward": lambda: evaluate(loaded.model, loaded.tokenizer, sample, max_length=loaded.max_length)}
    fns |= {method: lambda method=method: HeadRelevance(loaded, method=method).attribute(sample.texts)
            for method in METHODS}
    if captum:
        fns["captum"] = lambda: captum_head_relevance(loaded, sample.texts)
    seconds, results = timed(fns, repeats)
    n, forward = len(sample), statistics.median(seconds["forward"])
    print(f"(a) relevance of {n} dev texts, batch 32, {repeats} runs after a warm-up "
          f"(s/example = median / {n}; x forward = median / the plain forward's):")
    print(f"    plain forward (core.evaluate, inference mode): {_spread(seconds['forward'])}, "
          f"{forward / n:.3f} s/example")
    for method in METHODS:
        result, median = results[method], statistics.median(seconds[method])
        print(f"    HeadRelevance.attribute, {method} (heads + input + bias [+ absorbed] shares, one pass): "
              f"{_spread(seconds[method])}, {median / n:.3f} s/example, x{median / forward:.1f} forward")
        scale = (np.abs(result.logits) + np.abs(result.input_relevance) + np.abs(result.bias_relevance)
                 + np.abs(result.absorbed_relevance))
        print(f"      conservation: max |logit - input - bias - absorbed| = "
              f"{np.max(np.abs(result.convergence_delta)):.2e}, max relative "
              f"{np.max(np.abs(result.convergence_delta) / scale):.2e}; mean logit {np.mean(result.logits):.3f} = "
              f"input {np.mean(result.input_relevance):.3f} + bias {np.mean(result.bias_relevance):.3f} "
              f"+ absorbed {np.mean(result.absorbed_relevance):.3f}")
    if captum:
        median = statistics.median(seconds["captum"])
        print(f"    Captum LayerGradientXActivation on all W_O (heads only, + a forward for the predicted class): "
              f"{_spread(seconds['captum'])}, {median / n:.3f} s/example")
        diff = np.nanmax(np.abs(results["conservative"].per_example - results["captum"]))
        print(f"    max |conservative - Captum| head relevance: {diff:.2e} "
              f"(mean |logit| {np.mean(np.abs(results['conservative'].logits)):.2f})")


def masked_accuracy(loaded: LoadedModel, dev: TextDataset, order: np.ndarray, fraction: float, shape) -> float:
    """Dev accuracy with the first round(fraction * heads) heads of `order` (flat indices) masked."""
    mask = np.ones(shape)
    mask.flat[order[: round(fraction * mask.size)]] = 0
    with mask_heads(loaded.model, loaded.adapter, mask):
        return evaluate(loaded.model, loaded.tokenizer, dev).accuracy


def faithfulness(loaded: LoadedModel, rank: TextDataset, dev: TextDataset, seeds: int) -> None:
    """Print (b): dev accuracy per masked fraction for each ranking (least important masked first)."""
    result = HeadRelevance(loaded).attribute(rank.texts)
    attn = HeadRelevance(loaded, method="attnlrp").attribute(rank.texts)
    importance = michel_importance(loaded, rank.texts, rank.labels)
    shape = result.relevance.shape
    orders = {
        "|relevance|": np.argsort(result.relevance, axis=None, kind="stable"),
        "attnlrp": np.argsort(attn.relevance, axis=None, kind="stable"),
        "signed": np.argsort(result.relevance_signed, axis=None, kind="stable"),
        "michel": np.argsort(importance, axis=None, kind="stable"),
    }
    randoms = [np.random.default_rng(seed).permutation(int(np.prod(shape))) for seed in range(seeds)]
    header = (f"{'masked':>8} {'heads':>6} {'|relevance|':>12} {'attnlrp':>8} {f'random({seeds})':>16} "
              f"{'signed':>8} {'michel':>8}")
    print(f"\n(b) dev accuracy (n={len(dev)}) with the least relevant heads masked; ranking from {rank.name}")
    print(header)
    for fraction in FRACTIONS:
        acc = {name: masked_accuracy(loaded, dev, order, fraction, shape) for name, order in orders.items()}
        rnd = [masked_accuracy(loaded, dev, order, fraction, shape) for order in randoms]
        print(f"{fraction:>7.0%} {round(fraction * np.prod(shape)):>6} {acc['|relevance|']:>12.4f} "
              f"{acc['attnlrp']:>8.4f} {np.mean(rnd):>9.4f} ±{np.std(rnd):.4f} {acc['signed']:>8.4f} "
              f"{acc['michel']:>8.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--n", type=int, default=500, help="sentences for timing and for ranking heads")
    parser.add_argument("--seeds", type=int, default=5, help="random masking orders to average")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs after the warm-up")
    parser.add_argument("--rank-split", default="train", choices=("train", "dev"), help="split that ranks heads")
    parser.add_argument("--part", default="all", choices=("all", "a", "b"), help="(a) speed, (b) faithfulness")
    parser.add_argument("--no-captum", action="store_true", help="skip the Captum timing in (a)")
    args = parser.parse_args()
    loaded = load_model(args.model)
    dev = load_data("default", split="dev", label_names=loaded.label_names)
    rank = load_data("default", split=args.rank_split, label_names=loaded.label_names).subset(args.n, seed=0)
    arch = loaded.architecture()
    kv = f" ({arch.kv_heads} KV)" if arch.kv_heads and arch.kv_heads != arch.heads else ""
    print(f"model {args.model} ({arch.layers} layers x {arch.heads} heads{kv}, hidden {arch.hidden}); device cpu; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.1f}")
    if args.part in ("all", "a"):
        speed(loaded, dev.subset(args.n, seed=0), args.repeats, captum=not args.no_captum)
    if args.part in ("all", "b"):
        faithfulness(loaded, rank, dev, args.seeds)


if __name__ == "__main__":
    main()
