"""LaCo (Yang, Cao, Zhao 2024): Reserving-Differences-while-Seeking-Common (RDSC) layer merging and the
search that accepts a merge when the merged model's last hidden states stay close to the original's.

    rdsc               theta*_l = theta_l + sum_{k=1..m} (theta_{l+k} - theta_l), out of place (the authors'
                       notebook adds in place into the tensor it reads theta_l from, which turns the merge
                       into a plain drop of layers l..l+m-1: theta*_l = theta_{l+m}; issues #4, #5)
    merge_into         write the RDSC merge of layers l+1..l+m into layer l of a model, for the merged parts:
                       encoders Q, K, V, the attention output and the FFN in/out denses; decoders
                       q/k/v/o and gate/up/down; weights and biases where they exist. Norms (LayerNorms,
                       RMSNorms, Gemma3's q/k norms and post-norms) are not merged: layer l keeps its own
    last_hidden        the final hidden states of every calibration batch (a decoder's after its final
                       norm, as `hidden_states[-1]` of transformers)
    similarity         mean over the calibration examples of the cosine between the flattened last hidden
                       states (real tokens only) of the original and a candidate, as in the notebook
    search             the loop: l from H - C down; merge C layers (l and the C - 1 above it in the current,
                       already merged model) on the working copy; accept if the similarity > T (l -= I),
                       else undo (l -= 1); stop at l < L or when the sparsity target is met

Merged layers are removed by closing their blocks (mha = ffn = 0, `pruning.blocks.block_state`), so the
candidate is judged as `pruning.surgery.prune` will build it: a decoder's removed block is the identity,
a post-LayerNorm encoder's still applies its two LayerNorms.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from core.adapter import Adapter, GateShape
from core.loaded import LoadedModel
from pruning.blocks import block_state
from pruning.calibration import Batch, stream
from pruning.examples import Examples
from pruning.hooks import gated
from pruning.size import SizeModel, exact_sparsity

ENCODER_PARTS = ("query", "key", "value", "attention_output", "ffn_in", "ffn_out")
DECODER_PARTS = ("query", "key", "value", "attention_output", "ffn_gate", "ffn_in", "ffn_out")


def merged_tensors(adapter: Adapter, layer: int) -> list[torch.Tensor]:
    """The parameters of `layer` that RDSC merges (see the module docstring), in a fixed order."""
    parts = DECODER_PARTS if adapter.is_decoder else ENCODER_PARTS
    linears = [getattr(adapter, part)(layer) for part in parts]
    return [t for lin in linears if lin is not None for t in (lin.weight, lin.bias) if t is not None]


def rdsc(base: torch.Tensor, others: list[torch.Tensor]) -> torch.Tensor:
    """theta_l + sum_k (theta_{l+k} - theta_l): a new tensor, `base` and `others` unchanged."""
    return base + sum(other - base for other in others)


@torch.no_grad()
def merge_into(adapter: Adapter, layer: int, others: list[int]) -> None:
    """Replace the merged parameters of `layer` (of the model behind `adapter`, changed in place) by their
    RDSC merge with layers `others`."""
    bases = merged_tensors(adapter, layer)
    merged = [rdsc(base, list(group)) for base, *group in zip(bases, *(merged_tensors(adapter, k) for k in others))]
    for base, value in zip(bases, merged):
        base.copy_(value)


def last_hidden(loaded: LoadedModel, examples: Examples, calibration: list[Batch]) -> list[torch.Tensor]:
    """(B, T, d) final hidden states of each calibration batch (after a decoder's final norm)."""
    out = []
    for batch in calibration:
        state = stream(loaded, examples, batch)[-1]
        norm = loaded.adapter.final_norm if loaded.is_decoder else None
        with torch.no_grad():
            out.append(norm(state) if norm is not None else state)
    return out


def similarity(reference: list[torch.Tensor], candidate: list[torch.Tensor], calibration: list[Batch]) -> float:
    """Mean over the examples of cos(flattened reference states, flattened candidate states), padding left out."""
    cosines = []
    for ref, cand, batch in zip(reference, candidate, calibration):
        real = batch[0]["attention_mask"][..., None].to(ref.dtype)  # (B, T, 1): padding contributes 0 to both
        cosines.append(F.cosine_similarity((ref * real).flatten(1).double(), (cand * real).flatten(1).double(), dim=1))
    return float(torch.cat(cosines).mean())


def working_copy(loaded: LoadedModel, tag: str) -> LoadedModel:
    """A deep copy of `loaded` whose weights may change (its own fingerprint, from `tag`)."""
    model = copy.deepcopy(loaded.model).eval()
    digest = hashlib.sha1(f"{loaded.fingerprint}:{tag}".encode()).hexdigest()[:12]
    return dataclasses.replace(loaded, model=model, adapter=Adapter(model), fingerprint=digest,
                               notes=list(loaded.notes))


@dataclass
class Step:
    """One candidate of the search: layer `layer` (original index) merged with `merged` (original indices)."""

    layer: int
    merged: list[int]
    similarity: float
    accepted: bool


@dataclass
class Search:
    """The settings of the loop (see the module docstring); `highest` -1 = the last layer; `target` 0 = no
    target (the loop runs to the end), else it stops once the exact sparsity reaches it, and the merge
    that reaches it takes only as many layers as needed."""

    merge_layers: int = 7
    interval: int = 1
    lowest: int = 0
    highest: int = -1
    threshold: float = 0.45
    target: float = 0.0


@dataclass
class Merged:
    """The outcome: the working copy with merged weights, the removed blocks (original indices), each step."""

    source: LoadedModel
    removed: list[int]
    steps: list[Step] = field(default_factory=list)


def search(loaded: LoadedModel, examples: Examples, calibration: list[Batch], settings: Search,
           progress: Callable[[int, int, str], None] | None = None) -> Merged:
    """LaCo's merge loop on a copy of `loaded` (unchanged); positions count layers of the current
    (merged) model, as in the authors' notebook."""
    shape = GateShape.of(loaded)
    sizes = SizeModel.of(loaded)
    work = working_copy(loaded, f"laco:{settings}")
    reference = last_hidden(loaded, examples, calibration)
    alive = list(range(shape.layers))  # original index of each layer of the current model
    removed: list[int] = []
    steps: list[Step] = []
    highest = shape.layers - 1 if settings.highest < 0 else settings.highest
    position = highest - settings.merge_layers
    while position >= settings.lowest:
        above = alive[position + 1:position + settings.merge_layers]
        if settings.target > 0:
            above = needed(above, removed, shape, sizes, settings.target)
        if progress is not None:
            progress(len(steps), shape.layers, f"merging layers {alive[position]}..{above[-1] if above else '-'}")
        if not above:
            position -= 1
            continue
        layer = alive[position]
        saved = [t.detach().clone() for t in merged_tensors(work.adapter, layer)]
        merge_into(work.adapter, layer, above)
        with gated(work, block_state(shape, removed + above)):
            candidate = last_hidden(work, examples, calibration)
        s = similarity(reference, candidate, calibration)
        accepted = s > settings.threshold
        steps.append(Step(layer, list(above), s, accepted))
        if accepted:
            removed += above
            alive = [i for i in alive if i not in above]
            position -= settings.interval
            if settings.target > 0 and exact_sparsity(block_state(shape, removed), model=sizes) >= settings.target:
                break
        else:
            with torch.no_grad():
                for t, old in zip(merged_tensors(work.adapter, layer), saved):
                    t.copy_(old)
            position -= 1
    return Merged(source=work, removed=sorted(removed), steps=steps)


def needed(above: list[int], removed: list[int], shape: GateShape, sizes: SizeModel, target: float) -> list[int]:
    """The shortest prefix of `above` whose removal (with `removed`) reaches the `target` sparsity, or all of it."""
    for n in range(1, len(above) + 1):
        if exact_sparsity(block_state(shape, removed + above[:n]), model=sizes) >= target:
            return above[:n]
    return above
