"""The one honest timer: warm-up, median of repeats, batch 1 and 32, threads and device recorded.

For decoders also the prefill (one forward pass over a prompt that builds the KV cache and yields the
first next-token logits) at batch 1 and 8 on rows of exactly `PREFILL_TOKENS` tokens of real text
(`text_batch`, no padding), and decoding speed with the KV cache (`decode_speed`: greedy, a fixed number
of new tokens, only the decoding steps timed).

Models are timed on the device their weights are on (the batch is moved there); on CUDA every
timed call is bracketed by `torch.cuda.synchronize`, so a time covers the kernels, not just their
launch. Absolute times drift 20-40% between processes on small CPU machines; compare models measured
in the same process (see `compare`), never against a number from another run.

Every timed batch is built by `make_batch` from texts of typical length (`typical_texts`): those whose
token counts are closest to the data's median, so one long outlier (say, in the first row) never
sets the padded length of the batch that is timed.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from core.batching import collate, encode
from core.cpu_queue import pauses_seen
from core.generation import greedy_decode

LENGTH_SAMPLE = 2000  # texts, evenly spaced over the data (not its first rows), whose lengths define "typical"
PREFILL_TOKENS = 64  # tokens per row of a timed prefill and of the prompt a decode timing continues
PREFILL_BATCHES = (1, 8)  # batch sizes of the decoder prefill timings
DECODE_TOKENS = 32  # new tokens per decode timing (the first, from the prefill, not timed)
# Untimed calls at batch 1 after the timer switches models (`compare(settle=...)`): a small model's weights,
# evicted from the CPU caches by the dense model's calls, take ~10 calls to be back. Measured on 2 cores
# (one thread, the default at ~90% sparsity, 26 tokens): ONNX Runtime 0.95, 0.66, 0.62, 0.58 ... 0.45 ms
# at the 1st, 2nd, 3rd, 4th ... 10th call after 5 dense ones, 0.44 ms from then on; torch 2.25 -> 1.55 ms
# by the 9th. At batch 32 the first call is already within 2% of the rest (each call reads the weights 32x).
# A decoder's weights (hundreds of MB) never fit in the caches: `pruning.live.time_models` does not settle them.
SETTLE_CALLS = 10


def settle_calls(batch_size: int) -> int:
    """`compare(settle=...)` for a batch of `batch_size` rows: `SETTLE_CALLS` at batch 1, else 0."""
    return SETTLE_CALLS if batch_size == 1 else 0


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


def threads_leaving_a_core() -> int:
    """Torch threads for work that shares the machine with the app: one fewer than the cores (at least 1).

    Background processes use it, and so do the timings inside the app's server: its own threads (the
    event loop, the pages' polls) and the browser keep running while a page times a model, and with every
    core in torch's pool its workers spin-wait for the core they share. Measured in the server on 2 cores
    right after the first pages opened: the default's batch 1 took 41-68 ms on 2 threads, 19.9 ms on 1."""
    return max(1, (os.cpu_count() or 2) - 1)


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
def _timed(call, device: torch.device) -> float:
    """Seconds one `call()` takes. A call during which this process was paused (a SIGCONT arrived: the
    CPU queue froze it for interactive work, `core.cpu_queue.pauses_seen`) is made again, so a timing
    never includes a pause."""
    while True:
        pauses = pauses_seen()
        _sync(device)
        start = time.perf_counter()
        call()
        _sync(device)
        elapsed = time.perf_counter() - start
        if pauses_seen() == pauses:
            return elapsed


def time_forward(model, batch: dict[str, torch.Tensor], *, warmup: int = 3, repeats: int = 20,
                 budget_s: float = 3.0, options: dict | None = None) -> Latency:
    """Time `model(**batch, **options)`: `warmup` untimed calls, then up to `repeats` timed ones within
    `budget_s` (at least 5). `options`: extra keyword arguments of each call, e.g. a prefill's
    {"use_cache": True, "logits_to_keep": 1}."""
    model.eval()
    device = _device(model)
    batch = _on(batch, device)
    options = options or {}
    for _ in range(warmup):
        model(**batch, **options)
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < repeats and (len(times) < 5 or time.perf_counter() < deadline):
        times.append(_timed(lambda: model(**batch, **options), device))
    return _summarise(times, batch, model)


def measure(model, tokenizer, texts: list[str], batch_sizes: tuple[int, ...] = (1, 32), max_length: int = 128,
            **kwargs) -> dict[int, Latency]:
    """Latency at each batch size on typical `texts` (`make_batch`): {batch_size: Latency}; `kwargs` go to
    `time_forward`."""
    return {b: time_forward(model, make_batch(tokenizer, texts, b, max_length), **kwargs) for b in batch_sizes}


def compare(models: dict[str, torch.nn.Module], batch: dict[str, torch.Tensor], *, rounds: int = 5,
            repeats_per_round: int = 5, warmup: bool = True, settle: int = 0) -> dict[str, Latency]:
    """Interleave models A B A B ... on the same batch so machine drift hits all of them alike.

    `warmup=False` skips the untimed first call of each model (for models that just ran). `settle`:
    untimed calls of a model before each of its rounds when there is more than one model (see
    `SETTLE_CALLS`), so every timed call is one of a model that runs on its own.
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
                for _ in range(settle if len(models) > 1 else 0):
                    m(**batches[name])
                for _ in range(repeats_per_round):
                    times[name].append(_timed(lambda m=m, name=name: m(**batches[name]), devices[name]))
    return {name: _summarise(t, batch, models[name]) for name, t in times.items()}


# ----------------------------------------------------------------------------- decoders
@dataclass
class DecodeSpeed:
    """Greedy decoding with the KV cache at batch 1: median over `repeats` of the decoding steps alone."""

    prompt_tokens: int  # tokens of the prompt each repeat prefills (untimed)
    new_tokens: int  # single-token steps timed per repeat (after the prefill's first token)
    median_s: float  # seconds of those steps, median over repeats
    tokens_per_s: float  # new_tokens / median_s
    repeats: int
    threads: int
    device: str

    def as_dict(self) -> dict:
        return asdict(self)


def text_batch(tokenizer, texts: list[str], batch_size: int, tokens: int = PREFILL_TOKENS) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask (batch_size, tokens): consecutive `tokens`-token pieces of the token
    stream of `texts` (each tokenized without special tokens, one after the other; cycled if short), so
    every row is real text of exactly the same length and nothing is padded."""
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        if len(stream) >= batch_size * tokens:
            break
    if not stream:
        raise ValueError("A prefill timing needs text with at least one token.")
    stream = (stream * (batch_size * tokens // len(stream) + 1))[: batch_size * tokens]
    ids = torch.tensor(stream, dtype=torch.long).view(batch_size, tokens)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def measure_prefill(lm, tokenizer, texts: list[str], batch_sizes: tuple[int, ...] = PREFILL_BATCHES,
                    tokens: int = PREFILL_TOKENS, warmup: int = 1, **kwargs) -> dict[int, Latency]:
    """Prefill latency of causal LM `lm` at each batch size on rows of `tokens` tokens of `texts`
    (`text_batch`): one forward pass that fills the KV cache and computes the last position's logits.
    {batch_size: Latency}; `warmup` and `kwargs` go to `time_forward` (one warm-up call: a decoder's
    prefill is long enough to need no more)."""
    prefill = {"use_cache": True, "logits_to_keep": 1}
    return {b: time_forward(lm, text_batch(tokenizer, texts, b, tokens), warmup=warmup, options=prefill, **kwargs)
            for b in batch_sizes}


def decode_speed(lm, tokenizer, texts: list[str], *, prompt_tokens: int = PREFILL_TOKENS,
                 new_tokens: int = DECODE_TOKENS, repeats: int = 3) -> DecodeSpeed:
    """Tokens per second of greedy decoding with the KV cache (`core.generation.greedy_decode`) after a
    prompt of `prompt_tokens` tokens of `texts`: one untimed warm-up, then `repeats` runs of `new_tokens`
    timed single-token steps each (the prefill of each run is not timed)."""
    ids = text_batch(tokenizer, texts, 1, prompt_tokens)["input_ids"]
    lm.eval()
    greedy_decode(lm, ids, min(new_tokens, 4) + 1)
    times = [greedy_decode(lm, ids, new_tokens + 1)[1] for _ in range(repeats)]
    median = float(np.median(times))
    return DecodeSpeed(prompt_tokens=prompt_tokens, new_tokens=new_tokens, median_s=median,
                       tokens_per_s=new_tokens / median, repeats=repeats, threads=torch.get_num_threads(),
                       device=str(_device(lm)))
