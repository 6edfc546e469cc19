"""A half-loaded model is never run: weights are checked against the config before anything is built."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from core.models import ModelError, load_model
from core.pruned import PRUNING_FILE
from core.weights import check_memory, meta_model
from pruning.export import save_pruned
from pruning.gate_state import GateState
from pruning.surgery import prune

ROOT = Path(__file__).resolve().parent.parent


def _set_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_config_with_more_layers_than_the_weights_is_refused(tiny_copy):
    _set_config(tiny_copy, num_hidden_layers=4)  # the weights hold 2 layers
    with pytest.raises(ModelError, match=r"missing \d+ tensor\(s\) .*encoder\.layer\.2\."):
        load_model(str(tiny_copy))


def test_unexpected_and_reshaped_weights_are_named(tiny_copy):
    weights = tiny_copy / "model.safetensors"
    tensors = load_file(str(weights))
    tensors["bert.encoder.layer.0.extra.weight"] = torch.zeros(3)
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"no place for .*layer\.0\.extra\.weight"):
        load_model(str(tiny_copy))
    del tensors["bert.encoder.layer.0.extra.weight"]
    tensors["bert.encoder.layer.1.output.dense.weight"] = torch.zeros(32, 65)
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"other shape .*layer\.1\.output\.dense\.weight is \(32, 65\)"):
        load_model(str(tiny_copy))


def test_missing_classifier_only_is_a_note_not_an_error(tiny_copy):
    weights = tiny_copy / "model.safetensors"
    tensors = {k: v for k, v in load_file(str(weights)).items() if not k.startswith("classifier.")}
    save_file(tensors, str(weights), metadata={"format": "pt"})
    loaded = load_model(str(tiny_copy))
    assert not loaded.has_classifier
    assert any("no classification head" in note for note in loaded.notes)


def test_memory_check_uses_the_implied_size():
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    arch = meta_model(lambda: BertForSequenceClassification(config))
    parameters = sum(p.numel() for p in arch.parameters())
    needed = check_memory(arch, Path("x"), available=10**12)
    assert needed == 4 * parameters * 2 + 512 * 2**20
    with pytest.raises(ValueError, match=r"needs about .* GiB to load, but only 0\.5 GiB"):
        check_memory(arch, Path("x"), available=2**29)


def test_huge_config_over_a_small_pruned_folder_is_refused_before_building(tiny_dir, tmp_path):
    loaded = load_model(str(tiny_dir))
    out = save_pruned(prune(loaded, GateState.from_closed_heads(loaded, [(0, 1)])), tmp_path / "pruned")
    _set_config(out, num_hidden_layers=48, hidden_size=4096, num_attention_heads=32, intermediate_size=16384)
    # VmHWM: this process's own peak resident memory (getrusage's ru_maxrss keeps the parent's peak
    # across fork + exec on Linux, i.e. the test runner's gigabytes)
    code = ("import re\nfrom pathlib import Path\nfrom core.models import load_model, ModelError\n"
            f"try:\n    load_model({str(out)!r})\nexcept ModelError as exc:\n    print(exc)\n"
            "print(re.search(r'VmHWM:\\s+(\\d+)', Path('/proc/self/status').read_text()).group(1))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    message, peak_kb = done.stdout.strip().splitlines()
    # pruning.json still describes 2 layers: refused while checking it against the (meta-built) config
    assert f"{PRUNING_FILE} does not fit" in message
    assert int(peak_kb) < 2_000_000  # KiB: the interpreter, torch and transformers (~0.4 GB), not the 40+ GB implied


def test_huge_config_over_small_weights_is_refused_without_building(tiny_copy):
    _set_config(tiny_copy, num_hidden_layers=48, hidden_size=4096, num_attention_heads=32, intermediate_size=16384)
    # ~10 G parameters: more than this machine's memory, or (on a bigger one) tensors the file lacks
    with pytest.raises(ModelError, match=r"needs about \d+\.\d GiB to load|missing \d+ tensor"):
        load_model(str(tiny_copy))


def test_cli_prints_one_line_for_mismatched_weights(tiny_copy):
    _set_config(tiny_copy, num_hidden_layers=3)
    done = subprocess.run([sys.executable, "-m", "core", "evaluate", "--model", str(tiny_copy), "--data", "default"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "encoder.layer.2." in lines[0]


def test_onnx_of_a_model_without_heads_keeps_both_inputs_and_runs(tiny_dir, tmp_path):
    from pruning.export import export_onnx, onnx_max_diff, onnx_session

    loaded = load_model(str(tiny_dir))
    every_head = [(layer, head) for layer in range(2) for head in range(4)]
    pruned = prune(loaded, GateState.from_closed_heads(loaded, every_head))
    path = export_onnx(pruned, tmp_path / "m.onnx")
    assert [i.name for i in onnx_session(path).get_inputs()] == ["input_ids", "attention_mask"]
    assert onnx_max_diff(pruned, path) <= 1e-4  # runs with (input_ids, attention_mask) fed, as every export
