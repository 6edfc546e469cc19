"""Head relevance (conservative LRP and AttnLRP) on encoders, Michel importance and head masking, checked
against brute force.

Conservation tolerance: |logit - input_relevance - bias_relevance - absorbed_relevance| <= 1e-4 * (|logit| +
|input_relevance| + |bias_relevance| + |absorbed_relevance|), per example (float32 forward/backward, sums in
float64); `absorbed` is AttnLRP's softmax share, 0 under conservative propagation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from captum.attr import LayerGradientXActivation
from conftest import MINILM_DIR, TINY, make_tiny
from transformers import (
    AutoTokenizer,
    ElectraConfig,
    ElectraForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from analysis.conservative import conservative
from analysis.relevance import HeadRelevance, mask_heads, michel_importance, token_relevance
from core.batching import collate, encode
from core.data import load_data
from core.models import ModelNotPrepared, load_model

CONSERVATION_RTOL = 1e-4
TEXTS = ["a great film", "awful", "the plot drags on and on for far too long without any point at all",
         "I loved every minute of this wonderful, moving picture", "truly bad acting"]


def perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-zero biases, uneven LayerNorm gains and O(1) weights, so every term of the check is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif "LayerNorm.weight" in name:
                p.copy_(1 + torch.randn(p.shape, generator=g) * 0.3)
            elif p.dim() == 2 and "embeddings" not in name:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)


def save_tiny(folder: Path, config_cls, model_cls) -> Path:
    """A random 2x4 RoBERTa/ELECTRA classifier with MiniLM's vocabulary."""
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(MINILM_DIR, local_files_only=True)
    model_cls(config_cls(vocab_size=tokenizer.vocab_size, pad_token_id=0, **TINY)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    loaded = load_model(str(tiny_dir))
    perturb(loaded.model)
    return loaded


@pytest.fixture(scope="module")
def default():
    try:
        return load_model("default")
    except ModelNotPrepared:
        pytest.skip("the default model is not prepared (python -m core prepare default)")


def assert_conserved(result) -> None:
    """|logit - input - bias - absorbed| within CONSERVATION_RTOL of the terms' magnitudes, per example."""
    scale = (np.abs(result.logits) + np.abs(result.input_relevance) + np.abs(result.bias_relevance)
             + np.abs(result.absorbed_relevance))
    assert np.all(np.abs(result.convergence_delta) <= CONSERVATION_RTOL * scale), result.convergence_delta / scale


def test_conservation_default_model(default):
    dev = load_data("default", split="dev").subset(6, seed=1)
    result = HeadRelevance(default).attribute(dev.texts, batch_size=4)
    assert_conserved(result)
    assert np.all(result.bias_relevance != 0)  # biases carry a real share on a trained model
    both = HeadRelevance(default).attribute(dev.texts, target=0)
    np.testing.assert_array_equal(both.targets, 0)
    assert_conserved(both)
    attn = HeadRelevance(default, method="attnlrp").attribute(dev.texts, batch_size=4)
    assert_conserved(attn)
    assert attn.method == "attnlrp" and np.all(np.abs(attn.absorbed_relevance) > 1e-3)
    np.testing.assert_allclose(attn.logits, result.logits, rtol=1e-5)


@pytest.mark.parametrize("method", ["conservative", "attnlrp"])
@pytest.mark.parametrize("arch", ["bert", "roberta", "electra"])
def test_conservation_tiny_models(arch, method, tiny, tmp_path):
    if arch == "bert":
        loaded = tiny
    else:
        classes = {"roberta": (RobertaConfig, RobertaForSequenceClassification),
                   "electra": (ElectraConfig, ElectraForSequenceClassification)}[arch]
        loaded = load_model(str(save_tiny(tmp_path / arch, *classes)))
        perturb(loaded.model)
    result = HeadRelevance(loaded, method=method).attribute(TEXTS, batch_size=2)
    assert_conserved(result)
    assert np.all(np.abs(result.bias_relevance) > 1e-3) and np.all(np.abs(result.input_relevance) > 1e-3)
    assert np.all(np.abs(result.absorbed_relevance) > 1e-4) == (method == "attnlrp")
    with torch.inference_mode():
        logits = loaded.model(**loaded.tokenizer(TEXTS[0], return_tensors="pt")).logits[0]
    assert result.logits[0] == pytest.approx(float(logits.max()), abs=1e-5)


def check_token_relevance(loaded, method: str) -> None:
    """token_relevance of one text = the input, bias and absorbed shares of HeadRelevance; they sum to the logit."""
    why = token_relevance(loaded, TEXTS[2], method=method)
    result = HeadRelevance(loaded, method=method).attribute([TEXTS[2]])
    assert why.tokens[0] == "[CLS]" and len(why.tokens) == len(why.relevance)
    assert why.relevance.sum() == pytest.approx(result.input_relevance[0], rel=1e-6, abs=1e-9)
    assert why.bias == pytest.approx(result.bias_relevance[0], rel=1e-6, abs=1e-9)
    assert why.absorbed == pytest.approx(result.absorbed_relevance[0], rel=1e-6, abs=1e-9)
    assert why.relevance.sum() + why.bias + why.absorbed == pytest.approx(why.logit, rel=1e-4)


def test_token_relevance_matches_input_relevance(tiny):
    check_token_relevance(tiny, "conservative")


def test_attnlrp_token_relevance_matches_input_relevance(tiny):
    check_token_relevance(tiny, "attnlrp")


def test_attnlrp_needs_pluggable_attention(tmp_path):
    """MPNet computes its softmax inline (no AttentionInterface): AttnLRP refuses it, conservative runs."""
    mpnet = load_model(str(make_tiny(tmp_path / "mpnet", arch="mpnet")))
    with pytest.raises(ValueError, match="AttentionInterface"):
        HeadRelevance(mpnet, method="attnlrp").attribute(TEXTS[:1])
    assert_conserved(HeadRelevance(mpnet).attribute(TEXTS[:1]))


def test_per_example_normalisation_sums_to_one(tiny):
    result = HeadRelevance(tiny).attribute(TEXTS)
    shares = np.abs(result.per_example) / np.abs(result.per_example).sum(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(shares.sum(axis=(1, 2)), 1.0, atol=1e-12)
    assert result.relevance.sum() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(result.relevance, shares.mean(axis=0), atol=1e-12)
    frame = result.to_frame()
    assert list(frame.columns) == ["layer", "head", "relevance", "relevance_signed"]
    assert len(frame) == 2 * 4 and frame["layer"].max() == 1 and frame["head"].max() == 3


def test_padding_invariance(default):
    short = "a quiet, lovely film"
    alone = HeadRelevance(default).attribute([short])
    mixed = HeadRelevance(default).attribute([TEXTS[2], short, TEXTS[3]], batch_size=3)
    assert alone.per_example.shape == (1, 6, 12)
    np.testing.assert_allclose(_shares(mixed)[1], _shares(alone)[0], atol=1e-4)
    np.testing.assert_allclose(mixed.per_example[1], alone.per_example[0], atol=1e-4 * np.abs(alone.logits[0]))


def _shares(result) -> np.ndarray:
    return result.per_example / np.abs(result.per_example).sum(axis=(1, 2), keepdims=True)


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_conservative_restores_model(tiny):
    model = tiny.model
    batch = tiny.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        before = model(**batch).logits
    with conservative(model):
        assert model.config._attn_implementation == "headlab_conservative"
        with torch.inference_mode():
            inside = model(**batch).logits
    with pytest.raises(RuntimeError), conservative(model):
        raise RuntimeError("boom")
    with torch.inference_mode():
        after = model(**batch).logits
    assert torch.equal(before, after)
    torch.testing.assert_close(inside, before, atol=1e-5, rtol=1e-5)  # same values; padding still masked
    assert model.config._attn_implementation == "eager"
    assert _hook_count(model) == 0


def _logits(loaded, texts=TEXTS) -> torch.Tensor:
    with torch.inference_mode():
        return loaded.model(**loaded.tokenizer(texts, padding=True, return_tensors="pt")).logits


def _with_wo_input(loaded, layer: int, fn) -> torch.Tensor:
    """Logits with W_O's input of `layer` replaced by fn(input) — the manual reference for masking."""
    hook = loaded.adapter.attention_output(layer).register_forward_pre_hook(lambda m, a: (fn(a[0]),))
    try:
        return _logits(loaded)
    finally:
        hook.remove()


def test_mask_heads(tiny):
    model, adapter = tiny.model, tiny.adapter
    plain = _logits(tiny)
    with mask_heads(model, adapter, np.ones((2, 4))):
        torch.testing.assert_close(_logits(tiny), plain, atol=0, rtol=0)
    mask = np.ones((2, 4))
    mask[1] = 0
    with mask_heads(model, adapter, mask):
        masked = _logits(tiny)
    torch.testing.assert_close(masked, _with_wo_input(tiny, 1, torch.zeros_like), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(masked, plain)
    mask = np.ones((2, 4))
    mask[0, 2] = 0
    d = adapter.head_dim(0)

    def drop_head_2(x):
        x = x.clone()
        x[..., 2 * d : 3 * d] = 0
        return x
    with mask_heads(model, adapter, mask):
        torch.testing.assert_close(_logits(tiny), _with_wo_input(tiny, 0, drop_head_2), atol=1e-6, rtol=1e-6)
    assert _hook_count(model) == 0
    with pytest.raises(ValueError, match="'mask' parameter"):
        with mask_heads(model, adapter, np.ones((3, 4))):
            pass


def gate_gradient(loaded, text: str, layer: int, head: int, objective) -> float:
    """d objective / d gate for one scalar gate on one head's context, by torch.autograd.grad."""
    d = loaded.adapter.head_dim(layer)
    gate = torch.ones((), requires_grad=True)

    def hook(module, args):
        x = args[0]
        scale = torch.ones(x.shape[-1])
        scale = torch.cat([scale[: head * d], gate.expand(d), scale[(head + 1) * d :]])
        return (x * scale,)
    handle = loaded.adapter.attention_output(layer).register_forward_pre_hook(hook)
    try:
        logits = loaded.model(**loaded.tokenizer(text, return_tensors="pt")).logits[0]
        (grad,) = torch.autograd.grad(objective(logits), gate)
    finally:
        handle.remove()
    return float(grad)


def test_head_relevance_equals_brute_force(tiny):
    """r_lh = d logit / d gate_lh at gate 1, one head at a time, in conservative mode."""
    text = TEXTS[3]
    result = HeadRelevance(tiny).attribute([text])
    target = int(result.targets[0])
    with conservative(tiny.model):
        brute = np.array([[gate_gradient(tiny, text, layer, head, lambda z: z[target]) for head in range(4)]
                          for layer in range(2)])
    np.testing.assert_allclose(result.per_example[0], brute, rtol=1e-4, atol=1e-6)


def test_head_relevance_matches_captum(tiny):
    """Captum's LayerGradientXActivation on every W_O input (one pass) gives the same head relevance."""
    wo = [tiny.adapter.attention_output(layer) for layer in range(2)]
    batch = collate(encode(tiny.tokenizer, TEXTS, 128).ids, tiny.tokenizer.pad_token_id)
    result = HeadRelevance(tiny).attribute(TEXTS, batch_size=len(TEXTS))
    targets = result.targets.tolist()
    with conservative(tiny.model):
        lgxa = LayerGradientXActivation(lambda ids, mask: tiny.model(input_ids=ids, attention_mask=mask).logits, wo)
        attributions = lgxa.attribute(batch["input_ids"], target=targets, attribute_to_layer_input=True,
                                      additional_forward_args=(batch["attention_mask"],))
    for layer, attr in enumerate(attributions):
        per_head = (attr * batch["attention_mask"][:, :, None]).view(len(TEXTS), attr.shape[1], 4, -1).sum((1, 3))
        np.testing.assert_allclose(result.per_example[:, layer], per_head.detach().numpy(), rtol=1e-4, atol=1e-6)


def test_michel_importance(tiny):
    labels = [0, 1, 0, 1, 1]
    importance = michel_importance(tiny, TEXTS, labels, batch_size=2)
    assert importance.shape == (2, 4) and np.all(importance >= 0)
    np.testing.assert_allclose(np.linalg.norm(importance, axis=1), 1.0, atol=1e-9)
    # brute force: per-example |dCE/dgate|, averaged, then per-layer L2 normalised; plain gradients
    raw = np.zeros((2, 4))
    for text, label in zip(TEXTS, labels):
        ce = lambda z, y=label: torch.nn.functional.cross_entropy(z[None], torch.tensor([y]))  # noqa: E731
        raw += np.abs([[gate_gradient(tiny, text, layer, head, ce) for head in range(4)] for layer in range(2)])
    raw /= np.linalg.norm(raw, axis=1, keepdims=True)
    np.testing.assert_allclose(importance, raw, rtol=1e-4, atol=1e-7)


def test_bad_arguments_raise_value_error(tiny):
    with pytest.raises(ValueError, match="'target' parameter"):
        HeadRelevance(tiny).attribute(TEXTS, target=5)
    with pytest.raises(ValueError, match="'texts' parameter"):
        HeadRelevance(tiny).attribute([])
    with pytest.raises(ValueError, match="'labels' parameter"):
        michel_importance(tiny, TEXTS, [0, 1])
