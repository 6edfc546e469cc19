"""int8 export, the `cluster` method (vocabulary pruning + k-means sharing), `peer` distillation and `flop`, on tiny
models: each one's defining invariant."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from core.data.dataset import TextDataset
from core.models import load_model
from pruning.__main__ import main
from pruning.export import ONNX_FILE, save_pruned
from pruning.gate_state import GateState
from pruning.int8 import INT8_ONNX_FILE, compare, onnx_logits, predict, quantize_torch, torch_logits
from pruning.surgery import prune

TEXTS = ["a great film, warm and funny", "an awful, boring movie", "meh", "not bad at all, really",
         "the plot drags on and on", "one of the best this year", "i want those two hours back", "fine"]
# int8's stated accuracy band on the tiny model: |int8 - fp32 logit| <= 3% of the fp32 logits' range, and at least
# 7 of the 8 predictions equal fp32's
BAND, AGREE = 0.03, 7 / 8


@pytest.fixture(scope="module")
def spread(tiny_dir):
    """The tiny classifier, its classifier scaled so the logits spread over a few units (random init gives
    ~0.05, where any rounding flips an argmax), one head pruned."""
    loaded = load_model(str(tiny_dir))
    with torch.no_grad():
        loaded.model.classifier.weight.mul_(60)
    return prune(loaded, GateState.from_closed_heads(loaded, [(0, 1)]))


@pytest.fixture(scope="module")
def int8_folder(spread, tmp_path_factory):
    return save_pruned(spread, tmp_path_factory.mktemp("int8") / "pruned", int8=True)


def _within_band(out: np.ndarray, ref: np.ndarray) -> None:
    assert np.abs(out - ref).max() <= BAND * (ref.max() - ref.min())
    assert np.mean(out.argmax(1) == ref.argmax(1)) >= AGREE


def test_int8_onnx_runs_in_onnxruntime_within_the_band(spread, int8_folder):
    fp32 = predict(onnx_logits(int8_folder / ONNX_FILE), spread.tokenizer, TEXTS)
    int8 = predict(onnx_logits(int8_folder / INT8_ONNX_FILE), spread.tokenizer, TEXTS)
    ref = predict(torch_logits(spread.model), spread.tokenizer, TEXTS)
    assert np.abs(fp32 - ref).max() <= 1e-4  # the fp32 export is torch's model
    assert not np.array_equal(int8, fp32)  # quantised: not the same graph
    _within_band(int8, fp32)
    assert (int8_folder / INT8_ONNX_FILE).stat().st_size < 0.5 * (int8_folder / ONNX_FILE).stat().st_size


def test_torch_int8_replaces_every_linear_and_stays_in_the_band(spread):
    int8 = quantize_torch(spread.model)
    assert not any(type(m) is nn.Linear for m in int8.modules())
    assert any(type(m) is nn.Linear for m in spread.model.modules())  # the original is unchanged
    _within_band(predict(torch_logits(int8), spread.tokenizer, TEXTS),
                 predict(torch_logits(spread.model), spread.tokenizer, TEXTS))


def test_compare_reports_all_four_against_fp32(spread, int8_folder):
    data = TextDataset(TEXTS, [0, 1] * 4, ["neg", "pos"], "toy")
    report = compare(spread, data, int8_folder, rounds={1: (1, 1), 4: (1, 1)})
    by_name = {v.name: v for v in report.variants}
    assert list(by_name) == ["torch fp32", "torch int8", "onnx fp32", "onnx int8"]
    ref = predict(torch_logits(spread.model), spread.tokenizer, TEXTS)
    assert by_name["torch fp32"].accuracy == np.mean(ref.argmax(1) == np.array(data.labels))
    assert by_name["torch fp32"].max_logit_diff == 0 and by_name["onnx fp32"].agreement == 1
    assert by_name["onnx int8"].size_bytes == (int8_folder / INT8_ONNX_FILE).stat().st_size
    assert all(set(v.latency_ms) == {1, 4} and min(v.latency_ms.values()) > 0 for v in report.variants)
    assert "onnx int8" in report.table()


def test_apply_int8_cli(tiny_dir, reviews_csv, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["apply", "--threads", "1", "--model", str(tiny_dir), "--prune-heads", "0:0", "--data",
                 str(reviews_csv), "--limit", "10", "--out", str(out), "--int8", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert (out / ONNX_FILE).is_file() and (out / INT8_ONNX_FILE).is_file()
    names = [v["name"] for v in record["int8"]["variants"]]
    assert names == ["torch fp32", "torch int8", "onnx fp32", "onnx int8"]
    assert record["int8"]["examples"] == 4  # the dev split: 10% of the CSV's 40 rows
