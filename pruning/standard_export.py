"""Plain-transformers exports: a pruned model whose shape its architecture's config can express is saved as a
normal folder that `AutoModelForSequenceClassification` / `AutoModelForCausalLM.from_pretrained` loads without
HeadLab (config rewritten, weights renamed and renumbered); any other shape keeps HeadLab's own layout
(`pruning.export.save_pruned`, loaded by `core.pruned`). ONNX is written for every shape.

Standard shapes (`standard_shape`), all with every hidden dim kept:
- decoders (Llama, Qwen2, Gemma3): whole layers removed (no head and no MLP unit left, and no output bias, so
  the layer adds nothing to the residual stream), and every other layer with the same query heads, KV heads
  (each kept KV head serving the same number of query heads) and MLP width. The config gets
  num_hidden_layers, num_attention_heads, num_key_value_heads, intermediate_size, head_dim (explicit: the
  head size does not change) and the kept layers' layer_types.
- encoders (BERT family): every head kept (the config ties the head size to hidden_size /
  num_attention_heads, so fewer heads cannot be expressed) and the same FFN width in every layer:
  intermediate_size. A post-norm layer cannot be taken out of a gated model exactly (its LayerNorms stay),
  so whole encoder layers go only by `drop_layers`, which deletes them (a different model, measured as such).

`round_to_standard` moves a gate state to the nearest standard one; `pruning apply --make-standard` measures
what that costs. The plain folder's logits are checked against the pruned model's before it is written.
"""

from __future__ import annotations

import copy
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from core.adapter import GateShape, as_adapter
from core.folders import atomic_folder, read_marker
from core.loaded import LoadedModel
from core.lowrank import low_rank_names
from core.structure import causal_lm, pruning_info
from pruning.export import _SAMPLE, ONNX_FILE, WRITER, export_onnx, onnx_max_diff, save_pruned, write_int8
from pruning.gate_state import GateState, unit_scores

STANDARD, HEADLAB = "standard", "headlab"  # the two kinds of export folder
TOLERANCE = 1e-4  # largest |logit| difference allowed between the plain folder and the pruned model


@dataclass
class Verdict:
    """Whether a model's shape is standard for its architecture: the kept layers (original numbering) and the
    config fields a plain folder rewrites; `reason` says why (or why not) in one line."""

    standard: bool
    reason: str
    layers: list[int] = field(default_factory=list)
    sizes: dict = field(default_factory=dict)


@dataclass
class Exported:
    """What `export` wrote: the folder, its kind (standard | headlab) and why."""

    path: Path
    kind: str
    reason: str


def standard_shape(loaded: LoadedModel) -> Verdict:
    """The verdict on a pruned (`pruning.surgery.prune`, `core.pruned.load_pruned`) or unpruned `loaded`."""
    info = pruning_info(causal_lm(loaded.model))
    thin = low_rank_names(loaded.model)
    if thin:
        return Verdict(False, f"{len(thin)} matrices are two thin ones (FLOP): no transformers class holds them")
    if info is None:
        shape = GateShape.of(loaded)
        return Verdict(True, "not pruned: the original shape", list(range(shape.layers)), {})
    plan, shape = info.plan, info.original
    if len(plan.hidden) < shape.hidden:
        return Verdict(False, f"hidden dims pruned ({len(plan.hidden)} of {shape.hidden} kept): the config has one "
                              "hidden size for the embeddings, every norm and the LM head or classifier")
    adapter = as_adapter(loaded)
    return _decoder_verdict(adapter, plan, shape) if adapter.is_decoder else _encoder_verdict(plan, shape)


def _decoder_verdict(adapter, plan, shape: GateShape) -> Verdict:
    kept, counts = [], set()
    for layer, (heads, units) in enumerate(zip(plan.heads, plan.units)):
        if not heads and not units:
            biased = [n for n in ("attention_output", "ffn_out") if adapter.part(layer, n).bias is not None]
            if biased:
                return Verdict(False, f"layer {layer} is empty but its {' and '.join(biased)} still adds a bias")
            continue
        if not heads or not units:
            what = "attention" if not heads else "MLP"
            return Verdict(False, f"layer {layer} keeps its {'MLP' if not heads else 'attention'} but not its "
                                  f"{what}: a config has no layer with only one sublayer")
        groups = [h // shape.group_size for h in heads]
        per_group = {groups.count(g) for g in set(groups)}
        if len(per_group) > 1:
            return Verdict(False, f"layer {layer}'s KV heads serve unequal numbers of query heads "
                                  f"({sorted(per_group)}): a config has one group size")
        kept.append(layer)
        counts.add((len(heads), len(set(groups)), len(units)))
    if not kept:
        return Verdict(False, "every layer is empty")
    if len(counts) > 1:
        return Verdict(False, "layers keep different numbers of (query heads, KV heads, MLP units): "
                              f"{sorted(counts)}; a config has one of each")
    heads, kv, units = counts.pop()
    removed = [layer for layer in range(shape.layers) if layer not in kept]
    sizes = {"num_hidden_layers": len(kept), "num_attention_heads": heads, "num_key_value_heads": kv,
             "intermediate_size": units, "head_dim": shape.head_dim}
    what = f"layer(s) {', '.join(map(str, removed))} removed, " if removed else ""
    return Verdict(True, f"{what}{len(kept)} layers of {heads} query heads, {kv} KV heads, {units} MLP units each",
                   kept, sizes)


def _encoder_verdict(plan, shape: GateShape) -> Verdict:
    for layer, (heads, units) in enumerate(zip(plan.heads, plan.units)):
        if len(heads) < shape.heads:
            return Verdict(False, f"layer {layer} keeps {len(heads)} of {shape.heads} heads: an encoder's config "
                                  "ties the head size to hidden_size / num_attention_heads")
        if not units:
            return Verdict(False, f"layer {layer} has no FFN left: a config has no layer without one")
    widths = sorted({len(units) for units in plan.units})
    if len(widths) > 1:
        return Verdict(False, f"layers keep different FFN widths ({widths[0]}..{widths[-1]}): a config has one")
    return Verdict(True, f"every head kept, {widths[0]} FFN units in each of the {shape.layers} layers",
                   list(range(shape.layers)), {"intermediate_size": widths[0]})


# ----------------------------------------------------------------------------- building the plain model


def plain_model(loaded: LoadedModel, verdict: Verdict) -> nn.Module:
    """A plain transformers model (seq classifier / causal LM) from the rewritten config, holding `loaded`'s
    weights with the kept layers renumbered 0.. (loaded strictly: every tensor must fit)."""
    source = causal_lm(loaded.model)
    config = copy.deepcopy(source.config)
    for name, value in verdict.sizes.items():
        setattr(config, name, value)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in verdict.layers]
    auto = AutoModelForCausalLM if as_adapter(loaded).is_decoder else AutoModelForSequenceClassification
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = auto.from_config(config, attn_implementation=source.config._attn_implementation)
    prefix = _layers_prefix(source, as_adapter(loaded).layers)
    number = {old: new for new, old in enumerate(verdict.layers)}
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    weights = {}
    for name, tensor in source.state_dict().items():
        match = pattern.match(name)
        if match is None:
            weights[name] = tensor
        elif int(match[1]) in number:
            weights[f"{prefix}.{number[int(match[1])]}.{name[match.end():]}"] = tensor
    model.load_state_dict(weights, strict=True)
    return model.eval()


def _layers_prefix(model: nn.Module, layers: nn.ModuleList) -> str:
    """The state-dict prefix of the layer list, e.g. "model.layers" or "bert.encoder.layer"."""
    return next(name for name, module in model.named_modules() if module is layers)


def drop_layers(loaded: LoadedModel, layers: list[int]) -> nn.Module:
    """The unpruned `loaded` with `layers` (0-based) deleted outright, as a plain transformers model (the other
    layers renumbered). ValueError for an unknown layer or for deleting every layer."""
    shape = GateShape.of(loaded)
    wrong = [layer for layer in layers if not 0 <= layer < shape.layers]
    if wrong:
        raise ValueError(f"--prune-layers: layer {wrong[0]} does not exist (layers are 0..{shape.layers - 1}).")
    kept = [layer for layer in range(shape.layers) if layer not in set(layers)]
    if not kept:
        raise ValueError(f"--prune-layers removes every one of the {shape.layers} layers; keep at least one.")
    return plain_model(loaded, Verdict(True, "", kept, {"num_hidden_layers": len(kept)}))


def parse_layers(text: str) -> list[int]:
    """"4,5" -> [4, 5] (sorted, unique); ValueError names the bad item."""
    layers = []
    for item in text.split(","):
        if not item.strip().isdigit():
            raise ValueError(f"--prune-layers takes comma-separated layer numbers (0-based), e.g. 4,5. "
                             f"Got '{item.strip()}' in '{text}'.")
        layers.append(int(item))
    return sorted(set(layers))


def without_layers(state: GateState, layers: list[int]) -> GateState:
    """`state` with the attention and MLP of `layers` closed: a decoder's whole layers (nothing left to add to
    the residual stream; exactly the model with them deleted when their outputs have no bias)."""
    mha, ffn = state.mha.detach().clone(), state.ffn.detach().clone()
    for layer in layers:
        if not 0 <= layer < mha.numel():
            raise ValueError(f"--prune-layers: layer {layer} does not exist (layers are 0..{mha.numel() - 1}).")
        mha[layer] = ffn[layer] = 0.0
    return state.replace(mha=mha, ffn=ffn)


def logits(model: nn.Module, loaded: LoadedModel, texts: list[str] | None = None) -> torch.Tensor:
    """Logits (B, classes) of the plain `model` (a classifier, or a decoder's causal LM) on `texts` (a padded
    batch) as `loaded` computes its own: a decoder's label-word logits at each row's last real token through
    `loaded`'s prompt wrapper, which reads `model` instead of its own LM."""
    batch = loaded.tokenizer(texts or _SAMPLE, padding=True, return_tensors="pt")
    with torch.no_grad():
        if as_adapter(loaded).is_decoder:
            wrapper = copy.copy(loaded.model)  # the PromptClassifier, reading the plain LM instead
            wrapper._modules = {**wrapper._modules, "lm": model}
            return wrapper(**batch).logits
        return model(**batch).logits


# ----------------------------------------------------------------------------- saving


def save_standard(loaded: LoadedModel, model: nn.Module, out: str | Path, reason: str, *, overwrite: bool = False,
                  onnx: bool = False, int8: bool = False) -> Path:
    """Write the plain `model` (from `plain_model` / `drop_layers`) with `loaded`'s tokenizer to `out` (atomic,
    marked as HeadLab's export: `core.folders`). With `onnx`, model.onnx of the same model (checked against
    torch); with `int8` also model.int8.onnx (`pruning.export.write_int8`). A decoder's prompt goes into the
    marker (HeadLab reads the folder as a plain decoder)."""
    out = Path(out).expanduser()
    details = {"kind": STANDARD, "reason": reason}
    if loaded.prompt is not None:
        details["prompt"] = loaded.prompt.to_dict()
    with atomic_folder(out, written_by=WRITER, overwrite=overwrite, **details) as tmp:
        model.save_pretrained(tmp)
        loaded.text_tokenizer.save_pretrained(tmp)
        if onnx or int8:
            export_onnx(loaded, tmp / ONNX_FILE)
            diff = onnx_max_diff(loaded, tmp / ONNX_FILE)
            if diff > TOLERANCE:
                raise ValueError(f"The ONNX export differs from torch by {diff:.2e} (> {TOLERANCE}) in logits.")
        write_int8(tmp, int8)
    return out


def export(loaded: LoadedModel, out: str | Path, *, overwrite: bool = False, onnx: bool = False,
           int8: bool = False) -> Exported:
    """Save a pruned `loaded` as a plain-transformers folder when its shape is standard, else in HeadLab's
    layout (`save_pruned`); both with model.onnx when asked (and model.int8.onnx with `int8`). Returns what
    was written and why."""
    verdict = standard_shape(loaded)
    if not verdict.standard:
        path = save_pruned(loaded, out, overwrite=overwrite, onnx=onnx, int8=int8)
        return Exported(path, HEADLAB, f"HeadLab's layout (loads with HeadLab or as ONNX): {verdict.reason}")
    model = plain_model(loaded, verdict)
    diff = float((logits(model, loaded) - logits(causal_lm(loaded.model), loaded)).abs().max())
    if diff > TOLERANCE:
        raise ValueError(f"The plain model differs from the pruned one by {diff:.2e} in logits (> {TOLERANCE}).")
    reason = f"a plain transformers folder (from_pretrained loads it): {verdict.reason}"
    return Exported(save_standard(loaded, model, out, reason, overwrite=overwrite, onnx=onnx, int8=int8), STANDARD,
                    reason)


def export_kind(folder: str | Path) -> tuple[str, str] | None:
    """(kind, reason) of an export folder HeadLab wrote, from its marker (None when it says nothing)."""
    record = read_marker(folder)
    if record is None:
        return None
    if "kind" in record:
        return record["kind"], record.get("reason", "")
    if (Path(folder) / "pruning.json").is_file():
        return HEADLAB, "HeadLab's layout (loads with HeadLab or as ONNX)"
    return None


# ----------------------------------------------------------------------------- rounding


def round_to_standard(loaded: LoadedModel, state: GateState) -> GateState:
    """The standard gate state nearest to `state` on the unpruned `loaded`: every hidden dim reopened; a
    decoder's empty layers (mha and FFN closed, or nothing left in them) stay removed and every other layer
    keeps the same number of KV heads, query heads per KV head and MLP units (the kept layers' means,
    rounded); an encoder reopens every head and sublayer and keeps the same FFN width in every layer. Which
    units stay: the open ones with the largest gate values first, then by weight magnitude (the reopened
    ones at gate 1)."""
    adapter = as_adapter(loaded)
    shape = GateShape.of(adapter)
    s = state.detach()
    head = torch.where(s.mha[:, None] > 0, s.head, torch.zeros_like(s.head))
    units = torch.where(s.ffn[:, None] > 0, s.intermediate, torch.zeros_like(s.intermediate))
    if adapter.is_decoder:
        alive = [layer for layer in range(shape.layers) if (head[layer] > 0).any() or (units[layer] > 0).any()]
    else:
        alive = list(range(shape.layers))
    if not alive:
        raise ValueError("The gate state closes every layer; there is no standard model to round it to.")
    head_scores = _rank(head, unit_scores("head", adapter, "magnitude", 0, "round_to_standard()"))
    ffn_scores = _rank(units, unit_scores("intermediate", adapter, "magnitude", 0, "round_to_standard()"))
    width = max(1, round(float((units[alive] > 0).sum(dim=1).float().mean())))
    new_head, new_units = torch.zeros_like(s.head), torch.zeros_like(s.intermediate)
    if adapter.is_decoder:
        g = shape.group_size
        kv_counts = [len({h // g for h in torch.nonzero(head[layer] > 0).flatten().tolist()}) for layer in alive]
        kv = max(1, round(sum(kv_counts) / len(alive)))
        per = max(1, round(float((head[alive] > 0).sum()) / max(1, sum(kv_counts))))
        for layer in alive:
            grouped = head_scores[layer].view(shape.kv_heads, g)
            for group in torch.argsort(-grouped.sort(dim=1, descending=True).values[:, :per].sum(dim=1),
                                       stable=True)[:kv].tolist():
                for h in torch.argsort(-grouped[group], stable=True)[:per].tolist():
                    new_head[layer, group * g + h] = s.head[layer, group * g + h] if head[layer, group * g + h] > 0 \
                        else 1.0
    else:
        new_head = torch.where(head > 0, s.head, torch.ones_like(s.head))
    for layer in alive:
        for unit in torch.argsort(-ffn_scores[layer], stable=True)[:width].tolist():
            new_units[layer, unit] = units[layer, unit] if units[layer, unit] > 0 else 1.0
    gate = torch.zeros(shape.layers)
    gate[alive] = 1.0
    return GateState(head=new_head, mha=gate, intermediate=new_units, ffn=gate.clone(),
                     hidden=torch.ones(shape.hidden))


def _rank(gates: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """Scores that order open units (by gate value) before closed ones, each by weight magnitude after that."""
    norm = magnitude / magnitude.max().clamp_min(1e-12)  # in [0, 1]
    return (gates > 0).float() * 4 + gates * 2 + norm
