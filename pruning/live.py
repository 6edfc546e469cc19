"""What a gate state does to a model, measured against the dense model in the same process.

`measure_pruned` is the one measuring path: a physically pruned copy (the dense model is never
changed) is evaluated on a dataset, timed interleaved with the dense model at batch 1 and 32 (so
machine drift hits both alike), and its parameters, encoder FLOPs and CoFi sparsity are counted.
The Gates page calls it after every change on a small seeded subset with the pruned copy it keeps
for export, timing that copy alone against the dense latencies it took when it opened (~1-2 s on 2
cores for the default model); `compare_state` (prune, then measure) serves
`pruning evaluate` (the Gates page's full-dev job) and `pruning apply`; training eval steps call it
through `pruning.record.measure_step`.

Decoders go the same path (accuracy is the prompted classifier's; sparsity from `SizeModel`), but
cost far more: one SmolLM2 forward of a ~77-token prompt takes ~0.4 s of CPU at batch 1, ~2.4 s at
batch 8 and ~9 s at batch 32 (one thread), so `QUICK_ROUNDS`' batch-32 rounds alone would take ~20 s
on 2 cores: a decoder is timed at batch 1 and 8 (`DECODER_ROUNDS`, ~5 s), and its accuracy costs
~0.15 s a prompt.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass

import torch

from core.adapter import GateShape
from core.cli import torch_threads
from core.data import TextDataset
from core.evaluate import Progress, evaluate
from core.latency import compare, make_batch, settle_calls
from core.loaded import LoadedModel
from core.lowrank import low_rank_sparsity
from core.size import encoder_flops
from core.structure import pruning_info
from core.summary import median_tokens
from pruning.gate_state import GateState
from pruning.size import SizeModel, exact_sparsity
from pruning.surgery import prune

QUICK_ROUNDS = {1: (3, 3), 32: (2, 1)}  # core.latency.compare (rounds, repeats) per batch size: ~2 s in all
DECODER_ROUNDS = {1: (2, 1), 8: (1, 1)}  # a decoder's: batch 8 instead of 32 (~5 s for SmolLM2 on 2 cores)


def quick_rounds(loaded: LoadedModel) -> dict[int, tuple[int, int]]:
    """The (rounds, repeats) per batch size a quick look times: batch 1 and 32, or 1 and 8 for a decoder."""
    return DECODER_ROUNDS if loaded.is_decoder else QUICK_ROUNDS


@dataclass
class Figures:
    """One model's figures on one subset. Latencies are medians in milliseconds, FLOPs per example."""

    accuracy: float
    examples: int
    parameters: int  # all parameters, embeddings and classifier included
    encoder_parameters: int  # the encoder layers only (what pruning can remove)
    flops_attention: int
    flops_ffn: int
    latency_b1_ms: float | None = None
    latency_b32_ms: float | None = None  # encoders' larger batch
    latency_b8_ms: float | None = None  # decoders' larger batch

    @property
    def flops(self) -> int:
        return self.flops_attention + self.flops_ffn

    @property
    def large_batch(self) -> int:
        """The larger batch size timed: 8 for a decoder, else 32."""
        return 8 if self.latency_b8_ms is not None else 32


@dataclass
class Comparison:
    """Dense vs pruned for one gate state; `sparsity` is CoFi's exact encoder sparsity (fraction)."""

    dense: Figures
    pruned: Figures
    sparsity: float
    seq_len: int  # tokens per example the FLOPs are counted at (the subset's median)
    seconds: float  # wall time of the whole comparison
    note: str  # what was kept, one line

    def speedup(self, batch: int) -> float:
        """Measured dense / pruned latency at batch 1 or the larger batch (`large_batch`)."""
        key = f"latency_b{batch}_ms"
        return getattr(self.dense, key) / getattr(self.pruned, key)

    @property
    def large_batch(self) -> int:
        return self.dense.large_batch

    @property
    def flop_speedup(self) -> float:
        """The speedup FLOPs alone would predict (dense / pruned encoder FLOPs)."""
        return self.dense.flops / max(self.pruned.flops, 1)

    def as_dict(self) -> dict:
        return {"dense": asdict(self.dense), "pruned": asdict(self.pruned), "sparsity": self.sparsity,
                "seq_len": self.seq_len, "seconds": self.seconds, "note": self.note}

    @classmethod
    def from_dict(cls, data: dict) -> Comparison:
        """Read `as_dict` back (e.g. the JSON `pruning evaluate` writes); other keys are ignored."""
        return cls(dense=Figures(**data["dense"]), pruned=Figures(**data["pruned"]), sparsity=data["sparsity"],
                   seq_len=data["seq_len"], seconds=data["seconds"], note=data["note"])


def figures(loaded: LoadedModel, data: TextDataset, seq_len: int, progress: Progress | None = None) -> Figures:
    """Accuracy on all of `data` plus sizes of `loaded` (no timing)."""
    result = evaluate(loaded.model, loaded.tokenizer, data, max_length=loaded.max_length, progress=progress)
    flops = encoder_flops(loaded.adapter, seq_len)
    arch = loaded.architecture()
    return Figures(accuracy=result.accuracy, examples=result.n, parameters=arch.parameters,
                   encoder_parameters=arch.encoder_parameters, flops_attention=flops.attention, flops_ffn=flops.ffn)


def measure_pruned(dense: LoadedModel, pruned: LoadedModel, data: TextDataset, dense_figures: Figures | None = None,
                   rounds: dict[int, tuple[int, int]] | None = None, *, warm_b32: bool = True,
                   timing_threads: int = 0, time_dense: bool = True, progress: Progress | None = None) -> Comparison:
    """The one measuring path of HeadLab: an already sliced `pruned` model against `dense` on `data`.

    Accuracy of both on all of `data` (the dense model's from `dense_figures` when given: it does not
    change), sizes and encoder FLOPs at the data's median length, latency at each batch size of `rounds`
    = {batch size: (rounds, repeats per round)} timed interleaved in this process (`time_models`, on
    `timing_threads` torch threads; 0: the process's setting; evaluation always on the process's).
    `time_dense=False` times the pruned model alone and keeps the latencies of `dense_figures` (timed
    earlier on the same batch and threads): half the timing, for a quick look that a full one refines.
    Used by the Gates page (`ui.gates.measure`, on the pruned copy it also exports), `pruning evaluate`
    (its full-dev job, through `compare_state`), `pruning apply` and every eval step of a training run
    (`pruning.record.measure_step`).
    """
    start = time.perf_counter()
    info = pruning_info(pruned.model)
    state = GateState.from_dict(info.gate_state) if info is not None else GateState.dense(GateShape.of(pruned))
    seq_len = median_tokens(dense, data.texts)
    base = dense_figures if dense_figures is not None else figures(dense, data, seq_len, progress)
    rounds = rounds or quick_rounds(dense)
    if time_dense:
        base = Figures(**{**asdict(base), "latency_b1_ms": None, "latency_b32_ms": None, "latency_b8_ms": None})
    elif dense_figures is None or any(getattr(base, f"latency_b{b}_ms") is None for b in rounds):
        raise ValueError("time_dense=False needs dense_figures timed at every batch size of `rounds`.")
    small = figures(pruned, data, seq_len, progress)
    if progress:
        progress(0, 1, f"timing batch {' and '.join(map(str, rounds))}")
    timed = {"dense": (dense, base), "pruned": (pruned, small)} if time_dense else {"pruned": (pruned, small)}
    time_models(timed, data.texts, rounds, warm_large=warm_b32, threads=timing_threads)
    low_rank = low_rank_sparsity(pruned.adapter)  # FLOP's thin matrices: the weights they hold
    sparsity = exact_sparsity(state, model=SizeModel.of(pruned)) if low_rank is None else low_rank
    return Comparison(dense=base, pruned=small, sparsity=sparsity,
                      seq_len=seq_len, seconds=time.perf_counter() - start,
                      note=pruned.notes[-1] if pruned.notes else "")


def compare_state(loaded: LoadedModel, state: GateState, data: TextDataset, *, dense: Figures | None = None,
                  rounds: dict[int, tuple[int, int]] | None = None, progress: Progress | None = None) -> Comparison:
    """Prune a copy of `loaded` by `state` and measure it against `loaded` on `data` (`measure_pruned`).

    `dense` may pass the dense model's figures from an earlier call; its latencies are measured again,
    interleaved with the pruned model's. The default `rounds` are sized for ~2 s in all on 2 cores (a
    quick look; the Gates page refines in the background). Both models just ran (evaluation, earlier
    calls), so batch 32 is not warmed up: a warm-up call there costs more than it buys.
    """
    start = time.perf_counter()
    cmp = measure_pruned(loaded, prune(loaded, state), data, dense, rounds, warm_b32=False, progress=progress)
    return dataclasses.replace(cmp, seconds=time.perf_counter() - start)


def time_models(models: dict[str, tuple[LoadedModel, Figures]], texts: list[str],
                rounds: dict[int, tuple[int, int]], *, warm_large: bool = True, threads: int = 0) -> None:
    """Time the models of `models` = {name: (model, its figures)} interleaved (`core.latency.compare`) on a
    batch of typical `texts` (`core.latency.make_batch`, the first model's tokenizer; the smallest vocabulary's
    when a model's was pruned (`cluster`): its ids are valid in every model, and timing does not depend on
    which tokens they are) at each batch size of `rounds` = {batch size: (rounds, repeats per round)}; writes
    the medians (ms) into each model's figures as latency_b<batch size>_ms. `warm_large`: warm up before the
    larger batches too. `threads`: torch threads for the timing (0: leave the process's setting). An encoder's
    batch-1 rounds start with untimed calls (`core.latency.settle_calls`); a decoder's weights, hundreds of MB, never
    stay in the caches, so nothing settles."""
    first = min((loaded for loaded, _ in models.values()), key=lambda loaded: len(loaded.text_tokenizer))
    for batch_size, (n_rounds, repeats) in rounds.items():
        batch = make_batch(first.tokenizer, texts, batch_size, first.max_length)
        with torch_threads(threads):
            timed = compare({name: loaded.model for name, (loaded, _) in models.items()}, batch, rounds=n_rounds,
                            repeats_per_round=repeats, warmup=batch_size == 1 or warm_large,
                            settle=0 if first.is_decoder else settle_calls(batch_size))
        for name, (_, figs) in models.items():
            setattr(figs, f"latency_b{batch_size}_ms", timed[name].median_s * 1000)


@dataclass(frozen=True)
class ManualGates:
    """Gates set by hand (the Gates page's switches and sliders); `state()` turns them into a GateState.

    Indices are 0-based. FFN units and hidden dims are chosen by `criterion` (see
    `GateState.with_ffn_keep` / `with_hidden_keep`); keep fractions are in (0, 1].
    """

    closed_heads: frozenset[tuple[int, int]] = frozenset()
    attention_off: frozenset[int] = frozenset()  # layers whose whole attention sublayer is closed
    ffn_off: frozenset[int] = frozenset()  # layers whose whole FFN sublayer is closed
    ffn_keep: float = 1.0
    hidden_keep: float = 1.0
    criterion: str = "magnitude"
    base: str | None = None  # GateState JSON to start from (e.g. a training run's snapshot), else dense

    @classmethod
    def from_state(cls, state: GateState) -> ManualGates:
        """Start from `state`: its closed heads and sublayers become switches; its other values (soft
        gates, FFN units, hidden dims) are kept as the base the switches and sliders act on."""
        return cls(closed_heads=frozenset(state.closed_heads()),
                   attention_off=frozenset(torch.nonzero(state.mha == 0).flatten().tolist()),
                   ffn_off=frozenset(torch.nonzero(state.ffn == 0).flatten().tolist()), base=state.to_json())

    def state(self, loaded: LoadedModel) -> GateState:
        start = GateState.from_json(self.base) if self.base else GateState.dense(loaded)
        groups = {}
        for name, off in (("head", self.closed_heads), ("mha", self.attention_off), ("ffn", self.ffn_off)):
            values = getattr(start, name).clone()
            values[values == 0] = 1.0  # a switch turned back on opens fully
            for index in off:
                values[index] = 0.0
            groups[name] = values
        state = start.replace(**groups)
        if self.ffn_keep < 1:
            state = state.with_ffn_keep(loaded.adapter, self.ffn_keep, self.criterion)
        if self.hidden_keep < 1:
            state = state.with_hidden_keep(loaded.adapter, self.hidden_keep, self.criterion)
        return state

    def describe(self) -> str:
        """One short line: what is closed."""
        parts = [f"{len(self.closed_heads)} heads closed"] if self.closed_heads else []
        parts += [f"attention off in L{','.join(map(str, sorted(self.attention_off)))}"] if self.attention_off else []
        parts += [f"FFN off in L{','.join(map(str, sorted(self.ffn_off)))}"] if self.ffn_off else []
        parts += [f"FFN keep {self.ffn_keep:.0%}"] if self.ffn_keep < 1 else []
        parts += [f"hidden keep {self.hidden_keep:.0%}"] if self.hidden_keep < 1 else []
        parts = (["from a saved gate state"] if self.base else []) + parts
        return ", ".join(parts) or "dense"


def least_relevant_heads(table, k: int, column: str = "relevance") -> frozenset[tuple[int, int]]:
    """The `k` heads with the smallest `column` in a one-row-per-head table (Heads report)."""
    rows = table.nsmallest(k, column)
    return frozenset((int(r.layer), int(r.head)) for r in rows.itertuples())


def heads_without_role(table) -> frozenset[tuple[int, int]]:
    """Heads whose `roles` is empty in a Heads report (closing them keeps only role-bearing heads)."""
    rows = table[table["roles"].fillna("") == ""]
    return frozenset((int(r.layer), int(r.head)) for r in rows.itertuples())
