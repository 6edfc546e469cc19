"""Check a folder's weights against the architecture its config describes, before building anything.

A config that says 6 layers over a weights file that holds 3 would otherwise load "fine" with three
randomly initialised layers; a config that claims 48 layers x 4096 would build a 40 GB model before
any check. Here the architecture is built on PyTorch's `meta` device (no memory, ~0.1 s even for
billions of parameters), its tensor names and shapes are compared with the safetensors header (read
without loading a tensor), and the bytes the real model needs are compared with the free memory.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

FLOAT = 4  # bytes per fp32 number: HeadLab builds every model in fp32
LOAD_FACTOR = 2  # while loading, the model and the tensors read from disk are both in memory
RUNTIME = 512 * 2**20  # bytes for Python, torch and the tokenizer
SHOWN = 3  # names quoted in an error line


class WeightsMismatch(ValueError):
    """The weights file does not hold what the config describes; the message names the tensors."""


def header_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a `model.safetensors` file or of every shard of a `.index.json`,
    read from the headers only (no tensor is loaded)."""
    if weights.name.endswith(".index.json"):
        files = sorted({weights.parent / name for name in json.loads(weights.read_text())["weight_map"].values()})
    else:
        files = [weights]
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def meta_model(build: Callable[[], nn.Module]) -> nn.Module:
    """`build()` run on the meta device: the architecture with shapes but no storage."""
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        return build()


def expected_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor `model.state_dict()` holds (persistent parameters and buffers), a tied
    tensor (an LM head sharing the token table) under its first name only, as safetensors saves it."""
    seen: set[int] = set()
    shapes = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            shapes[name] = tuple(tensor.shape)
    return shapes


def buffer_names(model: nn.Module) -> set[str]:
    """Names of all buffers, non-persistent ones included: old checkpoints still carry some of them
    (`embeddings.position_ids`), which the model recomputes and loading ignores."""
    return {name for name, _ in model.named_buffers()}


def _without_prefix(shapes: dict[str, tuple[int, ...]], prefix: str) -> dict[str, tuple[int, ...]]:
    """Names with the base model's prefix (`bert.`) dropped: a headless encoder is saved without it."""
    return {name.removeprefix(f"{prefix}.") if prefix else name: shape for name, shape in shapes.items()}


def _names(names: list[str]) -> str:
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


def check_weights(expected: dict[str, tuple[int, ...]], present: dict[str, tuple[int, ...]], where: Path, *,
                  prefix: str = "", optional: tuple[str, ...] = (), ignorable: set[str] = frozenset()) -> list[str]:
    """Compare the tensors an architecture needs (`expected`) with those a file holds (`present`).

    `prefix`: the base model's attribute name, which a headless checkpoint omits; `optional`: name
    prefixes that may be missing (a classification head the user will fine-tune). Returns the
    optional names that are missing (`ignorable`: names that may be present without being needed, see
    `buffer_names`); raises `WeightsMismatch` naming missing, unexpected or
    wrongly shaped tensors.
    """
    want, have = _without_prefix(expected, prefix), _without_prefix(present, prefix)
    missing = sorted(set(want) - set(have))
    absent_optional = [n for n in missing if n.startswith(optional)] if optional else []
    missing = [n for n in missing if n not in absent_optional]
    unexpected = sorted(set(have) - set(want) - set(_without_prefix(dict.fromkeys(ignorable, ()), prefix)))
    wrong = [f"{n} is {have[n]}, the config implies {want[n]}"
             for n in sorted(want) if n in have and have[n] != want[n]]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s) the config needs ({_names(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} tensor(s) the config has no place for ({_names(unexpected)})")
    if wrong:
        problems.append(f"{len(wrong)} of other shape ({_names(wrong)})")
    if problems:
        raise WeightsMismatch(f"{where} does not match its config.json: {'; '.join(problems)}.")
    return absent_optional


def available_memory() -> int | None:
    """The CPU's available memory in bytes (MemAvailable of /proc/meminfo); None where it is not known."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        return None
    return None


def check_memory(model: nn.Module, where: Path, available: int | None = None) -> int:
    """Bytes needed to load `model` (a meta-device architecture) in fp32; raises ValueError when they
    exceed the available memory (`available`, default `available_memory()`)."""
    parameters = sum(t.numel() for t in model.state_dict().values())
    needed = FLOAT * parameters * LOAD_FACTOR + RUNTIME
    free = available if available is not None else available_memory()
    if free is not None and needed > free:
        raise ValueError(f"{where} describes a model of {parameters / 1e6:,.0f} M parameters, which needs about "
                         f"{needed / 2**30:.1f} GiB to load, but only {free / 2**30:.1f} GiB are available.")
    return needed
