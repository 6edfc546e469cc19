"""Evaluation, latency harness and FLOP counts checked against hand-computed or independent values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.data import TextDataset
from core.evaluate import evaluate, macro_f1, predict_logits
from core.latency import compare, make_batch, measure
from core.models import load_model
from core.size import encoder_flops

TEXTS = ["a great film", "awful", "the plot drags on and on for far too long without any point at all",
         "fine", "I loved every minute of this wonderful, moving picture", "meh", "no", "truly bad acting"]


def test_macro_f1_hand_computed():
    labels = np.array([0, 0, 1, 1, 2, 2])
    preds = np.array([0, 1, 1, 1, 2, 0])
    # class 0: tp1 fp1 fn1 -> 0.5; class 1: tp2 fp1 fn0 -> 0.8; class 2: tp1 fp0 fn1 -> 2/3
    assert macro_f1(labels, preds, 3) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert macro_f1(labels, labels, 3) == 1.0


def test_batched_logits_match_one_at_a_time(tiny_dir):
    """Length-sorted, padded batches must give each text the logits it gets alone, in input order."""
    loaded = load_model(str(tiny_dir))
    batched, truncated = predict_logits(loaded.model, loaded.tokenizer, TEXTS, batch_size=3)
    assert truncated == 0
    with torch.inference_mode():
        alone = np.stack([loaded.model(**loaded.tokenizer(t, return_tensors="pt")).logits[0].numpy() for t in TEXTS])
    np.testing.assert_allclose(batched, alone, atol=1e-5)


def test_evaluate_accuracy_equals_hand_count(tiny_dir):
    loaded = load_model(str(tiny_dir))
    logits, _ = predict_logits(loaded.model, loaded.tokenizer, TEXTS)
    preds = logits.argmax(1)
    labels = [int(p) if i % 3 else 1 - int(p) for i, p in enumerate(preds)]  # every third one wrong
    data = TextDataset(TEXTS, labels, ["neg", "pos"], "hand")
    ev = evaluate(loaded.model, loaded.tokenizer, data)
    assert ev.accuracy == pytest.approx(5 / 8)
    assert ev.n == 8 and ev.probabilities.shape == (8, 2)
    np.testing.assert_allclose(ev.probabilities.sum(1), 1, atol=1e-6)


def test_truncation_is_counted(tiny_dir):
    loaded = load_model(str(tiny_dir))
    _, truncated = predict_logits(loaded.model, loaded.tokenizer, TEXTS, max_length=8)
    assert truncated == sum(len(loaded.tokenizer(t)["input_ids"]) > 8 for t in TEXTS) > 0


def test_empty_dataset_is_refused(tiny_dir):
    loaded = load_model(str(tiny_dir))
    with pytest.raises(ValueError, match="empty"):
        evaluate(loaded.model, loaded.tokenizer, TextDataset([], [], ["neg", "pos"], "empty"))


def test_latency_harness_shape(tiny_dir):
    loaded = load_model(str(tiny_dir))
    result = measure(loaded.model, loaded.tokenizer, TEXTS, repeats=7, warmup=1, budget_s=600)  # all 7, however busy
    assert set(result) == {1, 32}
    for b, lat in result.items():
        assert lat.batch_size == b and lat.repeats == 7
        assert 0 < lat.p10_s <= lat.median_s <= lat.p90_s
        assert lat.threads == torch.get_num_threads() and lat.device == "cpu"
    assert result[32].seq_len == max(len(loaded.tokenizer(t)["input_ids"]) for t in TEXTS)


class Logged(torch.nn.Module):
    """`model` that appends `name` to `calls` at every forward pass."""

    def __init__(self, model: torch.nn.Module, name: str, calls: list[str]):
        super().__init__()
        self.model, self.name, self.calls = model, name, calls

    def forward(self, **batch):
        self.calls.append(self.name)
        return self.model(**batch)


def test_compare_interleaves_models(tiny_dir):
    """Rounds alternate the models (A B A B ...), each running `repeats_per_round` times per round; timing
    one model to the end and then the other (sequential) fails here."""
    loaded = load_model(str(tiny_dir))
    batch = make_batch(loaded.tokenizer, TEXTS, 4)
    calls: list[str] = []
    models = {name: Logged(loaded.model, name, calls) for name in ("a", "b")}
    out = compare(models, batch, rounds=4, repeats_per_round=1, warmup=False)
    assert calls == ["a", "b"] * 4 and {k: v.repeats for k, v in out.items()} == {"a": 4, "b": 4}
    calls.clear()
    out = compare(models, batch, rounds=2, repeats_per_round=3)
    assert calls == ["a", "b"] + (["a"] * 3 + ["b"] * 3) * 2  # one untimed warm-up call each, then the rounds
    assert {k: v.repeats for k, v in out.items()} == {"a": 6, "b": 6}
    calls.clear()
    out = compare(models, batch, rounds=2, repeats_per_round=3, settle=2)
    assert calls == ["a", "b"] + (["a"] * 5 + ["b"] * 5) * 2  # 2 untimed settling calls before each round's 3
    assert {k: v.repeats for k, v in out.items()} == {"a": 6, "b": 6}
    calls.clear()
    out = compare({"a": models["a"]}, batch, rounds=2, repeats_per_round=3, settle=2)
    assert calls == ["a"] * 7 and out["a"].repeats == 6  # one model never switches: nothing to settle


def test_encoder_flops_hand_computed(tiny_dir):
    adapter = load_model(str(tiny_dir)).adapter
    t, d, f, layers = 10, 32, 64, 2
    attention = layers * (2 * t * d * d * 3 + 2 * 2 * t * t * d + 2 * t * d * d)
    ffn = layers * (2 * t * d * f * 2)
    flops = encoder_flops(adapter, t)
    assert (flops.attention, flops.ffn) == (attention, ffn)
    assert flops.attention_share == pytest.approx(attention / (attention + ffn))
