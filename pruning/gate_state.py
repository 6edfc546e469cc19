"""`GateState`: the one gate-state type, one value in [0, 1] per prunable unit of an *unpruned* encoder
or decoder with L layers, H (query) heads per layer, FFN width d_ff and hidden size d (CoFi's five
granularities, Xia et al. 2022):

    head          (L, H)     each (query) head's context before W_O
    mha           (L,)       the whole attention sublayer output (W_O output incl. its bias; Gemma3: its post-norm)
    intermediate  (L, d_ff)  FFN intermediate units (CoFi's z_int), the input of the FFN output dense
    ffn           (L,)       the whole FFN sublayer output (output dense incl. its bias; Gemma3: its post-norm)
    hidden        (d,)       hidden dims, shared by the embeddings and every sublayer output

0 closes a unit, 1 keeps it unchanged, values in between scale it (soft gates that
`pruning.surgery.prune` folds into the weights). `pruning.hooks.gated` applies a state to a model
without touching its weights; `pruning.surgery.prune` turns the same state into a smaller model.
The tensors may carry gradients (states sampled from `pruning.gates.CoFiGates` during training).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from core.adapter import GateShape
from core.structure import causal_lm

GROUPS = ("head", "mha", "intermediate", "ffn", "hidden")
CRITERIA = ("magnitude", "random")


def _tensor(value, name: str) -> torch.Tensor:
    """A float32 tensor (kept as is, with its autograd graph, when it already is one)."""
    if isinstance(value, torch.Tensor):
        return value if value.dtype == torch.float32 else value.float()
    try:
        return torch.as_tensor(np.asarray(value, dtype=np.float32))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"The '{name}' gates must be numbers in [0, 1]. Got {value!r:.60} instead.") from exc


def _keep_count(frac: float, total: int, name: str, where: str) -> int:
    """round(frac * total), at least 1; frac must lie in (0, 1]."""
    if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 < frac <= 1:
        raise ValueError(f"The '{name}' parameter of {where} must be a fraction in (0, 1]. Got {frac!r} instead.")
    return max(1, min(total, int(math.floor(frac * total + 0.5))))


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """0/1 mask (same shape as the 1-D `scores`) of its `k` largest entries (ties: lower index first)."""
    order = torch.argsort(-scores, stable=True)[:k]
    mask = torch.zeros_like(scores, dtype=torch.float32)
    mask[order] = 1.0
    return mask


def unit_scores(kind: str, adapter, criterion: str, seed: int, where: str) -> torch.Tensor:
    """Importance of every unit of `kind` ("head" (L, H), "intermediate" (L, d_ff), "hidden" (d,))."""
    if criterion not in CRITERIA:
        raise ValueError(f"The 'criterion' parameter of {where} must be one of {', '.join(CRITERIA)}. "
                         f"Got {criterion!r} instead.")
    shape = GateShape.of(adapter)
    sizes = {"head": (shape.layers, shape.heads), "intermediate": (shape.layers, shape.intermediate),
             "hidden": (shape.hidden,)}[kind]
    if criterion == "random":
        return torch.rand(sizes, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        if kind == "head":  # ||W_V,h||_F * ||W_O[:, h]||_F: the size of the head's value -> output path
            rows = []
            for layer in range(shape.layers):
                v = adapter.value(layer).weight.view(shape.kv_heads, shape.head_dim, -1)  # (H_kv, d_h, d)
                o = adapter.attention_output(layer).weight.view(-1, shape.heads, shape.head_dim)  # (d, H, d_h)
                # under GQA query head h reads the value of KV head h // group_size
                rows.append(v.norm(dim=(1, 2)).repeat_interleave(shape.group_size) * o.norm(dim=(0, 2)))
            return torch.stack(rows)
        if kind == "intermediate":  # ||W_in[i, :]|| * ||W_out[:, i]||: how far unit i can move the stream
            rows = []
            for layer in range(shape.layers):
                row = adapter.ffn_in(layer).weight.norm(dim=1) * adapter.ffn_out(layer).weight.norm(dim=0)
                gate = adapter.ffn_gate(layer)  # SwiGLU: the unit's output is silu(gate . x) * (up . x)
                rows.append(row if gate is None else row * gate.weight.norm(dim=1))
            return torch.stack(rows)
        # hidden: sum over matrices touching dim k of its column/row norm, each matrix divided by its
        # mean norm so that no single matrix (e.g. the 30k-row word embeddings) dominates.
        mats = [adapter.word_embeddings.weight]  # (V, d): column k
        head = causal_lm(adapter.model).get_output_embeddings() if adapter.is_decoder else None
        if head is not None and head.weight is not adapter.word_embeddings.weight:
            mats.append(head.weight)  # an untied LM head (V, d) reads dim k too
        for layer in range(shape.layers):
            mats += [adapter.query(layer).weight, adapter.key(layer).weight, adapter.value(layer).weight,
                     adapter.ffn_in(layer).weight]  # read dim k
            if adapter.ffn_gate(layer) is not None:
                mats.append(adapter.ffn_gate(layer).weight)
            mats += [adapter.attention_output(layer).weight.T, adapter.ffn_out(layer).weight.T]  # write dim k
        total = torch.zeros(shape.hidden)
        for m in mats:
            norms = m.float().norm(dim=0)
            total += norms / norms.mean().clamp_min(1e-12)
        return total


@dataclass(eq=False)
class GateState:
    """Gate values in [0, 1] for every prunable unit of an unpruned encoder (see the module docstring).

    Build with `dense`, `from_closed_heads`, `from_dict`/`from_json`, or `CoFiGates.sample()`; derive
    new states with the `with_*` methods (a state is never changed in place). Equality compares
    every value exactly.
    """

    head: torch.Tensor  # (L, H)
    mha: torch.Tensor  # (L,)
    intermediate: torch.Tensor  # (L, d_ff)
    ffn: torch.Tensor  # (L,)
    hidden: torch.Tensor  # (d,)

    def __post_init__(self) -> None:
        for name in GROUPS:
            setattr(self, name, _tensor(getattr(self, name), name))
        L = self.head.shape[0] if self.head.dim() == 2 else -1
        expected = {"head": 2, "mha": 1, "intermediate": 2, "ffn": 1, "hidden": 1}
        for name, ndim in expected.items():
            t = getattr(self, name)
            if t.dim() != ndim or (name != "hidden" and t.shape[0] != L) or t.numel() == 0:
                raise ValueError(f"The '{name}' gates must have {ndim} dimension(s) and {L} layers. "
                                 f"Got shape {tuple(t.shape)} instead.")
            with torch.no_grad():
                if not torch.isfinite(t).all() or (t < 0).any() or (t > 1).any():
                    raise ValueError(f"The '{name}' gates must be finite values in [0, 1]. "
                                     f"Got min {t.min().item():.3g}, max {t.max().item():.3g}.")

    # ------------------------------------------------------------------ constructors

    @classmethod
    def dense(cls, arch) -> GateState:
        """Every gate open (1.0) for the model (or GateShape) `arch`: gating it changes nothing."""
        s = GateShape.of(arch)
        return cls(head=torch.ones(s.layers, s.heads), mha=torch.ones(s.layers),
                   intermediate=torch.ones(s.layers, s.intermediate), ffn=torch.ones(s.layers),
                   hidden=torch.ones(s.hidden))

    @classmethod
    def from_closed_heads(cls, arch, heads: Iterable[tuple[int, int]]) -> GateState:
        """All gates open except the (layer, head) pairs in `heads` (0-based)."""
        return cls.dense(arch).with_closed_heads(heads)

    def with_closed_heads(self, heads: Iterable[tuple[int, int]]) -> GateState:
        """A copy with head gates of the (layer, head) pairs (0-based) set to 0."""
        head = self.head.detach().clone()
        L, H = head.shape
        for pair in heads:
            if len(pair) != 2:
                raise ValueError(f"Heads are (layer, head) pairs. Got {pair!r} instead.")
            layer, h = (int(x) for x in pair)
            if not (0 <= layer < L and 0 <= h < H):
                raise ValueError(f"Head {layer}:{h} does not exist: layers are 0..{L - 1}, heads 0..{H - 1}.")
            head[layer, h] = 0.0
        return self.replace(head=head)

    def with_head_keep(self, adapter, frac: float, criterion: str = "magnitude", seed: int = 0) -> GateState:
        """Keep round(frac * H) heads in every layer, chosen by `criterion`; close the rest.

        "magnitude" ranks head h by ||W_V,h||_F * ||W_O[:, h]||_F (its value -> output path, no data
        needed; under GQA W_V,h is its KV head's); "random" ranks by a seeded random draw. Already
        closed heads stay closed.
        """
        k = _keep_count(frac, self.head.shape[1], "frac", "with_head_keep()")
        scores = unit_scores("head", adapter, criterion, seed, "with_head_keep()")
        mask = torch.stack([_top(row, k) for row in scores])
        return self.replace(head=self.head.detach() * mask)

    def with_ffn_keep(self, adapter, frac: float, criterion: str = "magnitude", seed: int = 0) -> GateState:
        """Keep round(frac * d_ff) FFN units in every layer, chosen by `criterion`; close the rest.

        "magnitude" ranks unit i of layer l by ||W_in[i, :]||_2 * ||W_out[:, i]||_2 (the norms of what
        the unit reads from and writes to the hidden stream; times ||W_gate[i, :]||_2 for SwiGLU);
        "random" by a seeded random draw.
        """
        k = _keep_count(frac, self.intermediate.shape[1], "frac", "with_ffn_keep()")
        scores = unit_scores("intermediate", adapter, criterion, seed, "with_ffn_keep()")
        mask = torch.stack([_top(row, k) for row in scores])
        return self.replace(intermediate=self.intermediate.detach() * mask)

    def with_hidden_keep(self, adapter, frac: float, criterion: str = "magnitude", seed: int = 0) -> GateState:
        """Keep round(frac * d) hidden dims (shared by all layers), chosen by `criterion`; close the rest.

        "magnitude" ranks dim k by the sum, over the word embeddings (and an untied LM head) and every
        layer's Linear that reads (Q, K, V, FFN in, SwiGLU's gate) or writes (W_O, FFN out) the stream,
        of the L2 norm of that matrix's slice for dim k divided by the matrix's mean slice norm;
        "random" by a seeded draw.
        """
        k = _keep_count(frac, self.hidden.shape[0], "frac", "with_hidden_keep()")
        scores = unit_scores("hidden", adapter, criterion, seed, "with_hidden_keep()")
        return self.replace(hidden=self.hidden.detach() * _top(scores, k))

    def replace(self, **groups) -> GateState:
        """A copy with some groups replaced, e.g. `state.replace(mha=torch.tensor([1., 0.]))` (validated)."""
        unknown = set(groups) - set(GROUPS)
        if unknown:
            raise ValueError(f"Gate groups are {', '.join(GROUPS)}. Got {sorted(unknown)}.")
        values = {name: getattr(self, name) for name in GROUPS}
        values.update(groups)
        return GateState(**values)

    # ------------------------------------------------------------------ reading

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(layers, heads, d_ff, hidden)."""
        return (self.head.shape[0], self.head.shape[1], self.intermediate.shape[1], self.hidden.shape[0])

    def matches(self, shape: GateShape) -> bool:
        """True if this state has the sizes of `shape`."""
        return self.shape == (shape.layers, shape.heads, shape.intermediate, shape.hidden)

    def detach(self) -> GateState:
        """The same values without autograd history."""
        return GateState(**{name: getattr(self, name).detach() for name in GROUPS})

    def closed_heads(self) -> list[tuple[int, int]]:
        """(layer, head) pairs whose head gate is 0, in order (heads in a closed MHA are not listed)."""
        return [(int(lay), int(h)) for lay, h in torch.nonzero(self.head.detach() == 0).tolist()]

    def counts(self) -> dict[str, tuple[int, int]]:
        """Open (non-zero) and total gates per group: {"head": (open, total), ...}."""
        return {name: (int((getattr(self, name).detach() != 0).sum()), getattr(self, name).numel())
                for name in GROUPS}

    def is_binary(self) -> bool:
        """True if every gate is exactly 0 or 1 (nothing to fold into the weights)."""
        return all(bool(((t == 0) | (t == 1)).all()) for t in (getattr(self, n).detach() for n in GROUPS))

    def is_dense(self) -> bool:
        """True if every gate is exactly 1."""
        return all(bool((getattr(self, n).detach() == 1).all()) for n in GROUPS)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GateState):
            return NotImplemented
        return all(torch.equal(getattr(self, n).detach(), getattr(other, n).detach()) for n in GROUPS)

    __hash__ = None  # mutable tensors inside

    def __repr__(self) -> str:
        parts = ", ".join(f"{n} {o}/{t}" for n, (o, t) in self.counts().items())
        return f"GateState({parts} open{'' if self.is_binary() else ', soft'})"

    # ------------------------------------------------------------------ JSON

    def to_dict(self) -> dict[str, list]:
        """Plain lists per group (JSON-ready; float32 values survive a round trip exactly)."""
        return {name: getattr(self, name).detach().cpu().tolist() for name in GROUPS}

    @classmethod
    def from_dict(cls, data: dict) -> GateState:
        """Inverse of `to_dict`; raises ValueError naming a missing or malformed group."""
        if not isinstance(data, dict):
            raise ValueError(f"A gate state must be a JSON object with keys {', '.join(GROUPS)}.")
        missing = [n for n in GROUPS if n not in data]
        if missing:
            raise ValueError(f"The gate state lacks the group(s) {', '.join(missing)}.")
        return cls(**{n: data[n] for n in GROUPS})

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> GateState:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"The gate state is not valid JSON ({exc}).") from exc
        return cls.from_dict(data)
