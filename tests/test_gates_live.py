"""pruning.live: hand-set gates -> GateState, presets, and the dense-vs-pruned comparison of the Gates page."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from core.data import load_data
from core.evaluate import evaluate
from core.models import load_model
from pruning.hooks import gated
from pruning.live import ManualGates, compare_state, heads_without_role, least_relevant_heads, typical_texts


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
    assert sorted(typical_texts(tiny, texts, 3)) == ["a b c", "a b d", "a b e"]


def test_comparison_matches_the_gated_model(tiny, reviews_csv):
    data = load_data(str(reviews_csv), label_names=tiny.label_names)
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
