"""Pruning speed benchmark: measured speedup of physically pruned models vs their FLOP reduction.

On the default model, builds pruned copies at ~50% and ~90% CoFi encoder sparsity (heads + FFN
units, plus hidden dims at 90%) and one that removes half the heads only, then for each prints:

- torch, batch 32 and batch 1: dense / pruned median latency (measured interleaved with the dense
  model in this process, `core.latency.compare`; at batch 1 each round starts with
  `core.latency.SETTLE_CALLS` untimed calls, so the pruned model's weights are back in the CPU caches
  the dense model's calls evicted them from), the FLOP-proportional speedup (dense / pruned encoder
  FLOPs at the batch's padded length) and measured / FLOP-proportional;
- ONNX Runtime, batch 32 and batch 1: the same for the two ONNX exports (interleaved and settled too);
- torch.jit, batch 1: both models traced (`torch.jit.trace` on the timed batch) and frozen, timed like
  torch: what less Python per call buys;
- batch 1 without settling (each round's calls right after the other model's, the timer's protocol
  before SETTLE_CALLS): how much of the shortfall was the caches;
- at batch 1, the fixed cost per call (a copy with every head and FFN unit removed: embeddings, the layers'
  LayerNorms and empty projections, pooler, classifier, dispatch) and the speedup
  that is reachable with it, dense / (floor + (dense - floor) / FLOP-proportional), for the configuration
  with the floor's hidden size (~90%): the FLOP limit counts encoder FLOPs only, so no slicing beats this;
- dev accuracy on a fixed subset (no retraining after pruning, so quality drops: this is a speed
  bench, not a quality one).

Heads and FFN units are chosen per layer by weight magnitude (`GateState.with_*_keep`); the FFN
fraction is solved so the CoFi sparsity hits the target. Encoder FLOPs exclude embeddings and
classifier, which the timer includes, so measured / FLOP-proportional < 1 is expected.

Run: .venv/bin/python -m bench.pruning_bench [--model default] [--rounds 7] [--n-eval 300]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from core.data import load_data
from core.evaluate import evaluate
from core.latency import SETTLE_CALLS, compare, make_batch, settle_calls
from core.models import load_model
from core.size import encoder_flops
from pruning.export import LogitsModule, export_onnx, onnx_session
from pruning.gates import GateShape, GateState
from pruning.size import exact_sparsity, prunable_size
from pruning.surgery import prune


def ffn_fraction_for(shape: GateShape, target: float, heads_frac: float, hidden_frac: float) -> float:
    """FFN keep fraction that gives CoFi sparsity `target` with the other fractions fixed (clipped to (0, 1])."""
    m = prunable_size(shape.layers, shape.hidden, shape.intermediate)
    d = hidden_frac * shape.hidden
    attention = 4 * shape.head_dim * d * shape.layers * shape.heads * heads_frac
    ffn_full = 2 * d * shape.layers * shape.intermediate
    return float(np.clip(((1 - target) * m - attention) / ffn_full, 1 / shape.intermediate, 1.0))


def configurations(loaded) -> dict[str, GateState]:
    """name -> gate state: half the heads only, ~50% sparsity, ~90% sparsity."""
    shape = GateShape.of(loaded)
    dense = GateState.dense(loaded)
    a = loaded.adapter
    half_heads = dense.with_head_keep(a, 0.5)
    out = {"heads only, 1/2 of heads": half_heads}
    for target, heads_frac, hidden_frac in ((0.5, 0.5, 1.0), (0.9, 2 / 12, 0.75)):
        state = dense.with_head_keep(a, heads_frac)
        if hidden_frac < 1:
            state = state.with_hidden_keep(a, hidden_frac)
        state = state.with_ffn_keep(a, ffn_fraction_for(shape, target, heads_frac, hidden_frac))
        out[f"~{target:.0%} sparsity"] = state
    return out


def floor_state(loaded) -> GateState:
    """Every head and FFN unit removed, hidden dims at the ~90% configuration's 75%: what a call costs when
    the layers do (almost) nothing: embeddings, the layers' LayerNorms and empty projections, pooler,
    classifier, dispatch."""
    dense = GateState.dense(loaded)
    return dense.with_hidden_keep(loaded.adapter, 0.75).replace(mha=torch.zeros_like(dense.mha),
                                                                 ffn=torch.zeros_like(dense.ffn))


class Traced(torch.nn.Module):
    """`model` traced with torch.jit on `batch` (its shape: the trace is only timed on it) and frozen, called
    like the model on that batch: (input_ids, attention_mask) (B, T) -> logits (B, classes)."""

    def __init__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        super().__init__()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarning on the mask helper: the trace is only run on `batch`
            traced = torch.jit.trace(LogitsModule(model).eval(), (batch["input_ids"], batch["attention_mask"]))
        self.graph = torch.jit.freeze(traced)
        self.device_marker = torch.nn.Parameter(torch.empty(0), requires_grad=False)  # compare() reads it

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.graph(input_ids, attention_mask)


def ort_compare(sessions: dict[str, object], batch: dict[str, torch.Tensor], rounds: int,
                repeats: int = 5, settle: int = 0) -> dict[str, float]:
    """Median seconds per `session.run` for each session, interleaved and settled like `core.latency.compare`."""
    feed = {k: v.numpy() for k, v in batch.items()}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for s in sessions.values():
        s.run(["logits"], feed)
    for _ in range(rounds):
        for name, s in sessions.items():
            for _ in range(settle):
                s.run(["logits"], feed)
            for _ in range(repeats):
                start = time.perf_counter()
                s.run(["logits"], feed)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds of 5 timed calls per model")
    parser.add_argument("--n-eval", type=int, default=300, help="dev examples for accuracy (0 skips)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch and ONNX Runtime threads (default: torch's default, the core count). On a "
                             "machine where another process holds a core, 2 threads wait for each other at every "
                             "op and times balloon; 1 thread is then the honest setting")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = load_model(args.model)
    dev = load_data("default", split="dev", label_names=loaded.label_names)
    texts = dev.texts
    lengths = [len(x) for x in loaded.tokenizer(texts[:2000])["input_ids"]]
    median_text = texts[int(np.argsort(lengths)[len(lengths) // 2])]
    batches = {32: make_batch(loaded.tokenizer, texts[:32], 32, loaded.max_length),
               1: make_batch(loaded.tokenizer, [median_text], 1, loaded.max_length)}
    print(f"model {args.model} ({loaded.architecture().parameters / 1e6:.1f}M parameters), torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"batch 32: first 32 dev texts padded to {batches[32]['input_ids'].shape[1]} tokens; batch 1: a "
          f"median-length text of {batches[1]['input_ids'].shape[1]} tokens; {args.rounds} rounds x 5 calls each")

    eval_data = dev.subset(args.n_eval, seed=0) if args.n_eval else None
    dense_acc = evaluate(loaded.model, loaded.tokenizer, eval_data).accuracy if eval_data else float("nan")
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="pruning-bench-"))
    dense_onnx = onnx_session(export_onnx(loaded, tmp / "dense.onnx"))
    dense_traced = Traced(loaded.model, batches[1])
    for name, state in configurations(loaded).items():
        pruned = prune(loaded, state)
        row = {"name": name, "sparsity": exact_sparsity(state), "counts": state.counts(),
               "acc": evaluate(pruned.model, pruned.tokenizer, eval_data).accuracy if eval_data else float("nan")}
        models = {"dense": loaded.model, "pruned": pruned.model}
        for b, batch in batches.items():
            t = batch["input_ids"].shape[1]
            lat = compare(models, batch, rounds=args.rounds, settle=settle_calls(b))
            flop = encoder_flops(loaded.adapter, t).total / encoder_flops(pruned.adapter, t).total
            row[b] = (lat["dense"].median_s, lat["pruned"].median_s, flop)
        start = time.perf_counter()
        traced = {"dense": dense_traced, "pruned": Traced(pruned.model, batches[1])}
        row["trace_s"] = time.perf_counter() - start
        jit = compare(traced, batches[1], rounds=args.rounds, settle=SETTLE_CALLS)
        row["jit1"] = (jit["dense"].median_s, jit["pruned"].median_s, row[1][2])
        sessions = {"dense": dense_onnx, "pruned": onnx_session(export_onnx(pruned, tmp / "pruned.onnx"))}
        for b, batch in batches.items():
            ort = ort_compare(sessions, batch, args.rounds, settle=settle_calls(b))
            row[f"ort{b}"] = (ort["dense"], ort["pruned"], row[b][2])
        cold = compare(models, batches[1], rounds=args.rounds)
        cold_ort = ort_compare(sessions, batches[1], args.rounds)
        row["cold"] = {"torch": (cold["dense"].median_s, cold["pruned"].median_s),
                       "onnxrt": (cold_ort["dense"], cold_ort["pruned"])}
        rows.append(row)

    floor_counts = floor_state(loaded).counts()
    floor = prune(loaded, floor_state(loaded))
    floor_torch = compare({"dense": loaded.model, "floor": floor.model}, batches[1], rounds=args.rounds,
                          settle=SETTLE_CALLS)
    floor_ort = ort_compare({"dense": dense_onnx, "floor": onnx_session(export_onnx(floor, tmp / "floor.onnx"))},
                            batches[1], args.rounds, settle=SETTLE_CALLS)

    print(f"\ndense dev accuracy ({args.n_eval} examples): {dense_acc:.3f}\n")
    head = (f"{'configuration':<26} {'sparsity':>8} {'heads':>6} {'FFN units':>9} {'hidden':>6} {'acc':>6} | "
            f"{'engine':<8} {'batch':>5} {'dense ms':>9} {'pruned ms':>9} {'measured':>8} {'FLOP-prop':>9} "
            f"{'ratio':>6}")
    print(head)
    print("-" * len(head))
    for row in rows:
        c = row["counts"]
        left = (f"{row['name']:<26} {row['sparsity']:>8.3f} {c['head'][0]:>6} {c['intermediate'][0]:>9} "
                f"{c['hidden'][0]:>6} {row['acc']:>6.3f}")
        for i, (engine, b, key) in enumerate((("torch", 32, 32), ("torch", 1, 1), ("jit", 1, "jit1"),
                                               ("onnxrt", 32, "ort32"), ("onnxrt", 1, "ort1"))):
            dense_s, pruned_s, flop = row[key]
            measured = dense_s / pruned_s
            print(f"{left if i == 0 else ' ' * len(left)} | {engine:<8} {b:>5} {dense_s * 1e3:>9.2f} "
                  f"{pruned_s * 1e3:>9.2f} {measured:>7.2f}x {flop:>8.2f}x {measured / flop:>6.2f}")
    print("\nmeasured = dense / pruned median latency; FLOP-prop = dense / pruned encoder FLOPs at that padded "
          "length; ratio = measured / FLOP-prop (1.0 = all of the FLOP saving shows up as speed).")
    print(f"\nbatch 1 without settling (each round's 5 timed calls right after the other model's, no "
          f"{SETTLE_CALLS} untimed ones first): pruned ms and measured speedup, settled -> unsettled")
    for row in rows:
        cells = []
        for engine, key in (("torch", 1), ("onnxrt", "ort1")):
            dense_s, pruned_s = row["cold"][engine]
            cells.append(f"{engine} {row[key][1] * 1e3:.2f} -> {pruned_s * 1e3:.2f} ms, "
                         f"{row[key][0] / row[key][1]:.2f}x -> {dense_s / pruned_s:.2f}x")
        print(f"  {row['name']:<26} " + "; ".join(cells))
    print("\ntorch.jit trace + freeze of the pruned copy: " + ", ".join(f"{row['name']} {row['trace_s']:.2f} s"
                                                                      for row in rows))
    print("\nbatch 1, fixed cost per call (every head and FFN unit removed, hidden 75%: embeddings, the layers' "
          "LayerNorms and empty projections, pooler, classifier, dispatch) and the speedup reachable with it, "
          "dense / (floor + (dense - floor) / FLOP-prop):")
    for engine, floor_times, key in (("torch", {k: v.median_s for k, v in floor_torch.items()}, 1),
                                     ("onnxrt", floor_ort, "ort1")):
        dense_s, floor_s = floor_times["dense"], floor_times["floor"]
        for row in (r for r in rows if r["counts"]["hidden"] == floor_counts["hidden"]):  # same embeddings
            flop = row[key][2]
            reachable = dense_s / (floor_s + (dense_s - floor_s) / flop)
            measured = row[key][0] / row[key][1]
            print(f"  {engine:<8} {row['name']:<26} floor {floor_s * 1e3:.2f} ms of dense {dense_s * 1e3:.2f} ms; "
                  f"reachable {reachable:.2f}x, measured {measured:.2f}x ({measured / reachable:.2f} of reachable)")
    print(f"ONNX Runtime dense vs torch dense at batch 1: {rows[0]['ort1'][0] * 1e3:.2f} ms vs "
          f"{rows[0][1][0] * 1e3:.2f} ms (not interleaved with each other); load average at the end "
          f"{os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
