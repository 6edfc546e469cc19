"""k-means weight sharing: every value of a weight tensor replaced by the nearest of 2^bits shared values (a
codebook, one per tensor), stored as the codebook + one small integer index per weight (uint8 for bits <= 8).

Scalar (1-D) k-means as in Deep Compression (Han et al. 2016): centroids initialised linearly between the tensor's
min and max, then Lloyd iterations (assignment by the midpoints between sorted centroids). It saves storage only:
the decoded tensor is a dense float tensor and runs as fast as before.

`save_clustered` writes a pruned folder (`pruning.export.save_pruned`) whose shared tensors live in
`clustered.safetensors` (`<name>.codebook` float32 (2^bits,), `<name>.shape`, `<name>.indices`: two 4-bit indices
per byte for bits <= 4, else one uint8 / int16 each) instead of model.safetensors; `load_clustered` decodes them
and loads the model back (`core.pruned.load_pruned`).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from core.loaded import LoadedModel
from core.pruned import load_pruned
from pruning.export import save_pruned

CLUSTERED_FILE = "clustered.safetensors"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class Shared:
    """One shared tensor: `codebook` (k,) float32 ascending, `indices` (weight's shape) ints into it."""

    codebook: torch.Tensor
    indices: torch.Tensor

    def decode(self) -> torch.Tensor:
        return self.codebook[self.indices.long()]

    @property
    def bytes(self) -> int:
        return self.codebook.numel() * self.codebook.element_size() + self.indices.numel() * self.indices.element_size()


def _index_dtype(bits: int) -> torch.dtype:
    if not 1 <= bits <= 15:
        raise ValueError(f"bits must be in 1..15 (a codebook of 2..32768 values). Got {bits}.")
    return torch.uint8 if bits <= 8 else torch.int16


def kmeans_1d(values: torch.Tensor, bits: int, iterations: int = 25) -> Shared:
    """The 2^bits-value codebook of `values` (any shape) and each value's index. A tensor with at most 2^bits
    distinct values gets exactly those as its codebook (so sharing an already shared tensor is lossless)."""
    dtype, k = _index_dtype(bits), 2 ** bits
    flat = values.detach().float().reshape(-1)
    unique, inverse = torch.unique(flat, return_inverse=True)
    if unique.numel() <= k:
        return Shared(unique, inverse.reshape(values.shape).to(dtype))
    centroids = torch.linspace(float(flat.min()), float(flat.max()), k)
    for _ in range(iterations):
        index = torch.searchsorted((centroids[1:] + centroids[:-1]) / 2, flat)
        sums = torch.zeros(k).index_add_(0, index, flat)
        counts = torch.zeros(k).index_add_(0, index, torch.ones_like(flat))
        moved = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)  # an empty cluster stays put
        centroids, _ = moved.sort()
    index = torch.searchsorted((centroids[1:] + centroids[:-1]) / 2, flat)
    return Shared(centroids, index.reshape(values.shape).to(dtype))


def share_weights(model: nn.Module, names: list[str], bits: int) -> dict[str, Shared]:
    """Replace each parameter `names` of `model` by its k-means-shared values (in place). Returns the codebooks."""
    shared = {}
    with torch.no_grad():
        for name in names:
            weight = model.get_parameter(name)
            shared[name] = kmeans_1d(weight, bits)
            weight.copy_(shared[name].decode().to(weight.dtype))
    return shared


def shareable_names(loaded: LoadedModel, ffn: bool) -> list[str]:
    """State-dict names of the word-embedding table and, with `ffn`, every layer's FFN input / output weight."""
    model = loaded.model
    by_module = {id(m): n for n, m in model.named_modules()}
    names = [f"{by_module[id(model.get_input_embeddings())]}.weight"]
    if ffn:
        adapter = loaded.adapter
        for layer in range(len(adapter.layers)):
            for part in (adapter.ffn_in(layer), adapter.ffn_out(layer)):
                names.append(f"{by_module[id(part)]}.weight")
    return names


def pack(indices: torch.Tensor) -> torch.Tensor:
    """Two 4-bit indices per byte: (ceil(N / 2),) uint8, the even positions in the low nibble."""
    flat = indices.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return (flat[0::2] | (flat[1::2] << 4)).contiguous()


def unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first `n` 4-bit indices of `pack`'s bytes, (n,) uint8."""
    return torch.stack([packed & 15, packed >> 4], dim=1).reshape(-1)[:n]


def save_clustered(loaded: LoadedModel, out: str | Path, bits: int, names: list[str], **kwargs) -> Path:
    """Save the pruned `loaded` (`save_pruned`, keyword arguments passed on) with the parameters `names` stored as
    codebook + indices in clustered.safetensors. The weights file is rewritten after the folder is in place
    (os.replace of a complete file): an interruption leaves the plain dense folder, which loads too."""
    out = save_pruned(loaded, out, **kwargs)
    weights = load_file(str(out / WEIGHTS_FILE))
    shared = {name: kmeans_1d(loaded.model.get_parameter(name), bits) for name in names}
    tensors = {}
    for name, item in shared.items():
        weights.pop(name)
        tensors[f"{name}.codebook"], tensors[f"{name}.shape"] = item.codebook.contiguous(), torch.tensor(
            item.indices.shape)
        tensors[f"{name}.indices"] = pack(item.indices) if bits <= 4 else item.indices.reshape(-1).contiguous()
    for file, content in ((CLUSTERED_FILE, tensors), (WEIGHTS_FILE, weights)):
        partial = out / f".{file}.partial"
        save_file(content, str(partial), metadata={"format": "pt", "bits": str(bits)})
        os.replace(partial, out / file)
    return out


def load_clustered(folder: str | Path) -> LoadedModel:
    """Load a folder `save_clustered` wrote: the shared tensors decoded from their codebooks into the weights."""
    folder = Path(folder).expanduser()
    weights = load_file(str(folder / WEIGHTS_FILE))
    packed = load_file(str(folder / CLUSTERED_FILE))
    for key in [k for k in packed if k.endswith(".codebook")]:
        name = key[: -len(".codebook")]
        shape = torch.Size(packed[f"{name}.shape"].tolist())
        indices = packed[f"{name}.indices"]
        flat = unpack(indices, shape.numel()) if indices.dtype == torch.uint8 and indices.numel() < shape.numel() \
            else indices
        weights[name] = Shared(packed[key], flat.reshape(shape)).decode()
    return load_with_weights(folder, weights, skip=(CLUSTERED_FILE,))


def load_with_weights(folder: Path, weights: dict[str, torch.Tensor], skip: tuple[str, ...] = ()) -> LoadedModel:
    """`core.pruned.load_pruned` of `folder` with `weights` as its model.safetensors (the folder's other files
    but `skip` linked into a temporary folder); the LoadedModel names `folder` as its path and source."""
    with tempfile.TemporaryDirectory() as tmp:
        for item in folder.iterdir():
            if item.name not in (WEIGHTS_FILE, *skip):
                os.symlink(item.resolve(), Path(tmp) / item.name)
        save_file(weights, str(Path(tmp) / WEIGHTS_FILE), metadata={"format": "pt"})
        loaded = load_pruned(tmp, source=str(folder))
    return dataclasses.replace(loaded, path=folder)


def folder_bytes(folder: str | Path) -> int:
    """Bytes of the model files of an export folder (weights and codebooks; tokenizer and configs included)."""
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())
