"""Wanda (Sun, Liu, Bair, Kolter, ICLR 2024; github.com/locuslab/wanda) and its structured variant
Wanda-sp (An et al. 2024, github.com/CASIA-IVA-Lab/FLAP `prune_wanda_sp`), one-shot, no weight update.

Both score weight W_ij of a Linear (out i, in j) by S_ij = |W_ij| * ||X_j||_2, the L2 norm of input
feature j over the calibration tokens, and prune the layers in order, each measured on the outputs of
the already pruned earlier layers (`pruning.sequential`), as the authors' code does.

    wanda      every Linear of every layer (Q, K, V, attention output, FFN in (and gate), FFN out): zero
               the int(s * in) lowest-scoring weights of each output row, or (2:4) the 2 lowest of each
               4 consecutive inputs of a row. Returns weight masks on a dense structure: the model keeps
               its shape and its dense speed on the CPU.
    wanda-sp   the same ratio of heads and FFN units in every layer: head h scores sum over its input
               columns j of the attention output of mean_i S_ij, FFN unit j scores mean_i S_ij of the FFN
               output's column j; closed units are removed physically by surgery.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.adapter import GateShape
from core.loaded import LoadedModel
from pruning import calibration
from pruning.calibration import InputStats
from pruning.gate_state import GateState
from pruning.methods.base import OneShotResult, PruningMethod, register
from pruning.options import option
from pruning.selection import per_layer_state
from pruning.sequential import editable_copy, sequential_prune
from pruning.size import exact_sparsity
from pruning.sparsity_search import closest_state, keep_mask

BATCH = 8  # calibration examples per forward pass
PATTERNS = ("unstructured", "2:4")


def wanda_scores(weight: torch.Tensor, stats: InputStats) -> torch.Tensor:
    """(out, in) S_ij = |W_ij| * ||X_j||_2 (float64)."""
    return weight.detach().double().abs() * stats.norm.reshape(1, -1)


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """0/1 (out, in) mask closing the int(sparsity * in) lowest scores of every row (ties: lower index first)."""
    drop = int(scores.shape[1] * sparsity)
    mask = torch.ones(scores.shape)
    mask.scatter_(1, torch.sort(scores, dim=1, stable=True).indices[:, :drop], 0.0)
    return mask


def two_four_mask(scores: torch.Tensor) -> torch.Tensor:
    """0/1 (out, in) mask closing the 2 lowest scores of each group of 4 consecutive inputs of every row."""
    out, cols = scores.shape
    groups = scores.reshape(out, cols // 4, 4)
    mask = torch.ones(groups.shape)
    mask.scatter_(2, torch.topk(groups, 2, dim=2, largest=False).indices, 0.0)
    return mask.reshape(out, cols)


def layer_linears(loaded: LoadedModel, layer: int) -> dict[str, torch.nn.Linear]:
    """Every Linear of `layer`, by parameter name of its weight in `loaded.model`: Q, K, V, the attention
    output, FFN in, SwiGLU's gate (decoders) and FFN out."""
    a = loaded.adapter
    modules = [a.query(layer), a.key(layer), a.value(layer), a.attention_output(layer), a.ffn_in(layer),
               a.ffn_gate(layer), a.ffn_out(layer)]
    names = {id(p): name for name, p in loaded.model.named_parameters()}
    return {names[id(m.weight)]: m for m in modules if m is not None}


def calibration_batches(method: PruningMethod, n: int) -> list[calibration.Batch]:
    """`n` seeded examples of the run's training split, in batches of BATCH."""
    examples = method.context.examples
    if examples is None:
        raise ValueError(f"{method.name} needs the run's training examples for its calibration pass.")
    return calibration.batches(examples, n, BATCH, method.context.seed)


def refuse_lora(name: str, config) -> None:
    if config.lora:
        raise ValueError(f"{name} masks weights: a LoRA delta merged into them would fill the zeros in. "
                         "Run it without lora (a full fine-tune keeps the masks applied).")


@dataclass
class WandaOptions:
    pattern: str = option("unstructured", "unstructured: zero the lowest-scoring target_sparsity fraction of each "
                          "output row; 2:4: zero the 2 lowest of every 4 consecutive inputs of a row (50% by "
                          "definition). Masks only: the model keeps its dense size and CPU speed (dense kernels "
                          "multiply the zeros too); see pruning.sparse_size for its size in a sparse format",
                          choices=PATTERNS)
    target_sparsity: float = option(0.5, "fraction of every weight row of the layers' Linears to zero "
                                    "(unstructured; 2:4 needs 0.5)", low=0.0, high=1.0, open_low=True, open_high=True)
    calibration_examples: int = option(64, "training examples whose activations give ||X_j|| (the paper: 128 C4 "
                                       "sequences of 2048 tokens)", low=1)


@register
class Wanda(PruningMethod):
    name = "wanda"
    order = 20
    summary = ("one-shot (encoders and decoders): zero the weights of least |W_ij|*||X_j|| in each output row (Sun et "
               "al. 2024), layer by layer on the pruned layers' activations; masks only: no smaller or faster model "
               "on the CPU's dense kernels; the paper does not retrain (finetune_steps 0)")
    Options = WandaOptions

    @classmethod
    def check_config(cls, options, config) -> None:
        refuse_lora(cls.name, config)
        if options.pattern == "2:4" and options.target_sparsity != 0.5:
            raise ValueError(f"The 2:4 pattern zeroes 2 of every 4 weights: its sparsity is 0.5, not "
                             f"{options.target_sparsity}. Leave target_sparsity at 0.5.")

    @classmethod
    def check_model(cls, options, loaded: LoadedModel) -> None:
        if options.pattern == "2:4":
            odd = [n for i in range(len(loaded.adapter.layers)) for n, m in layer_linears(loaded, i).items()
                   if m.in_features % 4]
            if odd:
                raise ValueError(f"2:4 needs Linears whose inputs come in groups of 4; {odd[0]} has "
                                 f"{loaded.model.get_parameter(odd[0]).shape[1]}.")

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        if self.options.pattern == "2:4":
            return two_four_mask(scores)
        return row_mask(scores, self.options.target_sparsity)

    def prune(self) -> OneShotResult:
        c = self.context
        work = editable_copy(c.base, "wanda")
        masks: dict[str, torch.Tensor] = {}

        def prune_layer(layer: int, stats: dict[str, InputStats]) -> None:
            for name, module in layer_linears(work, layer).items():
                mask = self.mask(wanda_scores(module.weight, stats[name]))
                module.weight.mul_(mask.to(module.weight.dtype))
                masks[name] = mask

        c.progress(0, len(work.adapter.layers), "wanda: calibrating layer by layer")
        sequential_prune(work, c.examples, calibration_batches(self, self.options.calibration_examples),
                         lambda layer: layer_linears(work, layer), prune_layer, c.progress)
        return OneShotResult(GateState.dense(c.shape), masks=masks)


# ----------------------------------------------------------------------------- Wanda-sp


def structured_scores(loaded: LoadedModel, layer: int, stats: dict[str, InputStats]) -> tuple[torch.Tensor, ...]:
    """Wanda-sp's (H,) head and (d_ff,) FFN-unit scores of `layer` from the input statistics of its
    attention output and FFN output (keys "o", "down"): head h = sum over its columns j of mean_i S_ij,
    unit j = mean_i S_ij."""
    a = loaded.adapter
    heads = wanda_scores(a.attention_output(layer).weight, stats["o"]).mean(0)
    units = wanda_scores(a.ffn_out(layer).weight, stats["down"]).mean(0)
    return heads.reshape(a.num_heads(layer), -1).sum(1), units


def output_linears(loaded: LoadedModel, layer: int) -> dict[str, torch.nn.Linear]:
    return {"o": loaded.adapter.attention_output(layer), "down": loaded.adapter.ffn_out(layer)}


@dataclass
class WandaSPOptions:
    target_sparsity: float = option(0.2, "fraction of the layers' weights to remove (the same share of heads and "
                                    "of FFN units in every layer)", low=0.0, high=1.0, open_low=True, open_high=True)
    calibration_examples: int = option(64, "training examples whose activations give ||X_j|| (the FLAP repo: 128 "
                                       "sequences of 128 tokens)", low=1)


@register
class WandaSP(PruningMethod):
    name = "wanda-sp"
    order = 21
    summary = ("one-shot (encoders and decoders): remove the same share of heads and FFN units in every layer, "
               "scored by Wanda's |W_ij|*||X_j|| on the attention / FFN output columns, layer by layer on the pruned "
               "layers' activations (structured Wanda of the FLAP repo)")
    Options = WandaSPOptions

    def target(self, step: int) -> float | None:
        return self.options.target_sparsity

    def prune(self) -> GateState:
        c = self.context
        batches = calibration_batches(self, self.options.calibration_examples)
        stats = calibration.linear_inputs(c.base, c.examples, batches, {
            f"{layer}.{key}": m for layer in range(c.shape.layers) for key, m in output_linears(c.base, layer).items()})
        dense_scores = [structured_scores(c.base, layer, {k: stats[f"{layer}.{k}"] for k in ("o", "down")})
                        for layer in range(c.shape.layers)]
        # The counts are chosen on scores of the unpruned model; the sequential pass then picks which units.
        # Under GQA the sparsity depends on which heads close too (a KV head goes with its whole group):
        # counts re-chosen on the sequential scores get one more pass when they differ.
        state = self.closest(dense_scores)
        best, scores = self.sequential(batches, self.counts(state))
        again = self.closest(scores)
        if self.counts(again) != self.counts(state):
            other, _ = self.sequential(batches, self.counts(again))
            best = min(best, other, key=self.gap)
        return best

    def closest(self, scores: list[tuple[torch.Tensor, torch.Tensor]]) -> GateState:
        heads, units = (torch.stack(parts) for parts in zip(*scores))
        return closest_state(lambda keep: per_layer_state(self.context.shape, heads, units, keep), self.context.sizes,
                             self.options.target_sparsity)

    @staticmethod
    def counts(state: GateState) -> tuple[int, int]:
        """Heads and FFN units kept per layer (the same in every layer)."""
        return int(state.head[0].sum()), int(state.intermediate[0].sum())

    def gap(self, state: GateState) -> float:
        return abs(exact_sparsity(state, model=self.context.sizes) - self.options.target_sparsity)

    def sequential(self, batches, counts: tuple[int, int]):
        """The state keeping `counts` (heads, units) per layer chosen layer by layer on the pruned layers'
        activations (closed heads' and units' output columns zeroed in a copy: what the gates do), and
        the per-layer scores it used."""
        c = self.context
        work = editable_copy(c.base, "wanda-sp")
        shape: GateShape = c.shape
        head, units, scores = torch.ones(shape.layers, shape.heads), torch.ones(shape.layers, shape.intermediate), []

        def prune_layer(layer: int, stats: dict[str, InputStats]) -> None:
            h, u = structured_scores(work, layer, stats)
            scores.append((h, u))
            head[layer], units[layer] = keep_mask(h, counts[0]), keep_mask(u, counts[1])
            o, down = work.adapter.attention_output(layer), work.adapter.ffn_out(layer)
            o.weight.mul_(head[layer].repeat_interleave(shape.head_dim).to(o.weight.dtype))
            down.weight.mul_(units[layer].to(down.weight.dtype))

        sequential_prune(work, c.examples, batches, lambda layer: output_linears(work, layer), prune_layer, c.progress)
        return GateState.dense(shape).replace(head=head, intermediate=units), scores

