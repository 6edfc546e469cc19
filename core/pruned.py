"""Load a physically pruned model saved by HeadLab (`pruning.export.save_pruned`).

A pruned folder holds:

    config.json        the *original* model's config (sizes before pruning; a decoder's holds its label names)
    model.safetensors  the pruned weights (state-dict names as in transformers; zero-width tensors for
                       skipped sublayers); a decoder's are its causal LM's, a tied LM head stored once
                       under the token table's name, as transformers saves it
    pruning.json       kept heads / FFN units / hidden dims, skipped sublayers, the gate state; a
                       decoder's also its prompt (`PromptSpec.to_dict()`, key "prompt")
    tokenizer files    as saved by the (plain) tokenizer, chat template included
    model.onnx         optional, logits for (input_ids, attention_mask) with dynamic batch and length

`save_pretrained`/`from_pretrained` cannot round-trip such a model (size mismatch), so `load_pruned`
builds the original architecture from config.json (never remote code) on the meta device, checks the
plan against it and the sliced architecture's tensors against the weights file, then builds it for
real, slices it as pruning.json says and loads the safetensors strictly (a tied tensor is filled once
through its first name). A decoder comes back as the same prompted classifier
(`core.prompting.prompt_classifier` with the saved prompt and label names). No pickles anywhere.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from core.adapter import DECODER_MODEL_TYPES, Adapter, GateShape
from core.errors import ModelError
from core.folder import folder_fingerprint, inspect_folder
from core.loaded import LoadedModel
from core.lowrank import rebuild_low_rank
from core.prompting import PromptSpec, prompt_classifier
from core.structure import PruningInfo, PruningPlan, apply_plan
from core.weights import expected_shapes, meta_model

PRUNING_FILE = "pruning.json"
FORMAT = 1  # version of pruning.json


def check_gate_state(record: dict, shape: GateShape) -> None:
    """ValueError unless `record` (a GateState's `to_dict()`) has the sizes of `shape`: head (L, H),
    mha (L,), intermediate (L, d_ff), ffn (L,), hidden (d,)."""
    sizes = {"head": (shape.layers, shape.heads), "mha": (shape.layers,),
             "intermediate": (shape.layers, shape.intermediate), "ffn": (shape.layers,), "hidden": (shape.hidden,)}
    for name, size in sizes.items():
        got = np.asarray(record[name], dtype=np.float32).shape
        if got != size:
            raise ValueError(f"gate_state {name} has sizes {got}, the config describes {size}")


def tied_names(model: nn.Module) -> set[str]:
    """State-dict names of tensors that are another name's tensor too (a tied LM head): saved once."""
    return set(model.state_dict(keep_vars=True)) - set(expected_shapes(model))


def load_pruned(path: str | Path, *, attn_implementation: str = "eager", source: str | None = None):
    """Load a folder written by `pruning.export.save_pruned` as a `LoadedModel` in eval mode.

    Raises `ModelError` (one line) for a bad folder: missing/garbled pruning.json, indices
    out of range, weights whose names or shapes do not match the pruned architecture.
    """
    path = Path(path).expanduser()
    folder = inspect_folder(path)
    config, weights, has_classifier = folder.config, folder.weights, folder.has_classifier
    if weights.name != "model.safetensors":
        raise ModelError(f"{path}: a pruned folder must hold a single model.safetensors.")
    try:
        record = json.loads((path / PRUNING_FILE).read_text())
        if record.get("format") != FORMAT:
            raise ValueError(f"unknown format {record.get('format')!r} (expected {FORMAT})")
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelError(f"{path}/{PRUNING_FILE} cannot be read ({exc}).") from exc

    decoder = config.model_type in DECODER_MODEL_TYPES
    auto = AutoModelForCausalLM if decoder else AutoModelForSequenceClassification

    def original() -> nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return auto.from_config(config, trust_remote_code=False, attn_implementation=attn_implementation)

    try:
        shape = GateShape.of(meta_model(original))
        plan = PruningPlan.from_dict(record, shape)
        check_gate_state(record["gate_state"], shape)
        prompt = PromptSpec.from_dict(record["prompt"]) if decoder else None
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{path}/{PRUNING_FILE} does not fit {path}/config.json ({exc}).") from exc

    def pruned() -> nn.Module:
        model = original()
        apply_plan(model, plan)
        rebuild_low_rank(model, record.get("low_rank", {}))  # FLOP's thin layers (`core.lowrank`)
        return model

    try:
        meta_model(pruned)  # the low-rank record names Linear modules of this architecture
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelError(f"{path}/{PRUNING_FILE} does not fit {path}/config.json ({exc}).") from exc
    folder.check(pruned)  # names and shapes against the weights file, and the memory, before building
    model = pruned()
    missing, unexpected = model.load_state_dict(load_file(str(weights)), strict=False)
    if set(missing) - tied_names(model) or unexpected:  # folder.check compared the names already
        raise ModelError(f"{path}/model.safetensors does not fit the pruned architecture "
                         f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}).")
    model.eval()
    model.headlab_pruning = PruningInfo(plan=plan, gate_state=record["gate_state"], original=shape)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        raise ModelError(f"{path}: tokenizer could not be loaded ({type(exc).__name__}: {exc}).") from exc
    names = [str(model.config.id2label[i]) for i in range(model.config.num_labels)]
    notes = [f"Pruned: {plan.describe(shape)}."]
    if decoder:
        model, tokenizer = prompt_classifier(model, tokenizer, names, prompt)
        notes.insert(0, f"A decoder read as a classifier by prompting: label words {', '.join(prompt.label_words)}.")
    return LoadedModel(
        model=model, tokenizer=tokenizer, adapter=Adapter(model), source=source or str(path), path=path,
        label_names=names, has_classifier=has_classifier or decoder,
        fingerprint=folder_fingerprint(path, weights, (PRUNING_FILE,)), notes=notes, prompt=prompt,
    )
