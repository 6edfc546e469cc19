"""Loading models: real folders load; every bad folder gives one clear ModelError line."""

from __future__ import annotations

import json

import pytest

from core.models import ModelError, ModelNotPrepared, load_model, resolve
from tests.conftest import make_tiny


def test_tiny_folder_loads_with_labels_and_adapter(tiny_dir):
    loaded = load_model(str(tiny_dir))
    assert loaded.label_names == ["neg", "pos"]
    assert loaded.has_classifier
    assert loaded.model.config._attn_implementation == "eager"
    arch = loaded.architecture()
    assert (arch.layers, arch.heads, arch.hidden, arch.ffn) == (2, 4, 32, 64)
    assert arch.parameters == sum(p.numel() for p in loaded.model.parameters())
    assert loaded.adapter.head_dim(0) == 8
    assert len(loaded.fingerprint) == 12
    assert load_model(str(tiny_dir)).fingerprint == loaded.fingerprint


def test_encoder_without_head_is_flagged(tmp_path):
    folder = make_tiny(tmp_path / "enc", labels=None)
    loaded = load_model(str(folder), label_names=["a", "b", "c"])
    assert not loaded.has_classifier
    assert loaded.label_names == ["a", "b", "c"]
    assert "no classification head" in loaded.notes[0]


def test_missing_path(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(str(tmp_path / "nope"))


def test_file_instead_of_folder(tmp_path):
    f = tmp_path / "model.txt"
    f.write_text("hello")
    with pytest.raises(ModelError, match="not a folder"):
        load_model(str(f))


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        load_model(str(tmp_path))


def test_unsupported_architecture_names_supported_ones(tiny_copy):
    cfg = json.loads((tiny_copy / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (tiny_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="Unsupported architecture 'gpt2'.*bert, roberta, electra"):
        load_model(str(tiny_copy))


def test_corrupt_safetensors(tiny_copy):
    weights = tiny_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    with pytest.raises(ModelError, match="corrupt or unreadable"):
        load_model(str(tiny_copy))


def test_garbage_safetensors(tiny_copy):
    (tiny_copy / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(ModelError, match="corrupt or unreadable"):
        load_model(str(tiny_copy))


def test_missing_tokenizer(tiny_copy):
    for name in ("tokenizer.json", "vocab.txt"):
        (tiny_copy / name).unlink(missing_ok=True)
    with pytest.raises(ModelError, match="no tokenizer"):
        load_model(str(tiny_copy))


def test_pickle_weights_are_refused(tiny_copy):
    (tiny_copy / "model.safetensors").rename(tiny_copy / "pytorch_model.bin")
    with pytest.raises(ModelError, match="safetensors only"):
        load_model(str(tiny_copy))


def test_unprepared_builtin_says_how(monkeypatch, tmp_path):
    monkeypatch.setenv("HEADLAB_HOME", str(tmp_path))
    with pytest.raises(ModelNotPrepared, match="python -m core prepare default"):
        resolve("default")
