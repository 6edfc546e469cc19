"""pruning.live: hand-set gates -> GateState, presets, and the dense-vs-pruned comparison of the Gates page."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from core.data import load_data, read_table
from core.evaluate import evaluate
from core.latency import typical_texts
from core.models import load_model
from core.summary import median_tokens
from pruning.hooks import gated
from pruning.live import ManualGates, compare_state, figures, heads_without_role, least_relevant_heads, measure_pruned
from pruning.surgery import prune


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_model(str(tiny_dir))


def test_manual_gates_build_the_expected_state(tiny):
    gates = ManualGates(closed_heads=frozenset({(0, 1), (1, 3)}), attention_off=frozenset({1}),
                        ffn_off=frozenset({0}), ffn_keep=0.5, hidden_keep=0.75)
    state = gates.state(tiny)
    assert state.closed_heads() == [(0, 1), (1, 3)]
    assert state.mha.tolist() == [1.0, 0.0] and state.ffn.tolist() == [0.0, 1.0]
    assert (state.intermediate.sum(dim=1) == 32).all()  # half of 64 units in every layer
    assert int(state.hidden.sum()) == 24  # 0.75 of 32 dims
    assert ManualGates().state(tiny).is_dense()
    assert gates.describe() == "2 heads closed, attention off in L1, FFN off in L0, FFN keep 50%, hidden keep 75%"
    assert ManualGates().describe() == "dense"


def test_presets_from_a_heads_report():
    table = pd.DataFrame({"layer": [0, 0, 1, 1], "head": [0, 1, 0, 1], "relevance": [0.4, 0.1, 0.3, 0.2],
                          "roles": ["positional(-1)", "", "", "syntactic(dobj:dep2head)"]})
    assert least_relevant_heads(table, 2) == {(0, 1), (1, 1)}
    assert heads_without_role(table) == {(0, 1), (1, 0)}


def test_typical_texts_pick_median_lengths(tiny):
    texts = ["a", "a b c d e f g h i j k l m n o p", "a b c", "a b d", "a b e"]
    assert sorted(typical_texts(tiny.tokenizer, texts, 3)) == ["a b c", "a b d", "a b e"]


def test_comparison_matches_the_gated_model(tiny, reviews_csv):
    data = read_table(reviews_csv, label_names=tiny.label_names)
    gates = ManualGates(closed_heads=frozenset({(0, 0), (0, 2), (1, 1)}), ffn_keep=0.5)
    result = compare_state(tiny, gates.state(tiny), data)
    with gated(tiny, gates.state(tiny)), torch.inference_mode():
        expected = evaluate(tiny.model, tiny.tokenizer, data).accuracy
    assert result.pruned.accuracy == pytest.approx(expected)
    assert result.dense.accuracy == pytest.approx(evaluate(tiny.model, tiny.tokenizer, data).accuracy)
    assert result.pruned.parameters < result.dense.parameters and result.pruned.flops < result.dense.flops
    assert result.dense.flops_ffn / result.pruned.flops_ffn == pytest.approx(2.0)
    assert 0 < result.sparsity < 1 and result.flop_speedup > 1
    for side in (result.dense, result.pruned):
        assert side.latency_b1_ms > 0 and side.latency_b32_ms > 0
    assert np.isfinite(result.speedup(1)) and "kept 5/8 heads, 64/128 FFN units" in result.note


def test_closing_everything_still_runs(tiny, reviews_csv):
    """No head, no attention, no FFN left anywhere: the residual path still classifies."""
    data = read_table(reviews_csv, label_names=tiny.label_names)
    everything = ManualGates(closed_heads=frozenset((lay, h) for lay in range(2) for h in range(4)),
                             attention_off=frozenset({0, 1}), ffn_off=frozenset({0, 1}))
    result = compare_state(tiny, everything.state(tiny), data)
    assert result.pruned.flops == 0 and 0 <= result.pruned.accuracy <= 1
    assert result.pruned.encoder_parameters < result.dense.encoder_parameters / 10  # LayerNorms and biases remain
    assert result.sparsity == pytest.approx(1.0, abs=0.01)


def test_gates_file_cli_on_the_second_real_model(tmp_path):
    """`pruning apply --gates` and `pruning evaluate` on minilm-l3 (3 x 12 heads), as the Gates page runs them."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.conftest import link_prepared

    (tmp_path / "home").mkdir()
    home = link_prepared(tmp_path / "home")
    loaded = load_model("minilm-l3")
    gates = ManualGates(closed_heads=frozenset({(0, 0), (1, 5), (2, 11)}), attention_off=frozenset({1}), ffn_keep=0.5)
    path = tmp_path / "gates.json"
    path.write_text(gates.state(loaded).to_json())
    env = {**os.environ, "HEADLAB_HOME": str(home)}
    root = Path(__file__).resolve().parent.parent

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "pruning", *args], capture_output=True, text=True, env=env,
                              cwd=root, timeout=600)

    dev = load_data("default", split="dev").subset(40, seed=1)
    pd.DataFrame({"text": dev.texts, "label": [dev.label_names[i] for i in dev.labels]}).to_csv(
        tmp_path / "dev40.csv", index=False)
    proc = cli("evaluate", "--model", "minilm-l3", "--gates", str(path), "--data", str(tmp_path / "dev40.csv"),
               "--whole-file", "--out", str(tmp_path / "eval.json"))
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "eval.json").read_text())
    assert record["examples"] == 40 and record["pruned"]["flops_ffn"] * 2 == record["dense"]["flops_ffn"]
    assert "kept 22/36 heads" in record["note"] and "skipped attention in layer(s) 1" in record["note"]
    proc = cli("apply", "--model", "minilm-l3", "--gates", str(path), "--data", str(tmp_path / "dev40.csv"),
               "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    again = load_model(str(tmp_path / "out"))
    text = "a sharp, funny and unexpectedly moving film"
    with gated(loaded, gates.state(loaded)), torch.inference_mode():
        expected = loaded.model(**loaded.tokenizer(text, return_tensors="pt")).logits
    with torch.inference_mode():
        got = again.model(**again.tokenizer(text, return_tensors="pt")).logits
    assert torch.allclose(got, expected, atol=1e-4)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(ManualGates().state(load_model("default")).to_json())  # 6 layers: does not fit L3
    proc = cli("evaluate", "--model", "minilm-l3", "--gates", str(wrong))
    assert proc.returncode == 2 and "have sizes" in proc.stderr and "Traceback" not in proc.stderr


def test_gates_from_a_saved_state_round_trip_and_reopen(tiny):
    from dataclasses import replace

    from pruning.gate_state import GateState

    torch.manual_seed(0)
    saved = GateState.from_closed_heads(tiny, [(0, 1), (1, 2)]).with_ffn_keep(tiny.adapter, 0.5)
    saved = saved.replace(head=saved.head * torch.rand(2, 4).clamp(0.2, 1), mha=torch.tensor([1.0, 0.0]))
    gates = ManualGates.from_state(saved)
    assert gates.closed_heads == {(0, 1), (1, 2)} and gates.attention_off == {1} and not gates.ffn_off
    assert gates.state(tiny) == saved
    reopened = replace(gates, closed_heads=frozenset({(0, 1)}), attention_off=frozenset()).state(tiny)
    assert reopened.head[1, 2] == 1 and reopened.mha[1] == 1 and reopened.head[0, 1] == 0
    assert torch.equal(reopened.intermediate, saved.intermediate)  # the saved FFN units stay


def test_measuring_never_changes_the_dense_model(tiny, reviews_csv):
    """The page's dense model is a shared singleton: pruning copies it, so two sessions cannot interfere."""
    data = read_table(reviews_csv, label_names=tiny.label_names)
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in tiny.model.modules())
    for gates in (ManualGates(closed_heads=frozenset({(0, 0)})), ManualGates(ffn_keep=0.25, hidden_keep=0.5)):
        compare_state(tiny, gates.state(tiny), data)
    after = tiny.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert hooks == sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in tiny.model.modules())


def test_a_quick_look_times_the_pruned_copy_alone_against_the_given_dense_latencies(tiny, reviews_csv):
    """`time_dense=False` (the Gates page after a toggle): the dense model is never called, its latencies are
    the ones passed in, and the pruned copy is timed at every batch size of `rounds`."""
    data = read_table(reviews_csv, label_names=tiny.label_names)
    dense = figures(tiny, data, median_tokens(tiny, data.texts))
    with pytest.raises(ValueError, match="time_dense=False needs dense_figures timed"):
        measure_pruned(tiny, prune(tiny, ManualGates().state(tiny)), data, dense, time_dense=False)
    dense.latency_b1_ms, dense.latency_b32_ms = 12.5, 99.0
    pruned = prune(tiny, ManualGates(closed_heads=frozenset({(0, 1)}), ffn_keep=0.5).state(tiny))
    calls = []
    hook = tiny.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        result = measure_pruned(tiny, pruned, data, dense, {1: (2, 2), 32: (1, 1)}, time_dense=False)
    finally:
        hook.remove()
    assert calls == [] and (result.dense.latency_b1_ms, result.dense.latency_b32_ms) == (12.5, 99.0)
    assert result.pruned.latency_b1_ms > 0 and result.pruned.latency_b32_ms > 0
    assert result.speedup(1) == pytest.approx(12.5 / result.pruned.latency_b1_ms)
