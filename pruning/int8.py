"""Dynamic int8 quantisation of an exported model, measured next to fp32.

Two paths, both *dynamic* (weights stored as int8, activations quantised on the fly per batch; nothing is
calibrated):
- ONNX: onnxruntime's `quantize_dynamic` turns `model.onnx` into `model.int8.onnx`: MatMul weights signed
  (QInt8), one scale per output channel, in 7 bits (`reduce_range`, |w| <= 64). ONNX Runtime's U8S8 kernels on
  x86 CPUs without VNNI multiply-add pairs of u8 activations and s8 weights into a saturating int16
  (VPMADDUBSW; its quantization guide names the risk and these remedies): a CI machine moved the tiny test
  model's logits by 0.10 with full 8-bit per-tensor weights where VNNI machines moved them by 0.011. With 7
  bits a pair sums to at most 2 * 255 * 64 < 2^15, on every CPU; per-channel scales win back the precision.
  On the default model with half its FFN units (1,275 dev rows): agreement with fp32 0.985 and largest logit
  change 0.096 (8-bit per tensor: 0.973 / 0.198), at the same speed (U8U8 weights, which also never
  saturate, lost half the batch-32 gain here);
- torch: `torch.ao.quantization.quantize_dynamic` replaces every `nn.Linear` by a dynamically quantised one
  (in memory; torch 2.13 marks the API deprecated in favour of torchao, which is not installed, so the
  warning is silenced here). ONNX Runtime also quantises the embedding tables (its Gather weights); torch
  keeps embeddings and every LayerNorm fp32.

`compare` measures accuracy, agreement with the fp32 predictions, the largest logit difference, latency at
batch 1 and the larger batch (interleaved A B A B so machine drift hits every variant alike) and size on
disk, for fp32 / int8 in torch and (when the folder has them) in ONNX Runtime. Pruning and quantisation
compose: the model measured is whatever was exported (pruned or not).
"""

from __future__ import annotations

import copy
import io
import logging
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from core.batching import collate, encode, sorted_batches
from core.data import TextDataset
from core.latency import _timed as timed_call
from core.latency import make_batch
from core.loaded import LoadedModel
from pruning.onnx_runtime import ONNX_FILE, onnx_session

INT8_ONNX_FILE = "model.int8.onnx"
BATCH = 64  # evaluation batch size
MAX_LENGTH = 128

Logits = Callable[[dict[str, torch.Tensor]], np.ndarray]  # a padded batch (B, T) -> logits (B, classes)


def quantize_onnx(fp32_path: str | Path, int8_path: str | Path) -> Path:
    """Write the dynamically int8-quantised copy of the ONNX model at `fp32_path` to `int8_path`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.disable(logging.WARNING)  # its root-logger advice to run shape pre-processing (static quantisation's)
    try:
        quantize_dynamic(str(fp32_path), str(int8_path), weight_type=QuantType.QInt8, per_channel=True,
                         reduce_range=True)
    finally:
        logging.disable(logging.NOTSET)
    return Path(int8_path)


def quantize_torch(model: nn.Module) -> nn.Module:
    """A copy of `model` with every `nn.Linear` dynamically quantised to int8 (CPU only; `model` unchanged)."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecation notice (torchao is the successor; not a dependency)
        return quantize_dynamic(copy.deepcopy(model).cpu().eval(), {nn.Linear}, dtype=torch.qint8)


def torch_size_bytes(model: nn.Module) -> int:
    """Bytes of `model`'s state dict as torch.save writes it (int8 packed weights included)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def torch_logits(model: nn.Module) -> Logits:
    def run(batch: dict[str, torch.Tensor]) -> np.ndarray:
        with torch.inference_mode():
            return model(**batch).logits.float().numpy()
    return run


def onnx_logits(path: str | Path) -> Logits:
    session = onnx_session(path)

    def run(batch: dict[str, torch.Tensor]) -> np.ndarray:
        return session.run(["logits"], {"input_ids": batch["input_ids"].numpy(),
                                        "attention_mask": batch["attention_mask"].numpy()})[0]
    return run


def predict(run: Logits, tokenizer, texts: list[str]) -> np.ndarray:
    """Logits (N, classes) of `run` on `texts` in input order (batches of similar length, right padding)."""
    enc = encode(tokenizer, texts, MAX_LENGTH)
    out: np.ndarray | None = None
    for idx in sorted_batches(enc, BATCH):
        logits = run(collate([enc.ids[i] for i in idx], tokenizer.pad_token_id))
        if out is None:
            out = np.zeros((len(texts), logits.shape[1]), dtype=np.float32)
        out[idx] = logits
    return out


def interleaved_ms(runs: dict[str, Logits], batch: dict[str, torch.Tensor], rounds: int, repeats: int) -> dict[str,
                                                                                                               float]:
    """Median milliseconds of one call of each run on `batch`, timed A B A B ... after one untimed call each (a
    call during which the CPU queue paused this process is timed again: `core.latency`'s rule)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run(batch)
    for _ in range(rounds):
        for name, run in runs.items():
            for _ in range(repeats):
                times[name].append(timed_call(lambda run=run: run(batch), torch.device("cpu")))
    return {name: 1000 * float(np.median(t)) for name, t in times.items()}


@dataclass
class Variant:
    """One model's figures: accuracy on the data, agreement (share of predictions equal to fp32's on the same
    runtime), largest |logit - fp32 logit|, latency medians (ms) per batch size, size on disk (bytes)."""

    name: str
    accuracy: float
    agreement: float
    max_logit_diff: float
    latency_ms: dict[int, float]
    size_bytes: int


@dataclass
class Int8Report:
    variants: list[Variant]
    examples: int
    data: str
    threads: int

    def as_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """The variants as a text table (fp32 first on each runtime)."""
        batches = sorted(self.variants[0].latency_ms)
        head = ["", "accuracy", "agrees w/ fp32", "max |dlogit|", *[f"ms b{b}" for b in batches], "size MB"]
        rows = [[v.name, f"{v.accuracy:.4f}", f"{v.agreement:.4f}", f"{v.max_logit_diff:.4f}",
                 *[f"{v.latency_ms[b]:.2f}" for b in batches], f"{v.size_bytes / 1e6:.2f}"] for v in self.variants]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                 for r in [head, *rows]]
        return "\n".join(lines) + (f"\nint8 = dynamic quantisation (torch: linear layers; ONNX: also embeddings); "
                                   f"accuracy on {self.examples} examples of {self.data}; latency median, interleaved, "
                                   f"{self.threads} threads.")


def compare(loaded: LoadedModel, data: TextDataset, folder: str | Path | None = None, *,
            rounds: dict[int, tuple[int, int]] | None = None) -> Int8Report:
    """fp32 vs int8 of `loaded` on `data`: torch (int8 by `quantize_torch`) and, when `folder` holds model.onnx
    and model.int8.onnx, ONNX Runtime. `rounds`: {batch size: (rounds, repeats)} of the interleaved timing."""
    rounds = rounds or ({1: (3, 3), 8: (2, 1)} if loaded.is_decoder else {1: (3, 3), 32: (2, 1)})
    fp32 = loaded.model.cpu().eval()
    int8 = quantize_torch(fp32)
    runs = {"torch fp32": torch_logits(fp32), "torch int8": torch_logits(int8)}
    sizes = {"torch fp32": torch_size_bytes(fp32), "torch int8": torch_size_bytes(int8)}
    folder = Path(folder) if folder is not None else None
    if folder is not None and (folder / ONNX_FILE).is_file() and (folder / INT8_ONNX_FILE).is_file():
        for name, file in (("onnx fp32", ONNX_FILE), ("onnx int8", INT8_ONNX_FILE)):
            runs[name] = onnx_logits(folder / file)
            sizes[name] = (folder / file).stat().st_size
    logits = {name: predict(run, loaded.tokenizer, data.texts) for name, run in runs.items()}
    latency: dict[str, dict[int, float]] = {name: {} for name in runs}
    for b, (r, k) in rounds.items():
        for name, ms in interleaved_ms(runs, make_batch(loaded.tokenizer, data.texts, b), r, k).items():
            latency[name][b] = ms
    labels = np.asarray(data.labels)
    variants = []
    for name, out in logits.items():
        ref = logits[name.replace("int8", "fp32")]
        variants.append(Variant(name, float(np.mean(out.argmax(1) == labels)),
                                float(np.mean(out.argmax(1) == ref.argmax(1))), float(np.abs(out - ref).max()),
                                latency[name], sizes[name]))
    return Int8Report(variants, len(data), data.name, torch.get_num_threads())
