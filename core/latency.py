"""The one honest timer: warm-up, median of repeats, batch 1 and 32, threads and device recorded.

Models are timed on the device their weights are on (the batch is moved there); on CUDA every
timed call is bracketed by `torch.cuda.synchronize`, so a time covers the kernels, not just their
launch. Absolute times drift 20-40% between processes on small CPU machines; compare models measured
in the same process (see `compare`), never against a number from another run.

Every timed batch is built by `make_batch` from texts of typical length (`typical_texts`): those whose
token counts are closest to the data's median, so one long outlier (say, in the first row) never
sets the padded length of the batch that is timed.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from core.batching import collate, encode

LENGTH_SAMPLE = 2000  # texts, evenly spaced over the data (not its first rows), whose lengths define "typical"


@dataclass
class Latency:
    """Forward-pass time of one batch: median and spread over `repeats`, in seconds."""

    batch_size: int
    seq_len: int  # padded tokens per example
    median_s: float
    p10_s: float
    p90_s: float
    repeats: int
    threads: int  # torch intra-op threads of the process that timed it
    device: str  # where the model ran: "cpu", "cuda:0", ...

    def as_dict(self) -> dict:
        return asdict(self)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _on(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _sync(device: torch.device) -> None:
    """Wait for the queued kernels on a CUDA device (CPU calls are synchronous already)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _summarise(times: list[float], batch: dict[str, torch.Tensor], model: torch.nn.Module) -> Latency:
    arr = np.array(times)
    return Latency(
        batch_size=int(batch["input_ids"].shape[0]),
        seq_len=int(batch["input_ids"].shape[1]),
        median_s=float(np.median(arr)),
        p10_s=float(np.percentile(arr, 10)),
        p90_s=float(np.percentile(arr, 90)),
        repeats=len(times),
        threads=torch.get_num_threads(),
        device=str(_device(model)),
    )


def length_sample(texts: list[str]) -> list[str]:
    """At most `LENGTH_SAMPLE` of `texts`, evenly spaced over all of them, in their order."""
    if len(texts) <= LENGTH_SAMPLE:
        return list(texts)
    return [texts[i] for i in np.linspace(0, len(texts) - 1, LENGTH_SAMPLE).round().astype(int)]


def median_length(tokenizer, texts: list[str], max_length: int = 128) -> int:
    """Median token count (special tokens included, cut at `max_length`) of `length_sample(texts)`."""
    return int(np.median([len(ids) for ids in encode(tokenizer, length_sample(texts), max_length).ids]))


def typical_texts(tokenizer, texts: list[str], n: int, max_length: int = 128) -> list[str]:
    """The `n` texts of `length_sample(texts)` (all of them if fewer) whose token counts (special tokens
    included, cut at `max_length`) are closest to their median, nearest first (ties: earlier first). A
    batch of them pads to about the median length: its time is that of a typical batch."""
    if not texts:
        raise ValueError("Latency needs at least one text.")
    sample = length_sample(texts)
    lengths = np.array([len(ids) for ids in encode(tokenizer, sample, max_length).ids])
    order = np.argsort(np.abs(lengths - np.median(lengths)), kind="stable")
    return [sample[i] for i in order[:n]]


def make_batch(tokenizer, texts: list[str], batch_size: int, max_length: int = 128) -> dict[str, torch.Tensor]:
    """A batch of `batch_size` texts of typical length (`typical_texts`; cycled if fewer), padded to
    its longest: input_ids and attention_mask, (batch_size, tokens)."""
    typical = typical_texts(tokenizer, texts, batch_size, max_length)
    picked = [typical[i % len(typical)] for i in range(batch_size)]
    return collate(encode(tokenizer, picked, max_length).ids, tokenizer.pad_token_id)


@torch.inference_mode()
def time_forward(model, batch: dict[str, torch.Tensor], *, warmup: int = 3, repeats: int = 20,
                 budget_s: float = 3.0) -> Latency:
    """Time `model(**batch)`: `warmup` untimed calls, then up to `repeats` timed ones within `budget_s`."""
    model.eval()
    device = _device(model)
    batch = _on(batch, device)
    for _ in range(warmup):
        model(**batch)
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < repeats and (len(times) < 5 or time.perf_counter() < deadline):
        _sync(device)
        start = time.perf_counter()
        model(**batch)
        _sync(device)
        times.append(time.perf_counter() - start)
    return _summarise(times, batch, model)


def measure(model, tokenizer, texts: list[str], batch_sizes: tuple[int, ...] = (1, 32), max_length: int = 128,
            **kwargs) -> dict[int, Latency]:
    """Latency at each batch size on typical `texts` (`make_batch`): {batch_size: Latency}; `kwargs` go to
    `time_forward`."""
    return {b: time_forward(model, make_batch(tokenizer, texts, b, max_length), **kwargs) for b in batch_sizes}


def compare(models: dict[str, torch.nn.Module], batch: dict[str, torch.Tensor], *, rounds: int = 5,
            repeats_per_round: int = 5, warmup: bool = True) -> dict[str, Latency]:
    """Interleave models A B A B ... on the same batch so machine drift hits all of them alike.

    `warmup=False` skips the untimed first call of each model (for models that just ran).
    """
    times: dict[str, list[float]] = {name: [] for name in models}
    devices = {name: _device(m) for name, m in models.items()}
    batches = {name: _on(batch, device) for name, device in devices.items()}
    with torch.inference_mode():
        for name, m in models.items():
            m.eval()
            if warmup:
                m(**batches[name])
        for _ in range(rounds):
            for name, m in models.items():
                for _ in range(repeats_per_round):
                    _sync(devices[name])
                    start = time.perf_counter()
                    m(**batches[name])
                    _sync(devices[name])
                    times[name].append(time.perf_counter() - start)
    return {name: _summarise(t, batch, models[name]) for name, t in times.items()}
