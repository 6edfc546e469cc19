"""HeadLab side by side with the peers a user would pick instead, measured in one run on this machine.

- Torch-Pruning and TextPruner against HeadLab's one-shot baselines and structured one-shot methods (flap,
  llm-pruner, wanda-sp) on the default encoder
  (`bench.peers.encoder`): dev accuracy before and after the same fine-tune, encoder parameters, latency
  at batch 1 and 32 interleaved in this process, seconds to prune; TextPruner's vocabulary pruning.
- Torch-Pruning's LLM recipe on SmolLM2 against HeadLab's flap / llm-pruner / wanda-sp at the same size of the
  layers, neither recovered (`bench.peers.decoder`): perplexity, parameters, prefill latency, seconds to prune.
- LXT's AttnLRP and CP-LRP against HeadLab's on SmolLM2 (`bench.peers.lxt_child`, one process per method).
- Captum's LayerGradientXActivation against HeadLab's head relevance on the default encoder.

Prints each part's details, then one table (HeadLab's figure, the peer's, HeadLab / peer; higher accuracy
and Spearman are better, lower seconds and errors are better) with the machine, threads and load. A peer
that cannot install or run here gets a row saying why; the rest goes on.

Run (from the repo root): make peers && .venv-peers/bin/python -m bench.peers_bench
     [--targets 0.5,0.75] [--finetune-rows 2048] [--dev-rows N] [--decoder-ratios 0.1,0.2] [--lxt-sentences 8]
     [--captum-sentences 500] [--parts pruning,decoder,lxt,captum] [--threads N]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import time

import torch

from bench.peers import decoder, encoder
from bench.peers.relevance import captum_rows, lxt_rows
from bench.peers.table import Row, machine, markdown
from core.data import TaskSplits, load_default_task
from core.models import load_model

PEERS = ("torch-pruning", "textpruner", "lxt", "captum")
PARTS = ("pruning", "decoder", "lxt", "captum")


def installed() -> str:
    """Each peer's installed version, or 'not installed'."""
    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed (make peers)"
    return ", ".join(f"{name} {version(name)}" for name in PEERS)


def _ms(result: encoder.Result | decoder.Result, batch: int) -> float | None:
    return result.latency[batch].median_s * 1e3 if batch in result.latency else None


def pruning_rows(results: list[encoder.Result], targets: tuple[float, ...]) -> list[Row]:
    """Per target: HeadLab's best one-shot result (baseline or method) against each peer's best (by tuned accuracy)."""
    rows = []
    for target in targets:
        ours = [r for r in results if r.tool == "HeadLab" and r.target == target and r.model is not None]
        best = max(ours, key=lambda r: r.acc_tuned, default=None)
        for tool in ("Torch-Pruning", "TextPruner"):
            peers = [r for r in results if r.tool == tool and r.target == target]
            ok = [r for r in peers if r.model is not None]
            if not ok or best is None:
                why = "; ".join(sorted({r.error for r in peers})) or "not run"
                rows.append(Row(f"{tool} at {target:.0%}", None, None, note=f"could not run: {why}"))
                continue
            peer = max(ok, key=lambda r: r.acc_tuned)
            pair = f"HeadLab {best.method} vs {tool} {peer.method}"
            rows += [
                Row(f"{tool} at {target:.0%}: dev accuracy after the fine-tune", best.acc_tuned, peer.acc_tuned,
                    note=f"{pair} (best of each by this figure); right after pruning {best.acc_pruned:.4f} vs "
                         f"{peer.acc_pruned:.4f}"),
                Row(f"{tool} at {target:.0%}: encoder parameters (M)", best.encoder_params / 1e6,
                    peer.encoder_params / 1e6, digits=3),
                Row(f"{tool} at {target:.0%}: batch-1 latency", _ms(best, 1), _ms(peer, 1), " ms", digits=3),
                Row(f"{tool} at {target:.0%}: batch-32 latency", _ms(best, 32), _ms(peer, 32), " ms", digits=3),
                Row(f"{tool} at {target:.0%}: seconds to prune", best.prune_s, peer.prune_s, " s",
                    "scores on the calibration rows + selection + slicing", 3),
            ]
    return rows


def vocabulary_rows(ours: encoder.Vocabulary, theirs: encoder.Vocabulary) -> list[Row]:
    """HeadLab's vocabulary pruning against TextPruner's: rows kept, dev accuracy (no fine-tune), seconds."""
    if ours.error or theirs.error:
        errors = "; ".join(f"{tool}: {v.error}" for tool, v in (("HeadLab", ours), ("TextPruner", theirs)) if v.error)
        return [Row("TextPruner vocabulary pruning", None, None, note=f"could not run: {errors}")]
    return [
        Row("TextPruner vocabulary pruning: embedding rows kept", ours.rows_after, theirs.rows_after, digits=5,
            note=f"of {ours.rows_before}, the train + dev + test texts"),
        Row("TextPruner vocabulary pruning: dev accuracy, no fine-tune", ours.dev_accuracy, theirs.dev_accuracy,
            note="TextPruner's renumbered tokenizer exists only in the files it saves" if theirs.dev_accuracy is None
            else ""),
        Row("TextPruner vocabulary pruning: seconds", ours.seconds, theirs.seconds, " s", digits=3),
    ]


def decoder_rows(results: list[decoder.Result], ratios: tuple[float, ...]) -> list[Row]:
    """Per Torch-Pruning ratio: HeadLab's best method (lowest perplexity) at the same layer size against it."""
    rows = []
    for ratio in ratios:
        peer = next((r for r in results if r.tool == "Torch-Pruning" and r.ratio == ratio), None)
        ours = [r for r in results if r.tool == "HeadLab" and r.ratio == ratio and r.lm is not None]
        best = min(ours, key=lambda r: r.perplexity, default=None)
        label = f"Torch-Pruning on SmolLM2, r={ratio:g}"
        if peer is None or peer.lm is None or best is None:
            why = "; ".join(r.error for r in results if r.ratio == ratio and r.error) or "not run"
            rows.append(Row(label, None, None, note=f"could not run: {why}"))
            continue
        rows += [
            Row(f"{label}: dev perplexity (lower is better)", best.perplexity, peer.perplexity, digits=4,
                note=f"HeadLab {best.method} vs Torch-Pruning magnitude, no recovery; "
                     + ", ".join(f"{r.method} {r.perplexity:.1f}" for r in ours)),
            Row(f"{label}: layer parameters (M)", best.layer_params / 1e6, peer.layer_params / 1e6, digits=3,
                note=f"all parameters {best.all_params / 1e6:.1f} M vs {peer.all_params / 1e6:.1f} M"),
            Row(f"{label}: prefill batch-1 latency", _ms(best, 1), _ms(peer, 1), " ms", digits=3),
            Row(f"{label}: prefill batch-8 latency", _ms(best, 8), _ms(peer, 8), " ms", digits=3),
            Row(f"{label}: seconds to prune", best.prune_s, peer.prune_s, " s", digits=3),
        ]
    return rows


def print_results(results, header: str, cells) -> None:
    """One line per result: its name and `cells(result)`, or why it could not run."""
    print(f"{'result':<34} {header}")
    for r in results:
        print(f"{r.name:<34} " + (f"could not run: {r.error}" if r.error else cells(r)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="0.5,0.75", help="encoder sparsities (fractions of its weights)")
    parser.add_argument("--calibration", type=int, default=256, help="training rows every score averages over")
    parser.add_argument("--finetune-rows", type=int, default=2048, help="training rows of the one-epoch fine-tune")
    parser.add_argument("--dev-rows", type=int, default=0, help="dev rows the accuracies are measured on (0: all)")
    parser.add_argument("--decoder-ratios", default="0.1,0.2", help="Torch-Pruning's width ratios on SmolLM2")
    parser.add_argument("--decoder-calibration", type=int, default=64, help="Lee train pieces HeadLab calibrates on")
    parser.add_argument("--lxt-sentences", type=int, default=8)
    parser.add_argument("--captum-sentences", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3, help="timed Captum / HeadLab relevance runs")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (default: torch's, the core count); 1 when another process shares the "
                             "cores, so ops do not wait for a busy one")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    targets = tuple(float(t) for t in args.targets.split(","))
    parts = set(args.parts.split(","))
    start = time.perf_counter()
    header = machine()
    print(header)
    print(f"peers: {installed()}")
    rows: list[Row] = []
    loaded = load_model("default")
    splits = load_default_task()
    if args.dev_rows:
        splits = TaskSplits(splits.train, splits.dev.subset(args.dev_rows, seed=0), splits.test)
    if "pruning" in parts:
        budget = encoder.Budget(calibration=args.calibration, finetune_rows=args.finetune_rows)
        print(f"\nstructured pruning of the default encoder (heads + FFN units), fine-tune: core.finetune.finetune, "
              f"{budget.finetune_rows} training rows x {budget.epochs} epoch, batch 32, lr 5e-5; scores on "
              f"{budget.calibration} training rows; dev n={len(splits.dev)}")
        results = encoder.run(loaded, splits, targets, budget)
        print_results(results, f"{'enc. params':>11} {'dev pruned':>10} {'dev tuned':>9} {'b1 ms':>7} {'b32 ms':>7} "
                      f"{'prune s':>8}", lambda r: f"{r.encoder_params / 1e6:>10.2f}M {r.acc_pruned:>10.4f} "
                      f"{r.acc_tuned:>9.4f} {_ms(r, 1):>7.2f} {_ms(r, 32):>7.1f} {r.prune_s:>8.1f}")
        rows += pruning_rows(results, targets)
        vocab = encoder.vocabulary_pruning(loaded, splits)
        for tool, v in vocab.items():
            dev = "-" if v.dev_accuracy is None else f"{v.dev_accuracy:.4f}"
            print(f"{tool} vocabulary pruning on the task's texts: " + (v.error or (
                f"{v.rows_before} -> {v.rows_after} rows in {v.seconds:.1f} s, dev {dev}")))
        rows += vocabulary_rows(vocab["HeadLab"], vocab["TextPruner"])
    if "decoder" in parts:
        ratios = tuple(float(r) for r in args.decoder_ratios.split(","))
        print(f"\nwidth pruning of SmolLM2, no recovery; HeadLab calibrates on {args.decoder_calibration} Lee train "
              f"pieces of {decoder.PIECE} tokens; perplexity on the Lee dev documents")
        results = decoder.run(load_model("smollm2"), ratios, args.decoder_calibration)
        print_results(results, f"{'layer params':>12} {'all params':>10} {'dev ppl':>8} {'b1 ms':>7} {'b8 ms':>7} "
                      f"{'prune s':>8}", lambda r: f"{r.layer_params / 1e6:>11.2f}M {r.all_params / 1e6:>9.1f}M "
                      f"{r.perplexity:>8.2f} {_ms(r, 1):>7.1f} {_ms(r, 8):>7.1f} {r.prune_s:>8.1f}")
        rows += decoder_rows(results, ratios)
    if "lxt" in parts:
        for method in ("attnlrp", "conservative"):
            rows += lxt_rows(method, args.lxt_sentences)
    if "captum" in parts:
        rows += captum_rows(loaded, splits.dev.subset(args.captum_sentences, seed=0), args.repeats)
    print(f"\n{header}\nfinished after {(time.perf_counter() - start) / 60:.1f} min; {machine().split('; ')[-1]}\n")
    print(markdown(rows))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
