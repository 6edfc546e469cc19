"""`peer`: head pruning with peer distillation, after Li et al. (IJCAI 2023). The paper has no public code; this is
HeadLab's design of its rule "before a head is removed, distil its knowledge into retained peer heads of the same
layer":

- which heads go: the heads (and FFN units, by magnitude) of the one-shot baseline `score` (relevance, importance
  or random, `pruning.baselines`) at `target_sparsity`: exactly the structure plain removal by that score keeps, so
  the two compare at equal heads kept;
- peers: for each removed head r, the `peers` kept heads h of its layer whose outputs c_h = Z_h W_O,h^T (the head's
  share of the attention output over the calibration tokens) are most similar to c_r (|cosine|);
- distillation: the peers' columns of the attention output projection W_O are refit so the layer's attention
  output without the removed heads matches the output with them over the calibration tokens, in closed form
  (ridge least squares: W'_P^T = W_P^T + (G_PP + lambda I)^-1 G_PR W_R^T with G = Z^T Z, the Gram of W_O's input),
  instead of the paper's gradient-trained distillation loss. Every layer is fit on the dense model's inputs (not
  sequentially on the already pruned earlier layers). Then the run fine-tunes as usual.

The layer reconstruction error with and without the distillation is reported (progress and the model's notes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.loaded import LoadedModel
from pruning import calibration
from pruning.baselines import BASELINES, baseline_state
from pruning.methods.base import OneShotResult, PruningMethod, register
from pruning.methods.wanda import calibration_batches
from pruning.options import option
from pruning.sequential import editable_copy


def head_slices(heads: int, head_dim: int, which: list[int]) -> torch.Tensor:
    """Column indices (len(which) * head_dim,) of the heads `which` in W_O's input (heads concatenated)."""
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in which]) if which else \
        torch.zeros(0, dtype=torch.long)


def similar_peers(weight: torch.Tensor, gram: torch.Tensor, head_dim: int, removed: list[int], kept: list[int],
                  peers: int) -> list[int]:
    """The union over `removed` heads of the `peers` kept heads whose outputs are most similar (|cosine| over the
    calibration tokens, from the Gram): weight (d, H * d_h) is W_O, gram (H * d_h, H * d_h) its input's Z^T Z."""
    w = weight.double()
    heads = weight.shape[1] // head_dim

    def inner(a: int, b: int) -> torch.Tensor:  # <c_a, c_b> = tr(W_a G_ab W_b^T)
        ia, ib = head_slices(heads, head_dim, [a]), head_slices(heads, head_dim, [b])
        return (w[:, ia] @ gram[ia][:, ib] * w[:, ib]).sum()

    chosen: set[int] = set()
    for r in removed:
        norm_r = inner(r, r).clamp_min(1e-30).sqrt()
        cosine = {h: float(inner(r, h).abs() / (norm_r * inner(h, h).clamp_min(1e-30).sqrt())) for h in kept}
        chosen.update(sorted(kept, key=lambda h: (-cosine[h], h))[:peers])
    return sorted(chosen)


def distil_into_peers(weight: torch.Tensor, gram: torch.Tensor, head_dim: int, removed: list[int], peers: list[int],
                      ridge: float) -> torch.Tensor:
    """W_O (d, H * d_h) with the `peers`' columns refit to absorb the `removed` heads' output (ridge least squares,
    lambda = `ridge` x the mean diagonal of G_PP); the other columns unchanged. float64 maths, `weight`'s dtype."""
    heads = weight.shape[1] // head_dim
    p, r = head_slices(heads, head_dim, peers), head_slices(heads, head_dim, removed)
    w = weight.double()
    g_pp, g_pr = gram[p][:, p], gram[p][:, r]
    lam = ridge * float(g_pp.diagonal().mean()) if len(p) else 0.0
    delta = torch.linalg.solve(g_pp + lam * torch.eye(len(p), dtype=g_pp.dtype), g_pr @ w[:, r].T)  # (P, d)
    out = w.clone()
    out[:, p] += delta.T
    return out.to(weight.dtype)


def reconstruction_error(new: torch.Tensor, weight: torch.Tensor, gram: torch.Tensor, head_dim: int,
                         removed: list[int]) -> float:
    """sum over calibration tokens of ||Z_K W'_K^T - Z W^T||^2 (the attention output without the removed heads,
    using `new`'s kept columns, against the dense one), from the Gram: tr(D G D^T), D = [W'_K - W_K, -W_R]."""
    r = head_slices(weight.shape[1] // head_dim, head_dim, removed)
    d = new.double() - weight.double()
    d[:, r] = -weight.double()[:, r]
    return float(((d @ gram) * d).sum())


@dataclass
class PeerOptions:
    target_sparsity: float = option(0.6, "fraction of the encoder's / decoder's layer weights to remove (heads by "
                                    "`score`, FFN units by magnitude)", low=0.0, high=1.0, open_low=True,
                                    open_high=True)
    score: str = option("importance", "which heads go (the one-shot baseline's ranking: plain removal by it keeps "
                        "exactly the same heads)", choices=BASELINES)
    score_examples: int = option(256, "training examples the head scores average over (relevance, importance)",
                                 low=1)
    peers: int = option(2, "kept heads of the same layer each removed head is distilled into (most similar "
                        "outputs, |cosine| on the calibration tokens)", low=1)
    calibration_examples: int = option(64, "training examples whose attention-output inputs the distillation fits",
                                       low=1)
    ridge: float = option(0.01, "ridge of the closed-form distillation, relative to the peers' mean input energy "
                          "(keeps the refit close to the original weights)", low=0.0)


@register
class Peer(PruningMethod):
    name = "peer"
    summary = ("after Li et al. 2023 (no public code; HeadLab's design): the heads a baseline score removes are "
               "first distilled into their most similar kept heads of the same layer (W_O columns refit in closed "
               "form so the layer's attention output matches the dense one on calibration tokens), then sliced")
    Options = PeerOptions
    order = 76

    @classmethod
    def check_config(cls, options, config) -> None:
        if config.data_spec.is_text:
            raise ValueError("peer ranks heads on labelled examples (its score); use a classification data set.")

    def prune(self) -> OneShotResult:
        c, o = self.context, self.options
        c.progress(0, 3, f"scoring heads ({o.score})")
        rows = c.train.subset(o.score_examples, seed=c.seed)
        state = baseline_state(o.score, c.base, rows.texts, rows.labels, o.target_sparsity, seed=c.seed)
        c.progress(1, 3, "calibration pass (attention-output inputs)")
        source = editable_copy(c.base, f"peer-{o.score}-{o.target_sparsity}-{o.peers}-{o.ridge}")
        errors = distil_layers(source, state.head > 0, calibration_batches(self, o.calibration_examples),
                               c.examples, o.peers, o.ridge)
        plain, peer = sum(e[0] for e in errors), sum(e[1] for e in errors)
        note = (f"Peer distillation: attention-output reconstruction error summed over layers {peer:.4g} "
                f"(plain removal of the same heads: {plain:.4g}).")
        c.progress(3, 3, note)
        source.notes.append(note)
        return OneShotResult(state, source=source)

    def target(self, step: int) -> float | None:
        return self.options.target_sparsity


def distil_layers(loaded: LoadedModel, kept: torch.Tensor, batches: list[calibration.Batch], examples, peers: int,
                  ridge: float) -> list[tuple[float, float]]:
    """Distil every layer's removed heads (`kept` (L, H) bool False) into their peers in `loaded` (in place). Returns
    (plain removal's, peer distillation's) reconstruction error per layer (0, 0 where nothing or everything goes)."""
    a = loaded.adapter
    outputs = {str(layer): a.attention_output(layer) for layer in range(len(a.layers))}
    stats = calibration.linear_inputs(loaded, examples, batches, outputs, gram=True)
    errors = []
    for layer, module in enumerate(outputs.values()):
        heads = a.num_heads(layer)
        removed = [h for h in range(heads) if not kept[layer, h]]
        stay = [h for h in range(heads) if kept[layer, h]]
        if not removed or not stay:
            errors.append((0.0, 0.0))
            continue
        gram, head_dim, weight = stats[str(layer)].gram, a.head_dim(layer), module.weight.detach()
        chosen = similar_peers(weight, gram, head_dim, removed, stay, peers)
        new = distil_into_peers(weight, gram, head_dim, removed, chosen, ridge)
        errors.append((reconstruction_error(weight, weight, gram, head_dim, removed),
                       reconstruction_error(new, weight, gram, head_dim, removed)))
        with torch.no_grad():
            module.weight.copy_(new)
    return errors
