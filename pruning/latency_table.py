"""ZipLM's latency table: how long each sublayer takes on this machine at each level of pruning, so that
a structure's latency can be predicted without timing it (Kurtic, Frantar, Alistarh 2023).

Measured on whole models cut by `pruning.surgery.prune` (so the timed code is the code a pruned model
runs), on a synthetic batch of `batch_size` x `seq_len` tokens (no padding) with the process's torch
threads, each by `core.latency.time_forward` (median of repeats; a call during which the CPU queue
paused the process is timed again):

    constant     every layer with 0 heads and 0 FFN units: embeddings, norms, residuals, head
    attention h  every layer with its first h heads (FFN empty): (t - constant) / L per layer, h = 0..H
    ffn w        every layer with its first w units (no heads): (t - constant) / L, w on a grid of
                 FFN_GRID + 1 widths 0, d_ff/FFN_GRID, ..., d_ff

Simplifications (vs the paper's per-layer-type microbenchmarks): an entry is the average over the L
layers of the model's own forward (one layer's share is below timing noise on small models); entries
are made non-negative and non-decreasing in h / w (more heads are never faster; each entry is the least
of its own and the larger levels' times; the cleaned table is what predictions use, the raw medians are
kept beside it); a decoder's h heads are its first h query
heads, so they fill KV groups in order (ceil(h / group) KV heads): a structure with scattered heads
keeps more KV heads than the entry assumes. FFN widths between grid points are interpolated linearly.
What is timed is `loaded.model` (an encoder's or a prompted decoder's classifier).

A table is cached per machine (host name, CPU model, threads), model (a hash of its config and class)
and batch shape as JSON under HEADLAB_HOME/latency_tables (`load_or_build`); the file is written
atomically (`core.folders.write_text_atomically`).
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from core.adapter import GateShape
from core.folders import write_text_atomically
from core.latency import time_forward
from core.loaded import LoadedModel
from core.paths import headlab_home
from pruning.gate_state import GateState
from pruning.surgery import prune

VERSION = 1
FFN_GRID = 16  # FFN widths measured: d_ff * k / FFN_GRID, k = 0 .. FFN_GRID
BATCH_SIZE = 8
SEQ_LEN = 128
Progress = Callable[[int, int, str], None]  # done, total, message


@dataclass(frozen=True)
class Structure:
    """Kept heads and FFN units per layer (counts)."""

    heads: tuple[int, ...]
    units: tuple[int, ...]

    @classmethod
    def of(cls, state: GateState) -> Structure:
        """The counts a gate state keeps (a layer with mha = 0 / ffn = 0 keeps none of that sublayer)."""
        s = state.detach()
        heads = ((s.head > 0) & (s.mha[:, None] > 0)).sum(1)
        units = ((s.intermediate > 0) & (s.ffn[:, None] > 0)).sum(1)
        return cls(tuple(int(h) for h in heads), tuple(int(u) for u in units))


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def model_hash(loaded: LoadedModel) -> str:
    """A hash of what sets the timed model's cost: its class, config and number of outputs."""
    model = loaded.model
    text = f"{type(model).__name__}:{len(loaded.label_names)}:{model.config.to_json_string(use_diff=False)}"
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def table_key(loaded: LoadedModel, batch_size: int, seq_len: int, grid: int = FFN_GRID) -> dict:
    """What a cached table must match: machine, threads, model, batch shape and FFN grid."""
    return {"version": VERSION, "host": socket.gethostname(), "cpu": cpu_model(), "threads": torch.get_num_threads(),
            "model": model_hash(loaded), "batch_size": batch_size, "seq_len": seq_len, "grid": grid}


def cache_path(key: dict) -> Path:
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return headlab_home() / "latency_tables" / f"{digest}.json"


def ffn_widths(d_ff: int, grid: int = FFN_GRID) -> list[int]:
    """The FFN widths a table measures: grid + 1 evenly spaced counts from 0 to d_ff (duplicates dropped)."""
    return sorted({int(round(d_ff * k / grid)) for k in range(grid + 1)})


def _cleaned(raw: Sequence[float]) -> list[float]:
    """Non-negative, non-decreasing entries: each the least of its own and all larger levels' times (more
    kept units are never faster, and a level slowed by other work on the machine does not lift the rest)."""
    values = np.maximum(np.asarray(raw, dtype=float), 0.0)
    return [float(x) for x in np.minimum.accumulate(values[::-1])[::-1]]


@dataclass
class LatencyTable:
    """Seconds per forward of one batch (`key`'s batch shape). `attention[h]`: one attention sublayer
    keeping h heads (h = 0..H); `ffn[i]`: one FFN keeping `widths[i]` units; both relative to the same
    sublayer kept empty, whose cost is in `constant` with the embeddings and head. `raw` holds the
    measured medians of the whole models, `build_s` the seconds the measurement took."""

    key: dict
    layers: int
    constant: float
    attention: list[float]
    widths: list[int]
    ffn: list[float]
    raw: dict = field(default_factory=dict)
    build_s: float = 0.0
    cached: bool = field(default=False, compare=False)  # read from the cache (not stored)

    @property
    def heads(self) -> int:
        return len(self.attention) - 1

    def attention_s(self, heads: int) -> float:
        return self.attention[heads]

    def ffn_s(self, width: int) -> float:
        """One FFN keeping `width` units (linear between the measured widths)."""
        return float(np.interp(width, self.widths, self.ffn))

    def predicted_latency(self, structure: Structure | GateState) -> float:
        """Predicted seconds of a forward of the model pruned to `structure`: the constant plus every
        layer's attention and FFN entries."""
        s = structure if isinstance(structure, Structure) else Structure.of(structure)
        if len(s.heads) != self.layers or len(s.units) != self.layers:
            raise ValueError(f"The structure has {len(s.heads)} layers; the table {self.layers}.")
        return self.constant + sum(self.attention_s(h) + self.ffn_s(u) for h, u in zip(s.heads, s.units))

    @property
    def dense(self) -> float:
        """Predicted seconds of the unpruned model."""
        return self.constant + self.layers * (self.attention[-1] + self.ffn[-1])

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("cached")
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str) -> LatencyTable:
        return cls(**json.loads(text))


def synthetic_batch(loaded: LoadedModel, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask (batch_size, seq_len): seeded random ordinary token ids, no padding
    (the cost of a forward does not depend on which tokens it reads)."""
    vocab = loaded.adapter.word_embeddings.weight.shape[0]
    ids = torch.randint(0, min(vocab, len(loaded.text_tokenizer)), (batch_size, seq_len),
                        generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def level_state(shape: GateShape, heads: int, units: int) -> GateState:
    """Every layer keeping its first `heads` heads and first `units` FFN units."""
    head = torch.zeros(shape.layers, shape.heads)
    head[:, :heads] = 1.0
    intermediate = torch.zeros(shape.layers, shape.intermediate)
    intermediate[:, :units] = 1.0
    return GateState.dense(shape).replace(head=head, intermediate=intermediate)


def time_state(loaded: LoadedModel, state: GateState, batch: dict[str, torch.Tensor], repeats: int = 5,
               budget_s: float = 1.0) -> float:
    """Median seconds of a forward of `loaded` pruned to `state` on `batch`."""
    pruned = prune(loaded, state)
    return time_forward(pruned.model, batch, warmup=1, repeats=repeats, budget_s=budget_s).median_s


def build(loaded: LoadedModel, batch_size: int = BATCH_SIZE, seq_len: int = SEQ_LEN, *, grid: int = FFN_GRID,
          rounds: int = 3, repeats: int = 5, budget_s: float = 1.0, progress: Progress | None = None) -> LatencyTable:
    """Measure the table of `loaded` (unpruned) on this machine (see the module docstring): every level
    is timed once per round, the rounds going over all levels in turn, and its fastest round counts (a
    round slowed by other work on the machine is dropped)."""
    start = time.perf_counter()
    shape = GateShape.of(loaded)
    batch = synthetic_batch(loaded, batch_size, seq_len)
    widths = ffn_widths(shape.intermediate, grid)
    levels = [(0, 0), *((h, 0) for h in range(1, shape.heads + 1)), *((0, w) for w in widths[1:])]
    times = np.full((rounds, len(levels)), np.inf)
    for r in range(rounds):
        for i, (heads, units) in enumerate(levels):
            if progress:
                progress(r * len(levels) + i, rounds * len(levels), f"latency table: {heads} heads, {units} units")
            times[r, i] = time_state(loaded, level_state(shape, heads, units), batch, repeats, budget_s)
    best = times.min(axis=0)
    constant = float(best[0])
    attention = [0.0, *((best[1:shape.heads + 1] - constant) / shape.layers)]
    ffn = [0.0, *((best[shape.heads + 1:] - constant) / shape.layers)]
    raw = {"levels": [list(level) for level in levels], "seconds": times.tolist()}
    return LatencyTable(key=table_key(loaded, batch_size, seq_len, grid), layers=shape.layers, constant=constant,
                        attention=_cleaned(attention), widths=widths, ffn=_cleaned(ffn), raw=raw,
                        build_s=time.perf_counter() - start)


def load_or_build(loaded: LoadedModel, batch_size: int = BATCH_SIZE, seq_len: int = SEQ_LEN, *, grid: int = FFN_GRID,
                  progress: Progress | None = None, **kwargs) -> LatencyTable:
    """The cached table of this machine, model, batch shape and grid, else a new one (`build` with
    `kwargs`: rounds, repeats, budget_s), cached."""
    key = table_key(loaded, batch_size, seq_len, grid)
    path = cache_path(key)
    if path.is_file():
        try:
            table = LatencyTable.from_json(path.read_text())
        except (ValueError, TypeError):
            table = None  # unreadable: measured again and replaced
        if table is not None and table.key == key:
            table.cached = True
            return table
    table = build(loaded, batch_size, seq_len, grid=grid, progress=progress, **kwargs)
    write_text_atomically(path, table.to_json())
    return table


@dataclass
class PredictionCheck:
    """The table's prediction for a structure against the pruned model timed now (seconds)."""

    predicted_s: float
    measured_s: float

    @property
    def ratio(self) -> float:
        """measured / predicted."""
        return self.measured_s / self.predicted_s if self.predicted_s > 0 else math.inf


def check_prediction(source: LoadedModel, table: LatencyTable, state: GateState, rounds: int = 3,
                     repeats: int = 5) -> PredictionCheck:
    """Time `source` pruned to `state` at the table's batch shape (fastest of `rounds` medians, as the
    table's entries) and compare with the prediction."""
    batch = synthetic_batch(source, table.key["batch_size"], table.key["seq_len"])
    measured = min(time_state(source, state, batch, repeats) for _ in range(rounds))
    return PredictionCheck(table.predicted_latency(state), measured)
