"""Explanations under pruning: explanation drift (analysis.drift), role survival and role-aware pruning
(analysis.roles.survival, the one-shot methods' protect_roles)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.drift import Explanations, compare, drift, explain, ranks, spearman, top_k_overlap
from analysis.relevance import token_relevance
from analysis.roles import score_heads
from analysis.roles.survival import (
    NONE,
    kept_heads,
    kinds,
    least_relevant_role_free,
    protect_scores,
    role_heads,
    role_mask,
    role_vs_free,
    survival,
    survival_frame,
)
from core.data import TextDataset
from core.models import load_model
from pruning.baselines import baseline_state, head_scores
from pruning.gate_state import GateState
from pruning.methods import registry
from pruning.methods.base import MethodContext
from pruning.surgery import prune
from tests.test_roles import previous, to_head, to_rarest, uniform, views

TEXTS = [f"a {w} film, number {i}, with {x} actors" for i in range(5) for w, x in (("great", "fine"),
                                                                                  ("awful", "dull"))]


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_model(str(tiny_dir))


@pytest.fixture(scope="module")
def reference(tiny):
    return explain(tiny, TEXTS)


# ----------------------------------------------------------------------------- the figures by hand


def test_spearman_and_top_k_by_hand():
    assert ranks(np.array([10.0, 30.0, 20.0, 20.0])).tolist() == [1.0, 4.0, 2.5, 2.5]
    assert spearman(np.array([1.0, 2.0, 3.0]), np.array([10.0, 20.0, 30.0])) == pytest.approx(1.0)
    assert spearman(np.array([1.0, 2.0, 3.0]), np.array([3.0, 2.0, 1.0])) == pytest.approx(-1.0)
    # ranks (1, 2, 3, 4) vs (2, 1, 4, 3): d = 1 each, rho = 1 - 6 * 4 / (4 * 15) = 0.6
    assert spearman(np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, 1.0, 4.0, 3.0])) == pytest.approx(0.6)
    a, b = np.random.default_rng(0).normal(size=(2, 9))
    b[3] = b[5]  # a tie: pandas' own Spearman (average ranks) is the independent value
    expected = pd.DataFrame({"a": a, "b": b}).corr(method="spearman").loc["a", "b"]
    assert spearman(a, b) == pytest.approx(expected)
    assert np.isnan(spearman(np.array([1.0, 1.0]), np.array([1.0, 2.0]))) and np.isnan(spearman(a[:1], b[:1]))
    # top-2 by |value|: {0, 3} and {0, 1} share one token
    assert top_k_overlap(np.array([5.0, 0.1, 0.2, -4.0]), np.array([-3.0, 2.0, 0.1, 1.0]), 2) == 0.5
    assert top_k_overlap(np.array([1.0, 2.0]), np.array([2.0, 1.0]), 5) == 1.0  # k capped at the tokens


def test_compare_flips_and_head_ranks_by_hand():
    heads = np.array([[[1.0, 2.0, 3.0]], [[1.0, 2.0, 3.0]]])  # (N=2, L=1, H=3)
    dense = Explanations(heads, [np.array([1.0, 2.0, -0.5]), np.array([-1.0, -2.0])], np.array([0, 1]),
                         np.zeros(2))
    pruned_heads = np.array([[[3.0, np.nan, 1.0]], [[3.0, np.nan, 1.0]]])  # head 1 closed, the others swapped
    pruned = Explanations(pruned_heads, [np.array([2.0, 1.0, -0.5]), np.array([1.0, 2.0])], np.array([0, 1]),
                          np.zeros(2))
    d = compare(dense, pruned, top_k=1)
    assert d.heads_compared == 2 and d.head_spearman == pytest.approx(-1.0)
    assert d.token_spearman == pytest.approx((0.5 - 1.0) / 2)  # ranks (2,3,1)/(3,2,1): 0.5; (2,1)/(1,2): -1
    assert d.token_topk == pytest.approx(0.5)  # top-1 token: 1 vs 0 (differ), 1 vs 1 (same)
    assert d.flipped == 0.5  # example 0 stays positive, example 1 turns from -3 to +3
    with pytest.raises(ValueError, match="same classes"):
        compare(dense, Explanations(pruned_heads, pruned.tokens, np.array([1, 1]), np.zeros(2)))


# ----------------------------------------------------------------------------- a tiny model


def test_dense_and_nothing_closed_give_no_drift(tiny, reference):
    for other in (tiny, prune(tiny, GateState.dense(tiny))):
        d = drift(tiny, other, TEXTS, reference=reference)
        assert (d.head_spearman, d.token_spearman, d.token_topk, d.flipped) == pytest.approx((1.0, 1.0, 1.0, 0.0))
        assert d.examples == len(TEXTS) and d.heads_compared == 8


def test_pruned_heads_map_back_to_the_dense_numbering(tiny_copy):
    """A head whose W_O columns are 0 contributes nothing: pruning it leaves the function, so the pruned
    model's kept heads (renumbered inside the layer) must come back with the dense model's relevance."""
    silent = load_model(str(tiny_copy))  # a private copy
    with torch.no_grad():
        silent.adapter.attention_output(0).weight[:, 8:16] = 0  # head 1 of layer 0 (d_h = 8)
    ref = explain(silent, TEXTS)
    assert np.all(ref.heads[:, 0, 1] == 0)
    closed = prune(silent, GateState.from_closed_heads(silent, [(0, 1)]))
    mapped = explain(closed, TEXTS, ref.targets)
    assert np.all(np.isnan(mapped.heads[:, 0, 1]))
    keep = np.ones((2, 4), dtype=bool)
    keep[0, 1] = False
    np.testing.assert_allclose(mapped.heads[:, keep], ref.heads[:, keep], rtol=1e-4, atol=1e-6)
    d = drift(silent, closed, TEXTS, reference=ref)
    assert d.heads_compared == 7 and d.head_spearman == pytest.approx(1.0)
    assert d.token_spearman == pytest.approx(1.0) and d.flipped == 0.0


def test_closing_heads_drifts_and_matches_token_relevance(tiny, reference):
    """Closing live heads moves the explanations away; each figure equals the one computed independently
    from `analysis.relevance.token_relevance` on the pruned model (one text at a time)."""
    pruned = prune(tiny, GateState.from_closed_heads(tiny, [(0, 1), (1, 0), (1, 2)]))
    d = drift(tiny, pruned, TEXTS, reference=reference)
    assert d.heads_compared == 5
    rho, flips = [], []
    for text, target, dense_tokens in zip(TEXTS, reference.targets, reference.tokens):
        dense_why = token_relevance(tiny, text, target=int(target))
        why = token_relevance(pruned, text, target=int(target))
        words = slice(1, -1)  # [CLS] ... [SEP]
        np.testing.assert_allclose(dense_why.relevance[words], dense_tokens, rtol=1e-5, atol=1e-7)
        rho.append(pd.DataFrame({"a": dense_why.relevance[words], "b": why.relevance[words]})
                   .corr(method="spearman").loc["a", "b"])
        flips.append(np.sign(dense_why.relevance[words].sum()) != np.sign(why.relevance[words].sum()))
    assert d.token_spearman == pytest.approx(np.mean(rho)) and d.flipped == pytest.approx(np.mean(flips))
    assert d.token_spearman < 1.0
    more = drift(tiny, prune(tiny, GateState.from_closed_heads(tiny, [(0, h) for h in range(4)] + [(1, 0), (1, 2)])),
                 TEXTS, reference=reference)
    assert more.heads_compared == 2 and more.token_spearman < d.token_spearman


def test_decoder_drift(tiny_decoders):
    loaded = load_model(str(tiny_decoders["llama"]))
    texts = TEXTS[:4]
    ref = explain(loaded, texts)
    same = drift(loaded, prune(loaded, GateState.dense(loaded)), texts, reference=ref)
    assert (same.head_spearman, same.token_spearman, same.flipped) == pytest.approx((1.0, 1.0, 0.0))
    d = drift(loaded, prune(loaded, GateState.from_closed_heads(loaded, [(0, 1), (2, 3)])), texts, reference=ref)
    assert d.heads_compared == 10 and d.token_spearman < 1.0


def test_explain_refuses_bad_input(tiny):
    with pytest.raises(ValueError, match="one target per text"):
        explain(tiny, TEXTS[:2], [0])
    with pytest.raises(ValueError, match="non-empty"):
        explain(tiny, [])


# ----------------------------------------------------------------------------- role survival


@pytest.fixture(scope="module")
def planted():
    """Voita roles planted on synthetic attention (tests/test_roles.py): 1 layer x 4 heads."""
    table = score_heads(views([previous, to_head, to_rarest, uniform], n=60))
    assert [kinds(r) for r in table["roles"]] == [{"positional"}, {"syntactic"}, {"rare-word"}, set()]
    return table


def test_role_survival_tracks_the_planted_heads(planted):
    heads = role_heads(planted)
    assert heads["positional"] == {(0, 0)} and heads["rare-word"] == {(0, 2)} and heads[NONE] == {(0, 3)}
    assert (0, 1) in heads["syntactic"] and heads["induction"] == set()
    shape = (1, 4)
    dense = _state(shape, closed=[])
    closed = _state(shape, closed=[(0, 0), (0, 3)])
    table = survival(closed, planted).set_index("kind")
    assert table.loc["positional", "kept"] == 0 and table.loc[NONE, "kept"] == 0
    assert table.loc["rare-word", "kept"] == 1 and table.loc["syntactic", "kept"] == table.loc["syntactic", "total"]
    assert np.isnan(table.loc["induction", "share"])
    frame = survival_frame({0: dense, 5: closed, 9: _state(shape, closed=[], mha_off=True)}, planted)
    kept = frame.pivot(index="step", columns="kind", values="kept")
    planted_kinds = ["positional", "syntactic", "rare-word", NONE]
    assert kept.loc[0, planted_kinds].tolist() == [1, 1, 1, 1] and kept.loc[5, planted_kinds].tolist() == [0, 1, 1, 0]
    assert (kept.loc[:, ["induction", "previous-token", "duplicate-token"]] == 0).all().all()  # never planted
    assert (kept.loc[9] == 0).all()  # the whole attention sublayer closed
    assert kept_heads(closed) == {(0, 1), (0, 2)}
    assert role_vs_free(closed, planted) == pytest.approx((2 / 3, 0.0))  # 2 of 3 role heads, the role-free one gone
    assert role_mask(planted, shape).tolist() == [[True, True, True, False]]


def _state(shape, closed, mha_off=False) -> GateState:
    layers, heads = shape
    head = torch.ones(shape)
    for index in closed:
        head[index] = 0
    return GateState(head=head, mha=torch.zeros(layers) if mha_off else torch.ones(layers),
                     intermediate=torch.ones(layers, 4), ffn=torch.ones(layers), hidden=torch.ones(8))


def test_protect_scores_and_the_role_free_preset():
    scores = torch.tensor([[0.5, 0.1], [0.9, 0.2]])
    protected = torch.tensor([[False, True], [False, True]])
    raised = protect_scores(scores, protected)
    assert raised[protected].min() > raised[~protected].max()
    assert torch.equal(raised[~protected], scores[~protected])
    assert raised[0, 1] < raised[1, 1]  # the order inside the group stays
    table = pd.DataFrame({"layer": [0, 0, 1, 1], "head": [0, 1, 0, 1], "relevance": [0.4, 0.1, 0.3, 0.2],
                          "roles": ["positional(-1)", "", "", "syntactic(dobj:dep2head)"]})
    assert least_relevant_role_free(table, 2) == {(0, 1), (1, 0)}
    assert least_relevant_role_free(table, 3) == {(0, 1), (1, 0), (1, 1)}  # then the least relevant role head


def test_protect_roles_keeps_role_heads_where_the_plain_method_closes_some(tiny, monkeypatch):
    shape = (2, 4)
    scores = head_scores("relevance", tiny, TEXTS, [0] * len(TEXTS))
    lowest = torch.argsort(scores.reshape(-1))[:3]  # the three least relevant heads carry roles
    roles = ["positional(1)" if i in lowest.tolist() else "" for i in range(8)]
    table = pd.DataFrame({"layer": [i // 4 for i in range(8)], "head": [i % 4 for i in range(8)], "roles": roles})
    protected = role_mask(table, shape)
    plain = baseline_state("relevance", tiny, TEXTS, [0] * len(TEXTS), 0.3)
    safe = baseline_state("relevance", tiny, TEXTS, [0] * len(TEXTS), 0.3, protected=protected)
    assert (plain.head.reshape(-1)[lowest] == 0).any()  # the plain method closes some role heads
    assert (safe.head[protected] > 0).all()
    assert int((safe.head == 0).sum()) == int((plain.head == 0).sum())  # the same number closed: same target
    # the method option reaches the same state through the role table it finds
    monkeypatch.setattr("analysis.roles.head_roles", lambda loaded, texts, limit: table)
    cls = registry.get("relevance")
    options = cls.Options(target_sparsity=0.3, score_examples=len(TEXTS), protect_roles=True)
    data = TextDataset(texts=TEXTS, labels=[0] * len(TEXTS), label_names=tiny.label_names, name="t")
    method = cls(options, MethodContext(base=tiny, teacher=tiny, train=data, device=torch.device("cpu"), seed=0,
                                        progress=lambda *a: None))
    assert (method.prune().head[protected] > 0).all()


# ----------------------------------------------------------------------------- a training run records it


def test_a_run_records_drift_at_each_eval(tiny, tiny_dir, reviews, tmp_path):
    from core.data import load_splits
    from pruning.config import TrainConfig
    from pruning.loop import run_job
    from pruning.runs import RunStore

    store = RunStore(tmp_path / "runs.sqlite")
    config = TrainConfig.build(model=str(tiny_dir), data=str(reviews), method="relevance", target_sparsity=0.6,
                               finetune_steps=10, score_examples=16, batch_size=8, eval_every=10, eval_budget=1.0,
                               eval_examples=8, drift_examples=6)
    run_id = store.create(config.to_dict())
    assert run_job(store, run_id, teacher=tiny) == "done"
    first, *_, last = store.records(run_id)
    assert [r.drift_examples for r in store.records(run_id)] == [6] * len(store.records(run_id))
    assert first.drift_seconds > 0 and last.final
    # step 0 is the sliced model before its fine-tune: the same figures as drift() on a fresh slice
    texts = load_splits(config.data_spec, tiny.label_names).dev.subset(8, seed=0).texts[:6]
    expected = drift(tiny, prune(tiny, store.gates(run_id, 0)), texts)
    assert first.drift_token_spearman == pytest.approx(expected.token_spearman, abs=1e-6)
    assert first.drift_head_spearman == pytest.approx(expected.head_spearman, abs=1e-6)
    assert first.drift_flipped == pytest.approx(expected.flipped) and first.drift_token_spearman < 1
    off = store.create(TrainConfig.build(**{**config.to_dict(), **config.options, "drift_examples": 0,
                                            "finetune_steps": 0}).to_dict())
    assert run_job(store, off, teacher=tiny) == "done"
    assert all(r.drift_examples is None for r in store.records(off))


def test_charts_draw_drift_and_role_survival(planted):
    from ui.charts import DRIFT_COLOURS, pareto_chart, role_survival_chart

    runs = pd.DataFrame({"label": ["a", "b"], "method": ["relevance", "cofi"], "model": ["m", "m"],
                         "teacher": ["m", "m"], "accuracy": [0.8, 0.7], "dense_accuracy": [0.85, 0.85],
                         "speedup_b32": [1.5, 2.0], "sparsity": [0.5, 0.7], **{k: [0.9, 0.4] for k in DRIFT_COLOURS}})
    coloured = pareto_chart(runs, "drift_token_spearman")
    assert list(coloured.data[0].marker.color) == [0.9] and coloured.layout.coloraxis.colorbar.title.text == \
        "token relevance Spearman"
    assert {t.name for t in pareto_chart(runs).data} >= {"relevance, m", "cofi, m"}  # by method, as before
    frame = survival_frame({0: _state((1, 4), []), 3: _state((1, 4), [(0, 0)])}, planted).assign(
        sparsity=lambda f: f["step"].map({0: 0.0, 3: 0.2}))
    fig = role_survival_chart(frame, "t")
    lines = {t.name: list(t.y) for t in fig.data}
    assert lines["positional"] == [1.0, 0.0] and lines["none"] == [1.0, 1.0] and "induction" not in lines
