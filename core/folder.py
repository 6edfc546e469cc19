"""A model folder checked before anything is built: config, tokenizer, safetensors weights (never
pickles), their tensor shapes against the architecture, and a stable fingerprint."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig

from core.adapter import SUPPORTED_MODEL_TYPES, unsupported
from core.errors import ModelError
from core.weights import buffer_names, check_memory, check_weights, expected_shapes, header_shapes, meta_model

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "sentencepiece.bpe.model")


def _weight_file(path: Path) -> Path:
    single = path / "model.safetensors"
    if single.exists():
        return single
    if (path / "model.safetensors.index.json").exists():
        return path / "model.safetensors.index.json"
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise ModelError(
            f"{path} holds only pickle weights (.bin/.pt); HeadLab loads safetensors only. "
            "Re-save the model with save_pretrained(safe_serialization=True)."
        )
    raise ModelError(f"{path} has no model.safetensors: not a saved Hugging Face model folder.")


def _weight_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape in the checkpoint (headers only); raises ModelError if the file is corrupt."""
    try:
        return header_shapes(weights)
    except Exception as exc:  # safetensors raises its own SafetensorError, OSError and JSON/KeyError variants
        raise ModelError(f"{weights} is corrupt or unreadable ({type(exc).__name__}: {exc}).") from exc


def folder_fingerprint(path: Path, weights: Path, extra: tuple[str, ...] = ()) -> str:
    """Short stable id of a model folder: hash of config.json (+ the `extra` files in it) and the weight
    file's size and head/tail bytes (config.json's for a non-safetensors weight file)."""
    digest = hashlib.sha1(b"".join((path / name).read_bytes() for name in ("config.json", *extra)))
    target = weights if weights.suffix == ".safetensors" else path / "config.json"
    size = target.stat().st_size
    with open(target, "rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        digest.update(f.read())
    digest.update(str(size).encode())
    return digest.hexdigest()[:12]


@dataclass
class Folder:
    """A model folder checked without loading weights: its config, weight file and tensor shapes."""

    path: Path
    config: object
    weights: Path
    shapes: dict[str, tuple[int, ...]]  # from the safetensors headers

    @property
    def has_classifier(self) -> bool:
        return any(k.startswith("classifier.") for k in self.shapes)

    def check(self, build: Callable[[], torch.nn.Module]) -> None:
        """Build the architecture `build()` describes on the meta device and refuse it (ModelError naming
        the tensors or the memory) unless the weights file holds exactly its tensors and it fits in
        memory; a missing classification head is allowed (it gets a fresh one, see `load_model`)."""
        arch = meta_model(build)
        try:
            check_memory(arch, self.path / "config.json")
            check_weights(expected_shapes(arch), self.shapes, self.weights, prefix=arch.base_model_prefix,
                          optional=() if self.has_classifier else ("classifier.",), ignorable=buffer_names(arch))
        except ValueError as exc:
            raise ModelError(str(exc)) from exc


def inspect_folder(path: Path) -> Folder:
    """Validate a model folder without loading weights (ModelError with one line otherwise)."""
    if not path.exists():
        raise ModelError(f"{path} does not exist.")
    if not path.is_dir():
        raise ModelError(f"{path} is not a folder; point HeadLab at a Hugging Face model folder.")
    if not (path / "config.json").exists():
        raise ModelError(f"{path} has no config.json: not a Hugging Face model folder.")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # unknown model_type, bad JSON, ...
        raise ModelError(f"{path}/config.json cannot be read ({exc}).".replace("\n", " ")) from exc
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise unsupported(config.model_type)
    if not any((path / name).exists() for name in TOKENIZER_FILES):
        raise ModelError(f"{path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}).")
    weights = _weight_file(path)
    return Folder(path=path, config=config, weights=weights, shapes=_weight_shapes(weights))
