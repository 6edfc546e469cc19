"""Training checkpoints: one `checkpoint.pt` per run folder, checksummed, with the RNG state.

A checkpoint is written atomically (`core.folders.atomic_file`: a hidden sibling, fsynced, renamed
over the old one) with `torch.save` and read with `weights_only=True`: tensors and plain types only
(RNG states are stored as tensors). Every checkpoint carries the sha256 of its payload
(`payload_digest`), checked on load: damaged bytes inside a tensor, which torch would load silently,
make the resume fail with one line instead.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from core.folders import atomic_file

CHECKPOINT = "checkpoint.pt"  # the file in a run folder
CHECKPOINT_FORMAT = 2  # 2: with the payload's sha256


def rng_state() -> dict[str, torch.Tensor]:
    """The torch CPU RNG state as a tensor (gate sampling and dropout draw from it)."""
    return {"torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])


def payload_digest(payload: dict) -> str:
    """sha256 (hex) of a checkpoint payload: every tensor's dtype, shape and bytes and every other
    value, dict keys in sorted order; the same before `torch.save` and after `torch.load`."""
    digest = hashlib.sha256()
    _feed(digest, payload)
    return digest.hexdigest()


def _feed(digest, value) -> None:
    """Add `value` (a tensor, dict, list / tuple or plain value) to `digest`, tagged by its kind."""
    if isinstance(value, torch.Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"tensor {flat.dtype} {tuple(value.shape)};".encode())
        digest.update(flat.view(torch.uint8).numpy())  # the bytes themselves, not a copy
    elif isinstance(value, dict):
        digest.update(f"dict {len(value)};".encode())
        for key in sorted(value, key=repr):
            digest.update(f"{key!r}:".encode())
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"list {len(value)};".encode())
        for item in value:
            _feed(digest, item)
    else:
        digest.update(f"{type(value).__name__} {value!r};".encode())


def save_checkpoint(run_dir: str | Path, payload: dict) -> Path:
    """Write `payload` (tensors, numbers, strings, lists, dicts only) to run_dir/checkpoint.pt atomically,
    with its `payload_digest` as "sha256"."""
    path = Path(run_dir) / CHECKPOINT
    body = {"format": CHECKPOINT_FORMAT, **payload}
    body["sha256"] = payload_digest(body)
    with atomic_file(path) as tmp:
        torch.save(body, tmp)
    return path


def load_checkpoint(run_dir: str | Path) -> dict:
    """Read run_dir/checkpoint.pt (weights_only) and check its sha256. ValueError, one line, if it is
    missing, unreadable, of another format or corrupt (checksum mismatch); the file is left as it is."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise ValueError(f"No checkpoint in {Path(run_dir)}: the run ended before its first checkpoint; "
                         "start a new run instead.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, unpickling error, bit rot: all the same to the user
        detail = " ".join(str(exc).split())[:200]
        raise ValueError(f"The checkpoint {path} is corrupt or unreadable ({type(exc).__name__}: {detail}); "
                         "delete the run or start a new one.") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT or "step" not in payload:
        raise ValueError(f"The checkpoint {path} is not a HeadLab training checkpoint of format {CHECKPOINT_FORMAT} "
                         "(with a checksum); start a new run instead.")
    if payload.pop("sha256", None) != payload_digest(payload):
        raise ValueError(f"The checkpoint {path} is corrupt (checksum mismatch); delete the run or start a new one.")
    return payload
