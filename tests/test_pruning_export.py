"""Pruned folders: save -> load round trip, strict checks on load, refusal to overwrite, ONNX export."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from core.models import ModelError, builtin_dir, load_model
from core.pruned import PRUNING_FILE, load_pruned
from core.structure import pruning_info
from pruning.export import (
    ONNX_FILE,
    ExportExists,
    check_name,
    export_onnx,
    onnx_max_diff,
    save_pruned,
)
from pruning.gate_state import GateState
from pruning.surgery import prune

TEXTS = ["a great film, warm and funny", "an awful, boring movie", "meh"]


@pytest.fixture(scope="module")
def pruned(tiny_dir):
    """Tiny model with soft head gates, a layer without attention, an FFN without units, 3/4 hidden dims."""
    loaded = load_model(str(tiny_dir))
    state = (GateState.from_closed_heads(loaded, [(1, h) for h in range(4)] + [(0, 2)])
             .with_hidden_keep(loaded.adapter, 0.75).with_ffn_keep(loaded.adapter, 0.5))
    state = state.replace(ffn=torch.tensor([1.0, 0.0]), head=state.head * 0.8)
    return prune(loaded, state)


@pytest.fixture(scope="module")
def saved(pruned, tmp_path_factory):
    return save_pruned(pruned, tmp_path_factory.mktemp("export") / "pruned", onnx=True)


def run(loaded, texts=TEXTS):
    batch = loaded.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return loaded.model(**batch).logits


def test_folder_contents(saved):
    names = {p.name for p in saved.iterdir()}
    assert {"config.json", "model.safetensors", PRUNING_FILE, ONNX_FILE, "tokenizer.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    assert not any(p.name.startswith(".") for p in saved.parent.iterdir())  # no temporary folder left
    record = json.loads((saved / PRUNING_FILE).read_text())
    assert record["kept_heads"] == [[0, 1, 3], []]
    assert record["skipped_attention"] == [1] and record["skipped_ffn"] == [1]
    assert len(record["kept_units"][0]) == 32 and record["kept_units"][1] == []
    assert len(record["kept_hidden"]) == 24
    assert GateState.from_dict(record["gate_state"]).head[0, 0] == pytest.approx(0.8)
    assert json.loads((saved / "config.json").read_text())["hidden_size"] == 32  # the original config


def test_round_trip_gives_the_same_logits(pruned, saved):
    back = load_pruned(saved)
    assert torch.equal(run(back), run(pruned))
    assert back.label_names == pruned.label_names
    assert pruning_info(back.model).plan == pruning_info(pruned.model).plan
    assert pruning_info(back.model).gate_state == pruning_info(pruned.model).gate_state
    assert back.adapter.num_heads(0) == 3 and back.adapter.num_heads(1) == 0
    assert "Pruned: kept 3/8 heads" in back.notes[0]
    # a loaded pruned model can be saved again
    again = save_pruned(back, saved.parent / "again")
    assert torch.equal(run(load_pruned(again)), run(pruned))


def test_onnx_matches_torch(pruned, saved):
    assert onnx_max_diff(pruned, saved / ONNX_FILE) <= 1e-4
    # dynamic axes: batch 1 and a longer sequence than at export time
    long = ["the film " * 40]
    assert onnx_max_diff(pruned, saved / ONNX_FILE, long) <= 1e-4


def test_refuses_to_overwrite(pruned, saved):
    before = (saved / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(ExportExists, match="already exists") as info:
        save_pruned(pruned, saved)
    assert "\n" not in str(info.value) and isinstance(info.value, ValueError)
    assert (saved / "model.safetensors").stat().st_mtime_ns == before


def test_overwrite_replaces_an_export(pruned, tmp_path):
    out = save_pruned(pruned, tmp_path / "p")
    (out / "stale.txt").write_text("old")
    save_pruned(pruned, out, overwrite=True)
    assert not (out / "stale.txt").exists() and (out / PRUNING_FILE).is_file()


@pytest.mark.parametrize("name", ["a/b", "..", "", "x\\y", "."])
def test_bad_names(name):
    with pytest.raises(ValueError, match="name"):
        check_name(name)
    assert check_name("minilm-pruned-50") == "minilm-pruned-50"


def test_unpruned_model_is_refused(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="prune"):
        save_pruned(load_model(str(tiny_dir)), tmp_path / "x")


def _copy(saved, tmp_path):
    import shutil

    return shutil.copytree(saved, tmp_path / "copy")


def test_index_out_of_range_in_pruning_json(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    record = json.loads((folder / PRUNING_FILE).read_text())
    record["kept_heads"][0] = [0, 1, 9]
    (folder / PRUNING_FILE).write_text(json.dumps(record))
    with pytest.raises(ModelError, match="kept_heads"):
        load_pruned(folder)


def test_garbled_pruning_json(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    (folder / PRUNING_FILE).write_text("{not json")
    with pytest.raises(ModelError, match="cannot be read"):
        load_pruned(folder)


def test_weights_that_do_not_match_the_plan(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    key = "bert.encoder.layer.0.attention.self.query.weight"
    tensors[key] = torch.zeros(32, 24)  # as if all 4 heads were kept
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ModelError, match=r"other shape .*query\.weight"):
        load_pruned(folder)
    del tensors[key]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ModelError, match="missing"):
        load_pruned(folder)


def test_real_default_model_round_trip_and_onnx(tmp_path):
    if not (builtin_dir("default") / "config.json").exists():
        pytest.skip("the built-in 'default' model is not prepared on this machine (run `make prepare`)")
    loaded = load_model("default")
    state = GateState.from_closed_heads(loaded, [(0, 1), (3, 2)] + [(5, h) for h in range(12)])
    pruned = prune(loaded, state.with_ffn_keep(loaded.adapter, 0.5))
    out = save_pruned(pruned, tmp_path / "default-pruned")
    back = load_pruned(out)
    assert torch.equal(run(back), run(pruned))
    onnx_path = export_onnx(back, tmp_path / "m.onnx")
    assert onnx_max_diff(back, onnx_path) <= 1e-4
