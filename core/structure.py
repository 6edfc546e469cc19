"""The kept-unit plan of a pruned model and the physical slicing it implies: what loading a pruned
folder needs (`core.pruned`), and what `pruning.surgery.prune` does after folding gates in.

`apply_plan(arch, plan)` slices every module: Q/K/V rows and W_O columns of closed heads, FFN units,
hidden dims everywhere the stream is read or written (embeddings, Q/K/V/FFN-in columns, W_O/FFN-out
rows, every LayerNorm, the pooler's input or a RoBERTa-style head's first dense).

Sublayers with nothing left. A layer whose heads are all closed, or whose mha gate is 0, runs no
attention: its self-attention gets 0 heads (`remove_all_heads`) and hands W_O an empty (B, T, 0)
context, so W_O (now d x 0) outputs just its bias and the unchanged `BertSelfOutput` (MPNet:
`MPNetAttention`) computes `LN(x + c)` with c = mha * hidden * b_O (the W_O bias still passes when
only the heads are closed; c = 0 when mha = 0). That is exactly what the gated model computes (the
gate zeroes the dense output *including* its bias; the residual goes through the LayerNorm). An FFN
with no unit left or ffn = 0 needs no special module: d_ff' = 0 gives `LN(x + ffn * hidden * b_out)`
the same way. Module names, state-dict keys and hooks on W_O / the FFN output dense (analysis,
gating) keep working; `core.size.encoder_flops` reads 0 FLOPs for the empty parts.

MPNet's relative position bias. One (buckets, H) table, shared by all layers, gives a bias
(B, H, T, T) that the encoder computes once and adds to every layer's scores. Heads are pruned per
layer, so the table cannot be sliced: it stays whole, and a layer that keeps H' < H heads selects
its heads' planes by index (`keep_heads`, a non-persistent `bias_heads` buffer rebuilt from the plan
on load). Exact, and it costs one index_select per layer; the table is 32 x H parameters.

Decoders (Llama family, pre-norm, GQA). A query head goes alone (its Q rows, its W_O columns); a KV
head's K/V rows go only when every query head of its group is closed (`PruningPlan.kv_heads`). When
each kept KV group keeps the same number c of query heads, the attention's `num_key_value_groups`
becomes c; when the counts differ, K/V keep the kept groups' rows and their output is expanded to one
block per kept query head (`_KVPerQueryHead`, num_key_value_groups 1): exact, since RoPE and Gemma3's
k_norm act per head after the projection. A layer with no head runs no attention (`_NoHeads`: o_proj
of an empty context = its bias or 0, so Gemma3's post-norm gives 0 too); an MLP with no unit keeps
zero-width gate/up/down projections (down_proj adds its bias or 0). SwiGLU's gate and up rows go with
the down projection's columns. Hidden dims: the token table's columns (its class kept: Gemma3 scales
by sqrt(d) of the original d), the LM head's columns — with tied embeddings the head gets the very
sliced table tensor, so the tie holds — and every RMSNorm (pre-norms, Gemma3's post-norms, the final
norm), sliced in place.

The pruned model keeps the original `config` (its sizes are stale; read weight shapes instead) and
carries a `PruningInfo` as `model.headlab_pruning` (the plan and the gate state, for export).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from core.adapter import GateShape, as_adapter

# ----------------------------------------------------------------------------- plan


@dataclass
class PruningPlan:
    """What survives, in the original model's 0-based numbering (all lists sorted)."""

    heads: list[list[int]]  # kept heads per layer; [] = attention sublayer skipped
    units: list[list[int]]  # kept FFN units per layer; [] = FFN sublayer skipped
    hidden: list[int]  # kept hidden dims

    @property
    def skipped_attention(self) -> list[int]:
        """Layers whose attention sublayer is only LN(x + c)."""
        return [layer for layer, kept in enumerate(self.heads) if not kept]

    @property
    def skipped_ffn(self) -> list[int]:
        """Layers whose FFN sublayer is only LN(x + c)."""
        return [layer for layer, kept in enumerate(self.units) if not kept]

    @classmethod
    def from_state(cls, state) -> PruningPlan:
        """Units with a non-zero gate survive; a zero mha / ffn gate removes the whole sublayer.

        `state`: a `pruning.gates.GateState` (or anything with its head (L, H), mha (L,), intermediate
        (L, d_ff), ffn (L,) and hidden (d,) tensors)."""
        s = state.detach()
        heads = [torch.nonzero(s.head[lay] > 0).flatten().tolist() if s.mha[lay] > 0 else []
                 for lay in range(s.head.shape[0])]
        units = [torch.nonzero(s.intermediate[lay] > 0).flatten().tolist() if s.ffn[lay] > 0 else []
                 for lay in range(s.head.shape[0])]
        hidden = torch.nonzero(s.hidden > 0).flatten().tolist()
        if not hidden:
            raise ValueError("The gate state closes every hidden dim; keep at least one.")
        return cls(heads=heads, units=units, hidden=hidden)

    def kv_heads(self, group_size: int) -> list[list[int]]:
        """Kept KV heads per layer under GQA (`group_size` query heads per KV head): those with a kept query head."""
        return [sorted({h // group_size for h in kept}) for kept in self.heads]

    def to_dict(self) -> dict:
        return {"kept_heads": self.heads, "kept_units": self.units, "kept_hidden": self.hidden,
                "skipped_attention": self.skipped_attention, "skipped_ffn": self.skipped_ffn}

    @classmethod
    def from_dict(cls, data: dict, shape: GateShape) -> PruningPlan:
        """Read `to_dict` output, checking every index against the original `shape` (ValueError)."""
        try:
            heads, units, hidden = data["kept_heads"], data["kept_units"], data["kept_hidden"]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"pruning plan lacks {exc}") from exc

        def check(values, limit: int, what: str) -> list[int]:
            if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                       for v in values):
                raise ValueError(f"{what} must be a list of integers")
            if values != sorted(set(values)) or (values and not 0 <= values[0] <= values[-1] < limit):
                raise ValueError(f"{what} must be sorted, unique indices in 0..{limit - 1}")
            return values

        for name, rows in (("kept_heads", heads), ("kept_units", units)):
            if not isinstance(rows, list) or len(rows) != shape.layers:
                raise ValueError(f"{name} must list {shape.layers} layers")
        plan = cls(heads=[check(r, shape.heads, f"kept_heads[{i}]") for i, r in enumerate(heads)],
                   units=[check(r, shape.intermediate, f"kept_units[{i}]") for i, r in enumerate(units)],
                   hidden=check(hidden, shape.hidden, "kept_hidden"))
        if not plan.hidden:
            raise ValueError("kept_hidden is empty")
        return plan

    def describe(self, shape: GateShape) -> str:
        """One line, e.g. "kept 60/72 heads, 4608/9216 FFN units, 384/384 hidden dims; skipped attention in 1 layer"."""
        kv = (f" ({sum(map(len, self.kv_heads(shape.group_size)))}/{shape.layers * shape.kv_heads} KV heads)"
              if shape.group_size > 1 else "")
        text = (f"kept {sum(map(len, self.heads))}/{shape.layers * shape.heads} heads{kv}, "
                f"{sum(map(len, self.units))}/{shape.layers * shape.intermediate} FFN units, "
                f"{len(self.hidden)}/{shape.hidden} hidden dims")
        skipped = [f"{what} in layer(s) {', '.join(map(str, layers))}"
                   for what, layers in (("attention", self.skipped_attention), ("FFN", self.skipped_ffn)) if layers]
        return text + (f"; skipped {' and '.join(skipped)}" if skipped else "")


@dataclass
class PruningInfo:
    """Attached to a pruned model as `model.headlab_pruning`: enough to save and rebuild it."""

    plan: PruningPlan
    gate_state: dict  # the gates that were folded in (`pruning.gates.GateState.to_dict()`)
    original: GateShape  # sizes of the unpruned model


def pruning_info(model: nn.Module) -> PruningInfo | None:
    """The `PruningInfo` of a physically pruned model, None for an unpruned one."""
    return getattr(model, "headlab_pruning", None)


# ----------------------------------------------------------------------------- modules


def _linear(in_features: int, out_features: int, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A Linear holding copies of `weight` (out, in) and `bias` (out,), built without random init."""
    with warnings.catch_warnings():  # zero-width layers: "Initializing zero-element tensors is a no-op"
        warnings.simplefilter("ignore", UserWarning)
        layer = torch.nn.utils.skip_init(nn.Linear, in_features, out_features, bias=bias is not None,
                                         device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def slice_linear(layer: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A new Linear keeping output `rows` and input `cols` (index tensors; None keeps all).

    Like `transformers.pytorch_utils.prune_linear_layer`, but both dims in one copy, no random
    re-init and empty indices allowed (zero-width layers of skipped sublayers).
    """
    w, b = layer.weight.detach(), None if layer.bias is None else layer.bias.detach()
    if rows is not None:
        w = w.index_select(0, rows)
        b = None if b is None else b.index_select(0, rows)
    if cols is not None:
        w = w.index_select(1, cols)
    return _linear(w.shape[1], w.shape[0], w, b)


def slice_norm(norm: nn.LayerNorm, keep: torch.Tensor) -> nn.LayerNorm:
    """A LayerNorm over the kept dims only (weight and bias sliced, same eps)."""
    new = nn.LayerNorm(keep.numel(), eps=norm.eps, device=norm.weight.device, dtype=norm.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(norm.weight.detach()[keep])
        new.bias.copy_(norm.bias.detach()[keep])
    return new


def slice_rms_norm(norm: nn.Module, keep: torch.Tensor) -> None:
    """Keep the weights of dims `keep` (d',) of an RMSNorm, in place (its class and eps unchanged)."""
    norm.weight = nn.Parameter(norm.weight.detach().index_select(0, keep))


def rms_norm_eps(norm: nn.Module) -> float:
    """The epsilon of an RMSNorm (`variance_epsilon` in Llama/Qwen2, `eps` in Gemma3)."""
    return float(norm.variance_epsilon if hasattr(norm, "variance_epsilon") else norm.eps)


class _NoHeads:
    """Forward of a self-attention whose heads were all removed (mixed into the model's own class).

    A real self-attention cannot run with 0 heads (its reshape to (B, T, -1, d_h) is ambiguous for an
    empty tensor). This one runs its zero-width Q/K/V projections (no cost; hooks on them fire as
    usual) and returns the empty context (B, T, 0) — passed through W_O first when W_O lives inside
    the self-attention (MPNet), giving W_O's bias (B, T, d) — and empty probabilities (B, 0, T, T), so
    `output_attentions` still yields one entry per layer (a layer with 0 heads).
    """

    _projections: tuple[str, str, str]  # attribute names of Q, K, V
    _inner_output: str | None  # attribute name of W_O when it is part of this module, else None

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        query, key, value = (getattr(self, name) for name in self._projections)
        query(hidden_states)
        key(hidden_states)
        out = value(hidden_states)  # (B, T, 0)
        if self._inner_output is not None:
            out = getattr(self, self._inner_output)(out)  # (B, T, d): the bias
        batch, tokens = hidden_states.shape[:2]
        return out, hidden_states.new_zeros(batch, 0, tokens, tokens)


class _SharedBiasSubset:
    """Forward of an MPNet self-attention that kept only some heads (mixed into the model's own class).

    MPNet adds one relative position bias (B, H, T, T), computed once per forward from a (buckets, H)
    table, to the scores of every layer. The table stays whole (it is shared and tiny); each pruned
    layer picks its own heads' planes with its non-persistent buffer `bias_heads` (H',) (original
    head indices), so the kept heads see exactly the bias they saw before.
    """

    bias_heads: torch.Tensor

    def forward(self, hidden_states, attention_mask=None, position_bias=None, *args, **kwargs):
        if position_bias is not None:
            position_bias = position_bias.index_select(1, self.bias_heads)  # (B, H', T, T)
        return super().forward(hidden_states, attention_mask, position_bias, *args, **kwargs)


class _KVPerQueryHead:
    """Forward of a K or V projection whose layer keeps unequal numbers of query heads per KV head (mixed
    into its Linear): the output (..., G' d_h) of the kept KV heads is expanded to the block of each kept
    query head's KV head, (..., H' d_h), so the attention runs with num_key_value_groups = 1 and every
    query head reads exactly its own K/V. `kv_index` (H',): each kept query head's position among the
    kept KV heads (a non-persistent buffer rebuilt from the plan on load); `head_dim` = d_h.
    """

    kv_index: torch.Tensor
    head_dim: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)  # (..., G' d_h)
        return out.unflatten(-1, (-1, self.head_dim)).index_select(-2, self.kv_index).flatten(-2)


_SUBCLASSES: dict[tuple[type, type, tuple], type] = {}


def _mix_in(module: nn.Module, mixin: type, **attributes) -> None:
    """Make `module` an instance of a subclass of its own class with `mixin` first, in place.

    The subclass (`NoHeadsBertSelfAttention`, ...) keeps isinstance checks (transformers' output
    recording, the adapter) true; `attributes` become class attributes. Subclasses are cached.
    """
    cls = type(module)
    if issubclass(cls, mixin):
        return
    key = (mixin, cls, tuple(sorted(attributes.items())))
    if key not in _SUBCLASSES:
        name = f"{mixin.__name__.strip('_')}{cls.__name__}"
        _SUBCLASSES[key] = type(name, (mixin, cls), {"__module__": __name__, **attributes})
    module.__class__ = _SUBCLASSES[key]


def head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Indices (H' * d_h,) of the Q/K/V rows (= W_O columns) of `heads` (H',); empty for no head."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).flatten()


def remove_all_heads(adapter, layer: int, cols: torch.Tensor | None) -> None:
    """Turn the self-attention of `layer` into one with 0 heads, in place; Q/K/V become 0 x d' (their input
    cut to `cols`, None = all), with a (0,) bias where they had one."""
    layout = adapter.layout
    inner_output = layout.attention_output.removeprefix(f"{layout.self_attention}.")
    _mix_in(adapter.self_attention(layer), _NoHeads, _projections=(layout.query, layout.key, layout.value),
            _inner_output=None if inner_output == layout.attention_output else inner_output)
    none = torch.zeros(0, dtype=torch.long)
    for name in ("query", "key", "value"):
        adapter.set_part(layer, name, slice_linear(adapter.part(layer, name), rows=none, cols=cols))
    if not adapter.is_decoder:
        self_attention = adapter.self_attention(layer)
        self_attention.num_attention_heads, self_attention.all_head_size = 0, 0


def keep_heads(adapter, layer: int, heads: torch.Tensor, cols: torch.Tensor | None) -> None:
    """Slice the Q/K/V rows of `layer` to the `heads` (H',) it keeps (and their input to `cols`), in place.

    With a relative position bias shared by all layers (MPNet) a layer that loses heads selects its
    heads' bias planes (`_SharedBiasSubset`); the shared table is not touched.
    """
    dh = adapter.head_dim(layer)
    rows = head_rows(heads, dh)
    for name in ("query", "key", "value"):
        adapter.set_part(layer, name, slice_linear(adapter.part(layer, name), rows=rows, cols=cols))
    self_attention = adapter.self_attention(layer)
    bias = adapter.relative_bias
    if bias is not None and heads.numel() < bias.weight.shape[1]:
        _mix_in(self_attention, _SharedBiasSubset)
        self_attention.register_buffer("bias_heads", heads.to(bias.weight.device), persistent=False)
    self_attention.num_attention_heads = heads.numel()
    self_attention.all_head_size = heads.numel() * dh


def keep_query_heads(adapter, layer: int, heads: list[int], cols: torch.Tensor | None, group_size: int) -> None:
    """Decoders: slice Q of `layer` to the query `heads` it keeps (sorted) and K/V to their KV heads (query
    head h reads KV head h // `group_size`), inputs cut to `cols`, in place; see the module docstring.

    Index arithmetic stays in Python: the architecture is also built on the meta device (`core.pruned`)."""
    dh = adapter.head_dim(layer)
    groups = [h // group_size for h in heads]
    kv = sorted(set(groups))
    counts = {groups.count(g) for g in kv}
    adapter.set_part(layer, "query", slice_linear(adapter.query(layer), rows=head_rows(torch.as_tensor(heads), dh),
                                                  cols=cols))
    for name in ("key", "value"):
        projection = slice_linear(adapter.part(layer, name), rows=head_rows(torch.as_tensor(kv), dh), cols=cols)
        if len(counts) > 1:
            _mix_in(projection, _KVPerQueryHead, head_dim=dh)
            position = torch.as_tensor([kv.index(g) for g in groups], device=projection.weight.device)
            projection.register_buffer("kv_index", position, persistent=False)
        adapter.set_part(layer, name, projection)
    adapter.self_attention(layer).num_key_value_groups = counts.pop() if len(counts) == 1 else 1


# ----------------------------------------------------------------------------- slicing


def causal_lm(model: nn.Module) -> nn.Module:
    """The `*ForCausalLM` of a prompted decoder (`core.prompting.PromptClassifier`) or the model itself."""
    return getattr(model, "lm", model)


def _slice_encoder_stream(a, keep: torch.Tensor) -> None:
    """Encoders: the embedding tables' columns, the embedding LayerNorm and the classifier's reader."""
    if hasattr(a.base, "embeddings_project"):
        raise ValueError("Hidden-dim pruning is not supported for models with an embedding projection (ELECTRA).")
    emb = a.embeddings
    for path, old in a.embedding_tables.items():
        new = torch.nn.utils.skip_init(nn.Embedding, old.num_embeddings, keep.numel(), padding_idx=old.padding_idx,
                                       device=old.weight.device, dtype=old.weight.dtype)
        new.weight.copy_(old.weight.index_select(1, keep))
        setattr(emb, path.rpartition(".")[2], new)
    emb.LayerNorm = slice_norm(emb.LayerNorm, keep)
    parent, attr = _stream_reader(a.model)
    setattr(parent, attr, slice_linear(getattr(parent, attr), cols=keep))


def _slice_decoder_stream(a, keep: torch.Tensor) -> None:
    """Decoders: the token table's columns in place (its class kept), the LM head's columns (a tied head
    gets the sliced table itself) and the final norm."""
    table = a.word_embeddings
    lm = causal_lm(a.model)
    head = lm.get_output_embeddings()
    tied = head.weight is table.weight
    table.weight = nn.Parameter(table.weight.detach().index_select(1, keep))
    table.embedding_dim = keep.numel()
    if tied:
        head.weight, head.in_features = table.weight, keep.numel()
    else:
        lm.set_output_embeddings(slice_linear(head, cols=keep))
    slice_rms_norm(a.final_norm, keep)


def branch_ends(a, layer: int) -> tuple[tuple[str, nn.Module, nn.Module], ...]:
    """(gate group, projection, branch) of both sublayers of decoder layer `layer`: ("mha", o_proj, its
    branch) and ("ffn", down_proj, its branch); the branch is a post-norm (Gemma3) when it is not the
    projection itself."""
    return (("mha", a.attention_output(layer), a.attention_branch(layer)),
            ("ffn", a.ffn_out(layer), a.ffn_branch(layer)))


def _slice_layer_norms(a, layer: int, keep: torch.Tensor) -> None:
    """Every norm of `layer` that reads or writes the stream, cut to the hidden dims `keep`."""
    if not a.is_decoder:
        for norm in ("attention_norm", "ffn_norm"):
            a.set_part(layer, norm, slice_norm(a.part(layer, norm), keep))
        return
    post_norms = [branch for _, inner, branch in branch_ends(a, layer) if branch is not inner]
    for norm in (a.attention_norm(layer), a.ffn_norm(layer), *post_norms):
        slice_rms_norm(norm, keep)


def _stream_reader(model: nn.Module) -> tuple[nn.Module, str]:
    """(parent, attribute) of the Linear that reads the encoder's output stream for classification."""
    pooler = getattr(model.base_model, "pooler", None)
    if pooler is not None and isinstance(getattr(pooler, "dense", None), nn.Linear):
        return pooler, "dense"
    head = getattr(model, "classifier", None)
    if head is not None and isinstance(getattr(head, "dense", None), nn.Linear):  # RoBERTa / ELECTRA heads
        return head, "dense"
    if isinstance(head, nn.Linear):
        return model, "classifier"
    raise ValueError(f"Cannot find the layer reading the hidden stream of {type(model).__name__}; "
                     "hidden-dim pruning supports BERT / RoBERTa / ELECTRA / MPNet classifiers.")


@torch.no_grad()
def apply_plan(arch, plan: PruningPlan) -> None:
    """Slice the modules of `arch` (an unpruned model, changed in place!) to the units `plan` keeps.

    Weights are copied as they are (fold the gates first). Also used to rebuild the architecture of
    a saved pruned model before loading its weights.
    """
    a = as_adapter(arch)
    shape = GateShape.of(a)
    dh = shape.head_dim
    keep = torch.as_tensor(plan.hidden, dtype=torch.long)  # (d',)
    cols = None if len(plan.hidden) == shape.hidden else keep
    if cols is not None:
        (_slice_decoder_stream if a.is_decoder else _slice_encoder_stream)(a, keep)
    for layer in range(len(a.layers)):
        heads = torch.as_tensor(plan.heads[layer], dtype=torch.long)
        if heads.numel() == 0:
            remove_all_heads(a, layer, cols)
        elif a.is_decoder:
            keep_query_heads(a, layer, plan.heads[layer], cols, shape.group_size)
        else:
            keep_heads(a, layer, heads, cols)
        a.set_part(layer, "attention_output",
                   slice_linear(a.attention_output(layer), rows=cols, cols=head_rows(heads, dh)))
        units = torch.as_tensor(plan.units[layer], dtype=torch.long)  # maybe empty: the FFN adds only its bias
        for name in ("ffn_gate", "ffn_in"):  # SwiGLU's gate rows go with the up rows (no gate: encoders)
            if a.part(layer, name) is not None:
                a.set_part(layer, name, slice_linear(a.part(layer, name), rows=units, cols=cols))
        a.set_part(layer, "ffn_out", slice_linear(a.ffn_out(layer), rows=cols, cols=units))
        if cols is not None:
            _slice_layer_norms(a, layer, keep)
