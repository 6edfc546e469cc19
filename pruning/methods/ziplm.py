"""ZipLM (Kurtic, Frantar, Alistarh, NeurIPS 2023): one-shot structured OBS to a latency target.

1. A latency table of this machine (`pruning.latency_table`): one attention sublayer keeping h heads,
   one FFN keeping w units, at the run's timed batch shape.
2. Per layer, structured OBS (`pruning.obs`) on the calibration inputs of the attention output
   projection (a structure = one head's d_head input columns) and of the FFN output projection (one
   unit's column): structures removed one at a time, lowest saliency first, the remaining weights
   updated after each; the error and the weights are kept at every count.
3. A dynamic programme over the 2L sublayers picks each one's level (heads kept, FFN width kept) that
   minimises the summed OBS error with predicted latency <= dense latency / target_speedup.

The method returns the OBS-updated copy as the model to slice, and the state closing the removed heads
and units; the run's fine-tune then distils from the dense teacher (always, as ZipLM does).

Simplified vs the paper: one-shot only (no gradual pruning with token-level distillation); all Hessians
come from the dense model's inputs (not layer by layer from the pruned model's); the FFN widths are a
grid of `ffn_grid` + 1 levels; the latency table averages each sublayer over the model's
layers (see `pruning.latency_table`); decoder heads are query heads (a KV head goes only with its whole
group), while the table times the first h query heads, which fill KV groups in order.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from core.adapter import Adapter, GateShape
from core.data import TextDataset
from core.loaded import LoadedModel
from pruning import latency_table
from pruning.calibration import batches, linear_inputs
from pruning.examples import Examples
from pruning.gate_state import GateState
from pruning.latency_table import LatencyTable, Structure
from pruning.methods.base import OneShotResult, Progress, PruningMethod, register
from pruning.obs import ObsPath, hessian, obs_path, refit
from pruning.options import option

CALIBRATION_BATCH = 8  # examples per calibration forward pass
GRAM_BUDGET = 256 * 2 ** 20  # bytes of Gram matrices (float64) collected per calibration pass
BUCKETS = 4000  # the latency budget's resolution in the dynamic programme


@dataclass
class ZipLMOptions:
    target_speedup: float = option(2.0, "predicted speed-up over the dense model, from this machine's latency table "
                                        "(sublayer entries averaged over the layers; 1 keeps the dense model)",
                                   low=1.0)
    calibration_examples: int = option(128, "training examples whose layer inputs give the OBS Hessians 2XᵀX "
                                            "(dampened by 1% of their mean diagonal)", low=0, open_low=True)
    ffn_grid: int = option(latency_table.FFN_GRID, "FFN widths to choose from: d_ff * k / ffn_grid, k = 0 .. ffn_grid "
                                                   "(each timed for the latency table)", low=0, open_low=True)
    latency_batch_size: int = option(latency_table.BATCH_SIZE, "batch size the latency table is timed at", low=0,
                                     open_low=True)
    latency_seq_len: int = option(latency_table.SEQ_LEN, "tokens per example the latency table is timed at", low=0,
                                  open_low=True)


@dataclass
class LayerSolutions:
    """Every layer's OBS paths (order and error at every count; weights are rebuilt for the chosen count
    by `pruning.obs.refit`): `attention[l]` over its heads, `ffn[l]` over its FFN units; `calibration`
    the batches whose inputs gave the Hessians."""

    attention: list[ObsPath]
    ffn: list[ObsPath]
    widths: list[int]
    calibration: list

    def attention_errors(self) -> np.ndarray:
        """(L, H + 1): error of layer l keeping h heads."""
        return np.stack([p.errors.flip(0).numpy() for p in self.attention])

    def ffn_errors(self) -> np.ndarray:
        """(L, len(widths)): error of layer l keeping widths[i] units."""
        return np.stack([np.array([float(p.errors[p.count - w]) for w in self.widths]) for p in self.ffn])


def layer_groups(shape: GateShape, budget: int = GRAM_BUDGET) -> list[range]:
    """Consecutive layers whose two Gram matrices (float64) fit `budget` bytes together (at least one)."""
    per_layer = 8 * ((shape.heads * shape.head_dim) ** 2 + shape.intermediate ** 2)
    step = max(1, budget // per_layer)
    return [range(i, min(i + step, shape.layers)) for i in range(0, shape.layers, step)]


def layer_hessians(loaded: LoadedModel, examples: Examples, calibration: list) -> Iterator[tuple[int, dict]]:
    """(layer, {"attention": (output projection, H), "ffn": (FFN output projection, H)}) for every layer,
    H = 2 XᵀX of the projection's inputs over the `calibration` batches; one calibration pass per group of
    layers whose Grams fit `GRAM_BUDGET`."""
    a = loaded.adapter
    for group in layer_groups(GateShape.of(loaded)):
        linears = {name: module for layer in group for name, module in
                   ((f"{layer}.attention", a.attention_output(layer)), (f"{layer}.ffn", a.ffn_out(layer)))}
        stats = linear_inputs(loaded, examples, calibration, linears, gram=True)
        for layer in group:
            yield layer, {kind: (linears[f"{layer}.{kind}"], hessian(stats[f"{layer}.{kind}"].gram))
                          for kind in ("attention", "ffn")}


def solve_layers(loaded: LoadedModel, examples: Examples, n: int, seed: int, widths: list[int],
                 progress: Progress | None = None) -> LayerSolutions:
    """OBS paths of every layer of `loaded` (unpruned) from `n` calibration examples."""
    shape = GateShape.of(loaded)
    calibration = batches(examples, n, CALIBRATION_BATCH, seed)
    paths: dict[str, list[ObsPath]] = {"attention": [], "ffn": []}
    for layer, parts in layer_hessians(loaded, examples, calibration):
        if progress:
            progress(layer, shape.layers, f"OBS: layer {layer + 1} of {shape.layers}")
        for kind, size in (("attention", shape.head_dim), ("ffn", 1)):
            module, h = parts[kind]
            paths[kind].append(obs_path(module.weight, h, size))
    return LayerSolutions(paths["attention"], paths["ffn"], widths, calibration)


def search(table: LatencyTable, attention_errors: np.ndarray, ffn_errors: np.ndarray, target_s: float,
           buckets: int = BUCKETS) -> Structure:
    """The levels (heads kept, FFN width kept from `table.widths`) of every layer of least summed error
    whose predicted latency is at most `target_s` seconds: a dynamic programme over the 2L sublayers on
    the budget target_s − table.constant cut into `buckets` units, each entry's cost rounded up (so
    the sum of costs within the budget guarantees the predicted latency within the target).
    ValueError if even the emptiest structure does not fit."""
    layers = table.layers
    if table.dense <= target_s:
        return Structure((table.heads,) * layers, (table.widths[-1],) * layers)
    budget = target_s - table.constant
    if budget <= 0:
        raise ValueError(f"The target latency {target_s * 1e3:.3g} ms is below what the embeddings, norms and head "
                         f"take alone ({table.constant * 1e3:.3g} ms, this machine's table): no structure reaches it; "
                         f"choose a smaller target_speedup (at most {table.dense / table.constant:.3g}).")
    unit = budget / buckets
    items = []  # (costs in units, errors) of each sublayer's levels: layer l's attention, then its FFN
    for layer in range(layers):
        items.append((np.ceil(np.asarray(table.attention) / unit).astype(int), attention_errors[layer]))
        items.append((np.ceil(np.asarray(table.ffn) / unit).astype(int), ffn_errors[layer]))
    best = np.full(buckets + 1, np.inf)  # least error of the items so far at exactly this total cost
    best[0] = 0.0
    picks = np.zeros((len(items), buckets + 1), dtype=int)
    for i, (costs, errors) in enumerate(items):
        new, pick = np.full(buckets + 1, np.inf), np.full(buckets + 1, -1)
        for level, (cost, error) in enumerate(zip(costs, errors)):
            if cost > buckets:
                continue
            candidate = np.full(buckets + 1, np.inf)
            candidate[cost:] = best[:buckets + 1 - cost] + error
            better = candidate < new
            new[better], pick[better] = candidate[better], level
        best, picks[i] = new, pick
    total = int(np.argmin(best))
    if not math.isfinite(best[total]):
        raise ValueError(f"No structure fits {target_s * 1e3:.3g} ms on this machine's latency table; choose a "
                         "smaller target_speedup.")
    levels = []
    for i in reversed(range(len(items))):
        level = int(picks[i, total])
        levels.append(level)
        total -= int(items[i][0][level])
    levels.reverse()
    return Structure(tuple(levels[0::2]), tuple(table.widths[j] for j in levels[1::2]))


def apply_solution(loaded: LoadedModel, examples: Examples, solutions: LayerSolutions,
                   structure: Structure) -> OneShotResult:
    """A copy of `loaded` whose output projections carry the OBS weights of `structure`'s levels (rebuilt
    from the calibration inputs: `pruning.obs.refit`), and the state closing the heads and units their
    paths removed (what `pruning.surgery.prune` then slices)."""
    shape = GateShape.of(loaded)
    model = copy.deepcopy(loaded.model)
    adapter = Adapter(model)
    gates = {"attention": torch.ones(shape.layers, shape.heads), "ffn": torch.ones(shape.layers, shape.intermediate)}
    kept = {"attention": structure.heads, "ffn": structure.units}
    targets = {"attention": adapter.attention_output, "ffn": adapter.ffn_out}
    with torch.no_grad():
        for layer, parts in layer_hessians(loaded, examples, solutions.calibration):
            for kind, (module, h) in parts.items():
                path = getattr(solutions, kind)[layer]
                removed = path.removed(path.count - kept[kind][layer])
                target = targets[kind](layer).weight
                target.copy_(refit(module.weight, h, removed, path.size).to(target.dtype))
                gates[kind][layer, removed] = 0.0
    state = GateState.dense(shape).replace(head=gates["attention"], intermediate=gates["ffn"])
    digest = hashlib.sha1(f"{loaded.fingerprint}:ziplm:{state.to_json()}".encode()).hexdigest()[:12]
    source = dataclasses.replace(loaded, model=model, adapter=adapter, fingerprint=digest,
                                 notes=[*loaded.notes, "ZipLM: OBS-updated output projections."])
    return OneShotResult(state=state, source=source)


@dataclass
class ZipLMPlan:
    """What ZipLM decided for one target: the result to slice, its structure and latencies (seconds)."""

    result: OneShotResult
    structure: Structure
    table: LatencyTable
    target_s: float

    @property
    def predicted_s(self) -> float:
        return self.table.predicted_latency(self.structure)

    @property
    def predicted_speedup(self) -> float:
        return self.table.dense / self.predicted_s


def plan(loaded: LoadedModel, examples: Examples, target_speedup: float, *, calibration_examples: int = 128,
         batch_size: int = latency_table.BATCH_SIZE, seq_len: int = latency_table.SEQ_LEN,
         ffn_grid: int = latency_table.FFN_GRID, seed: int = 0, progress: Progress | None = None) -> ZipLMPlan:
    """ZipLM on `loaded` (unpruned) for `target_speedup`: table, OBS paths, search, updated copy."""
    if progress:
        progress(0, 1, "latency table")
    table = latency_table.load_or_build(loaded, batch_size, seq_len, grid=ffn_grid, progress=progress)
    solutions = solve_layers(loaded, examples, calibration_examples, seed, table.widths, progress)
    target_s = table.dense / target_speedup
    structure = search(table, solutions.attention_errors(), solutions.ffn_errors(), target_s)
    return ZipLMPlan(apply_solution(loaded, examples, solutions, structure), structure, table, target_s)


@register
class ZipLM(PruningMethod):
    name = "ziplm"
    order = 12
    summary = ("ZipLM (Kurtic et al. 2023), one-shot only: structured OBS (Hessians from the dense model) on heads "
               "and FFN units with weight updates, per-layer levels searched to a predicted speed-up on this "
               "machine's latency table; the fine-tune distils")
    Options = ZipLMOptions
    distills_always = True

    @classmethod
    def check_model(cls, options, loaded: LoadedModel) -> None:
        GateShape.of(loaded)  # ValueError for an already pruned model (layers of unequal width)

    def prune(self) -> OneShotResult:
        c, o = self.context, self.options
        if c.examples is None:
            raise ValueError("ZipLM needs the run's training examples for its calibration pass.")
        self.plan = plan(c.base, c.examples, o.target_speedup, calibration_examples=o.calibration_examples,
                         batch_size=o.latency_batch_size, seq_len=o.latency_seq_len, ffn_grid=o.ffn_grid,
                         seed=c.seed, progress=c.progress)
        p = self.plan
        c.progress(1, 1, f"ZipLM: predicted {p.predicted_s * 1e3:.3g} ms vs dense {p.table.dense * 1e3:.3g} ms "
                         f"({p.predicted_speedup:.2f}x) at batch {o.latency_batch_size} x {o.latency_seq_len}")
        return p.result


def structure_for_speedup(loaded: LoadedModel, target_speedup: float, data: TextDataset, *, max_length: int = 128,
                          calibration_examples: int = 64, batch_size: int = latency_table.BATCH_SIZE,
                          seq_len: int = latency_table.SEQ_LEN, ffn_grid: int = latency_table.FFN_GRID,
                          seed: int = 0, progress: Progress | None = None) -> ZipLMPlan:
    """The Gates page's preset "target speed-up -> structure": ZipLM's plan for `loaded` (unpruned) with
    the calibration texts of `data` (their labels are not read). `.result.state` is the structure to
    gate; applied to the unchanged model it lacks ZipLM's weight update (`.result.source` has it)."""
    from pruning.session import classification_examples  # the session imports the method registry

    examples = classification_examples(loaded, data, max_length)
    return plan(loaded, examples, target_speedup, calibration_examples=calibration_examples, batch_size=batch_size,
                seq_len=seq_len, ffn_grid=ffn_grid, seed=seed, progress=progress)
