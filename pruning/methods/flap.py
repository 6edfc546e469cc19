"""FLAP (An et al., AAAI 2024; github.com/CASIA-IVA-Lab/FLAP `prune_flap`, structure AL-AM, metric WIFV):
fluctuation-based structured pruning with bias compensation, no retraining.

One calibration pass through the unpruned model gives, for each input channel j of every attention
output (o_proj) and FFN output (down_proj), the variance Var_n(X_nj) and mean of X_nj over the tokens:

    WIFV       S_j = Var_n(X_nj) * ||W_:,j||^2; squared for the attention output's channels (the authors'
               code squares the o_proj metric, as METHODS.md's S_j^2)
    AL-AM      S standardised within each layer and module ((S - mean) / std over its channels); a head
               scores the mean of its head_dim channels, an FFN unit its own; all heads and units of all
               layers in one sort, cut where the exact sparsity (`pruning.size`) is closest to the target
    bias       the output projection's bias gains W_:,pruned . mean(X_pruned): the pruned channels' mean
               contribution, so the projection's mean output on the calibration set stays the dense one

The authors' code assumes multi-head attention with head_dim 128 and counts a head as 512/3 FFN units;
here heads of any head_dim, GQA (query heads are scored; a KV head goes with its whole group, by
surgery) and the model's own size model set the cut.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.loaded import LoadedModel
from core.structure import causal_lm
from pruning import calibration
from pruning.calibration import InputStats
from pruning.gate_state import GateState
from pruning.methods.base import OneShotResult, PruningMethod, register
from pruning.methods.wanda import calibration_batches
from pruning.options import option
from pruning.selection import global_state
from pruning.sequential import editable_copy
from pruning.sparsity_search import closest_state

# decoder types whose config can give every projection a bias that a saved model keeps (load_pruned
# builds the architecture from config.json): config flags -> the parts they switch on
BIAS_FLAGS = {"llama": ("attention_bias", "mlp_bias")}


def wifv(weight: torch.Tensor, stats: InputStats) -> torch.Tensor:
    """(in,) FLAP's weighted input feature variance Var_n(X_nj) * ||W_:,j||_2^2 (float64)."""
    return stats.variance * weight.detach().double().pow(2).sum(0)


def standardised(scores: torch.Tensor) -> torch.Tensor:
    """(L, n) scores standardised per row (layer): (S - mean) / std (unbiased, as torch.std)."""
    return (scores - scores.mean(1, keepdim=True)) / scores.std(1, keepdim=True).clamp_min(1e-30)


def flap_scores(loaded: LoadedModel, stats: dict[str, InputStats]) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, H) head and (L, d_ff) FFN-unit AL-AM scores from the input statistics of each layer's attention
    output ("l.o") and FFN output ("l.down")."""
    a, layers = loaded.adapter, range(len(loaded.adapter.layers))
    channels = torch.stack([wifv(a.attention_output(i).weight, stats[f"{i}.o"]) ** 2 for i in layers])
    units = torch.stack([wifv(a.ffn_out(i).weight, stats[f"{i}.down"]) for i in layers])
    heads = standardised(channels).reshape(len(layers), a.num_heads(0), -1).mean(2)
    return heads, standardised(units)


def compensated_copy(loaded: LoadedModel, state: GateState, stats: dict[str, InputStats]) -> LoadedModel:
    """A copy of `loaded` whose attention and FFN output biases gain W_:,closed . mean(X_closed) for the
    channels `state` closes (a decoder without those biases gets zero biases on every projection first,
    with its config saying so: a saved and reloaded model keeps them)."""
    copy = editable_copy(loaded, f"flap:{state.to_json()}")
    a = copy.adapter
    if copy.is_decoder:
        add_biases(copy)
    with torch.no_grad():
        for layer in range(len(a.layers)):
            closed = [(a.attention_output(layer), (state.head[layer] == 0).repeat_interleave(a.head_dim(layer)),
                       stats[f"{layer}.o"]), (a.ffn_out(layer), state.intermediate[layer] == 0, stats[f"{layer}.down"])]
            for linear, gone, s in closed:
                w = linear.weight.detach().double()
                linear.bias += (w[:, gone] @ s.mean[gone]).to(linear.bias.dtype)
    return copy


def add_biases(loaded: LoadedModel) -> None:
    """Zero biases on every Linear of a decoder's layers that has none, and the config flags that build them."""
    config = causal_lm(loaded.model).config
    for flag in BIAS_FLAGS[config.model_type]:
        setattr(config, flag, True)
    a = loaded.adapter
    for layer in range(len(a.layers)):
        for linear in (a.query(layer), a.key(layer), a.value(layer), a.attention_output(layer), a.ffn_in(layer),
                       a.ffn_gate(layer), a.ffn_out(layer)):
            if linear is not None and linear.bias is None:
                linear.bias = torch.nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype))


@dataclass
class FlapOptions:
    target_sparsity: float = option(0.2, "fraction of the layers' weights to remove (heads and FFN units of all "
                                    "layers ranked together)", low=0.0, high=1.0, open_low=True, open_high=True)
    calibration_examples: int = option(64, "training examples whose activations give the channels' variance and "
                                       "mean (the authors: 1024 sequences of 128 tokens)", low=2)
    compensate: bool = option(True, "add the pruned channels' mean contribution to the output projections' bias "
                              "(FLAP's bias compensation; a Qwen2 or Gemma3 decoder has no such bias: set false)")


@register
class Flap(PruningMethod):
    name = "flap"
    order = 22
    summary = ("one-shot (encoders and decoders): remove the heads and FFN units of least standardised fluctuation "
               "Var(X_j)*||W_:,j||^2 over all layers, compensating their mean in the output bias (An et al. 2024); "
               "the paper does not retrain: set finetune_steps 0 (the run's default fine-tunes)")
    Options = FlapOptions

    @classmethod
    def check_model(cls, options, loaded: LoadedModel) -> None:
        a = loaded.adapter
        has = a.attention_output(0).bias is not None and a.ffn_out(0).bias is not None
        if options.compensate and not has and loaded.model.config.model_type not in BIAS_FLAGS:
            raise ValueError(f"FLAP's bias compensation needs biases on the attention and FFN outputs; "
                             f"transformers' {loaded.model.config.model_type} cannot have both (a saved model "
                             "would lose them). Run flap with compensate false.")

    def target(self, step: int) -> float | None:
        return self.options.target_sparsity

    def prune(self) -> OneShotResult:
        c = self.context
        c.progress(0, 1, "flap: calibration pass")
        linears = {f"{layer}.{key}": module for layer in range(c.shape.layers)
                   for key, module in (("o", c.base.adapter.attention_output(layer)),
                                       ("down", c.base.adapter.ffn_out(layer)))}
        stats = calibration.linear_inputs(c.base, c.examples,
                                          calibration_batches(self, self.options.calibration_examples), linears)
        heads, units = flap_scores(c.base, stats)
        state = closest_state(lambda keep: global_state(c.shape, heads, units, keep), c.sizes,
                              self.options.target_sparsity)
        source = compensated_copy(c.base, state, stats) if self.options.compensate else None
        return OneShotResult(state, source=source)
