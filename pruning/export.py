"""Save physically pruned models as folders (the layout `core.pruned` describes and loads back, plus a
`headlab.json` marker) and export them to ONNX (`model.onnx`: logits for (input_ids, attention_mask)
with dynamic batch and length, checked against torch). A pruned decoder is saved as its causal LM with
the plain tokenizer and its prompt, and loads back as the same prompted classifier."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from core.folders import FolderExists, atomic_folder
from core.lowrank import low_rank_names
from core.messages import quote
from core.pruned import FORMAT, PRUNING_FILE, tied_names
from core.structure import causal_lm, pruning_info
from pruning.int8 import INT8_ONNX_FILE, quantize_onnx
from pruning.onnx_runtime import ONNX_FILE, onnx_session

WRITER = "pruning.export.save_pruned"  # names the writer in an export's marker (core.folders)
ExportExists = FolderExists  # what `save_pruned` raises for an existing folder without `overwrite`


def check_name(name: str) -> str:
    """Validate a folder *name* chosen by a user (UI text box): no path separators, not '.'/'..'/empty."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError("The export name must be a non-empty folder name.")
    if "/" in name or "\\" in name or os.sep in name or name in (".", "..") or "\0" in name:
        raise ValueError(f"The export name must be a plain folder name without path separators. Got '{quote(name)}'.")
    return name.strip()


# ----------------------------------------------------------------------------- save


def save_pruned(loaded, out: str | Path, *, overwrite: bool = False, onnx: bool = False, int8: bool = False) -> Path:
    """Write the pruned `loaded` (from `pruning.surgery.prune` or `load_pruned`) to the folder `out`.

    The folder is written whole under a temporary name and renamed into place
    (`core.folders.atomic_folder`): a failure never leaves a half-written export, and an existing
    `out` stays as it was. Raises `ExportExists` if `out` is a non-empty folder and `overwrite` is
    False, `core.folders.FolderError` if `out` is a file or a folder `save_pruned` did not write
    (replaced only with `overwrite`, never a user's folder), ValueError for a model that is not
    pruned. With `onnx`, also writes model.onnx and checks onnxruntime against torch (ValueError if
    logits differ by more than 1e-4). With `int8` (implies `onnx`), also model.int8.onnx, its dynamically
    int8-quantised copy (`pruning.int8.quantize_onnx`). Returns the folder.
    """
    info = pruning_info(loaded.model)
    if info is None:
        raise ValueError("save_pruned() needs a physically pruned model: call pruning.surgery.prune() first.")
    out = Path(out).expanduser()
    model = causal_lm(loaded.model)  # a decoder's weights are its causal LM's
    tied = tied_names(model)
    with atomic_folder(out, written_by=WRITER, overwrite=overwrite) as tmp:
        model.config.save_pretrained(tmp)
        tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k not in tied}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        loaded.text_tokenizer.save_pretrained(tmp)
        record = {
            "format": FORMAT,
            **info.plan.to_dict(),
            "original": vars(info.original),
            "gate_state": info.gate_state,
            "source": loaded.source,
            **({"low_rank": ranks} if (ranks := low_rank_names(model)) else {}),
            **({"prompt": loaded.prompt.to_dict()} if loaded.prompt is not None else {}),
        }
        (tmp / PRUNING_FILE).write_text(json.dumps(record))
        if onnx or int8:
            export_onnx(loaded, tmp / ONNX_FILE)
            diff = onnx_max_diff(loaded, tmp / ONNX_FILE)
            if diff > 1e-4:
                raise ValueError(f"The ONNX export differs from torch by {diff:.2e} (> 1e-4) in logits.")
        write_int8(tmp, int8)
    return out


# ----------------------------------------------------------------------------- ONNX


def write_int8(folder: Path, int8: bool) -> None:
    """With `int8`, write folder/model.int8.onnx from folder/model.onnx (`pruning.int8.quantize_onnx`)."""
    if int8:
        quantize_onnx(folder / ONNX_FILE, folder / INT8_ONNX_FILE)


class LogitsModule(nn.Module):
    """(input_ids, attention_mask) (B, T) int64 -> logits (B, classes): the graph ONNX sees."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


_SAMPLE = ["a quietly moving film about families and what they keep", "dull", "not bad at all, really"]


def export_onnx(loaded, path: str | Path, *, opset: int = 17) -> Path:
    """Export `loaded.model` to ONNX at `path`: inputs input_ids, attention_mask (batch, sequence) int64,
    output logits (batch, classes) float32; batch and sequence axes are dynamic. For a decoder the
    graph is its `PromptClassifier`: the label words' logits at each row's last real token (the ids
    are the prompt's, formatted by `loaded.tokenizer`; right padding).

    Uses the TorchScript exporter (`dynamo=False`): the torch.export one (`dynamo=True`) also works
    and gives the same logits on torch 2.13, but took 5 s instead of 0.3 s on the tiny test model and
    prints progress to stdout, which would garble the CLI's table. A model without any head never reads
    the mask, and the tracer drops inputs nothing reads: the dropped ones are put back as (unused)
    graph inputs, so every export takes the same two inputs.
    """
    path = Path(path)
    batch = loaded.tokenizer(_SAMPLE[:2], padding=True, return_tensors="pt")
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
            "logits": {0: "batch"}}
    module = LogitsModule(loaded.model).eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarning on the mask helper; deprecation of the legacy exporter
        torch.onnx.export(module, (batch["input_ids"], batch["attention_mask"]), str(path),
                          input_names=["input_ids", "attention_mask"], output_names=["logits"],
                          dynamic_axes=axes, opset_version=opset, dynamo=False)
    _restore_inputs(path, axes, [name for name in axes if name != "logits"])
    return path


def _restore_inputs(path: Path, axes: dict[str, dict[int, str]], names: list[str]) -> None:
    """Add the `names` (int64 tensors with the symbolic `axes`) the exported graph lost back as inputs."""
    import onnx

    model = onnx.load(str(path))
    present = {i.name for i in model.graph.input}
    lost = [name for name in names if name not in present]
    if not lost:
        return
    for name in lost:
        dims = [axes[name][k] for k in sorted(axes[name])]
        model.graph.input.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT64, dims))
    onnx.save(model, str(path))


def onnx_max_diff(loaded, path: str | Path, texts: list[str] | None = None) -> float:
    """Largest |logit| difference between onnxruntime and torch on `texts` (padded batch, a new length)."""
    texts = texts or _SAMPLE
    batch = loaded.tokenizer(texts, padding=True, return_tensors="pt")
    session = onnx_session(path)
    out = session.run(["logits"], {"input_ids": batch["input_ids"].numpy(),
                                   "attention_mask": batch["attention_mask"].numpy()})[0]
    with torch.no_grad():
        ref = loaded.model(**batch).logits.numpy()
    return float(np.abs(out - ref).max())
