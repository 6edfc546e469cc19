"""The processes of one training run under PyTorch's own launcher, and the device they compute on.

    torchrun --standalone --nproc_per_node=2 -m pruning train --method cofi ...

torchrun starts N copies of `python -m pruning train` with RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT set; `init` joins them into one process group: gloo
for CPU tensors and, when CUDA is present, NCCL for CUDA tensors (one backend per device type, so
the small control messages stay on the CPU). A plain `python -m pruning train` is a group of one:
`Dist().world == 1` and every collective returns its input untouched, so single-process training
runs exactly the code it ran before.

HeadLab grows no distributed system of its own: the student is wrapped in
`torch.nn.parallel.DistributedDataParallel`; everything else the ranks must agree on (gate and
multiplier gradients, loss values for logging, rank 0's decisions) goes through the few helpers of
`Dist` below.
"""

from __future__ import annotations

import os
import sys
import zlib
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

DEVICES = ("auto", "cpu", "cuda")
# Rank 0 alone evaluates (the full dev split at the end) and waits in the run queue while the other
# ranks block in a collective; they must not time out meanwhile.
TIMEOUT = timedelta(hours=2)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The torch device for `name` ("auto": CUDA when available, else CPU); with CUDA, process
    `local_rank` of a node gets GPU `local_rank`. ValueError if CUDA is asked for but absent."""
    if name not in DEVICES:
        raise ValueError(f"The 'device' parameter must be one of {', '.join(DEVICES)}. Got {name!r} instead.")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("The 'device' parameter is 'cuda' but this torch build sees no CUDA device; "
                         "use --device cpu or auto.")
    if local_rank >= torch.cuda.device_count():
        raise ValueError(f"Process {local_rank} of this node has no GPU of its own ({torch.cuda.device_count()} "
                         "visible); start at most one process per GPU.")
    return torch.device("cuda", local_rank)


@dataclass(frozen=True)
class Dist:
    """This process's place in the run: `rank` of `world` processes, `local_rank` of `local_world` on
    this node. The default is a single process (no process group)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the only process that talks to the run store, checkpoints and evaluates."""
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This rank's rows of a global batch of `n` examples: contiguous, sizes differ by at most one
        (empty when n < world)."""
        bounds = np.linspace(0, n, self.world + 1).round().astype(int)
        return slice(int(bounds[self.rank]), int(bounds[self.rank + 1]))

    def broadcast(self, obj):
        """Rank 0's `obj` (anything picklable) on every rank; other ranks' arguments are ignored."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=torch.device("cpu"))
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's `obj` (picklable), in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def flag(self, value: bool) -> bool:
        """Rank 0's boolean on every rank (cheaper than `broadcast` for the per-step stop flag)."""
        if self.world == 1:
            return value
        t = torch.tensor([int(value)])
        dist.broadcast(t, src=0)
        return bool(t.item())

    def all_mean_(self, tensors: list[torch.Tensor]) -> None:
        """Replace each tensor (same device and dtype for all) by its mean over the ranks, in place,
        with one all-reduce of their concatenation. Every rank must pass tensors of the same shapes."""
        if self.world == 1 or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for t in tensors:
            t.copy_(flat[offset: offset + t.numel()].view_as(t))
            offset += t.numel()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def wrap(self, model: nn.Module, device: torch.device, *, find_unused: bool = False) -> nn.Module:
        """`model` in DistributedDataParallel (gradients averaged over the ranks during backward), or
        `model` itself in a single process. `find_unused` for models with parameters that the forward
        pass skips (a sliced layer without heads keeps empty Q/K/V). Buffers (BERT's constant position
        ids) are synced once, at construction."""
        if self.world == 1:
            return model
        return nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                                   forward_sync_buffers=False, find_unused_parameters=find_unused)


def checksum(modules: list[nn.Module | None]) -> int:
    """CRC32 of the exact bytes of every parameter and buffer of `modules` (None skipped): equal on
    two ranks iff their replicas are bit-identical (up to CRC collisions)."""
    crc = 0
    for module in modules:
        if module is None:
            continue
        for tensor in module.state_dict().values():
            crc = zlib.crc32(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy(), crc)
    return crc


def launched() -> bool:
    """True inside a process started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init() -> Dist:
    """Join the process group torchrun set up (env://), or return a single-process `Dist` when this
    process was not started by torchrun (or with one process)."""
    if not launched():
        return Dist()
    env = {k: int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"]))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            if env["LOCAL_RANK"] < torch.cuda.device_count():
                torch.cuda.set_device(env["LOCAL_RANK"])
            backend = "cpu:gloo,cuda:nccl"
        else:
            backend = "gloo"
        dist.init_process_group(backend=backend, timeout=TIMEOUT)
    return Dist(rank=env["RANK"], world=env["WORLD_SIZE"], local_rank=env["LOCAL_RANK"], local_world=local_world)


def close() -> None:
    """Leave the process group (if any)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def launcher_pid() -> int:
    """The pid the run store should watch for liveness: the torchrun agent (the workers' parent, alive
    until every worker has ended) under torchrun, this process otherwise."""
    return os.getppid() if launched() else os.getpid()


def torchrun_command(args: list[str], processes: int, *, executable: bool = False) -> list[str]:
    """The command running `python -m <args>` in `processes` processes on this machine:
    `torchrun --standalone --nproc_per_node=N -m <args>` (`executable`: this interpreter's
    `python -m torch.distributed.run` instead of `torchrun`, for starting it from Python).
    `--standalone` picks a free rendezvous port, so several runs never collide. On a cluster, replace
    it by torchrun's `--nnodes` / `--rdzv-endpoint` options."""
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise ValueError(f"The 'processes' parameter must be an integer >= 1. Got {processes!r} instead.")
    launcher = [sys.executable, "-m", "torch.distributed.run"] if executable else ["torchrun"]
    return [*launcher, "--standalone", f"--nproc_per_node={processes}", "-m", *args]
