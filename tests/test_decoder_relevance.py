"""Head relevance on decoders (conservative LRP and AttnLRP), and each AttnLRP rule against its closed form.

The tiny random decoders (`tiny_decoders`: Llama 4/2 heads, Qwen2 6/2 with Q/K/V biases, Gemma3 4/1 with
sandwich norms, a sliding window and soft-capping) get O(1) weights and non-zero biases, so every term of
the conservation check is exercised. Tolerances as in test_relevance (`assert_conserved`).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_relevance import assert_conserved, gate_gradient
from transformers.models.llama.modeling_llama import repeat_kv

from analysis.attnlrp import _attnlrp_attention, attnlrp, softmax_absorbed
from analysis.conservative import conservative, record_activations
from analysis.relevance import HeadRelevance, mask_heads, next_token_relevance, relevance_table, token_relevance
from core.data import load_data
from core.models import load_model

METHODS = ("conservative", "attnlrp")
MODES = {"conservative": conservative, "attnlrp": attnlrp}
ARCHS = ("llama", "qwen2", "gemma3")
HEADS = {"llama": 4, "qwen2": 6, "gemma3": 4}
TEXTS = ["a great film", "awful", "the plot drags on and on for far too long without any point at all"]


def perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """O(1) weights (std 1/sqrt(fan-in)) and biases (std 0.5) outside the embeddings."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif p.dim() == 2 and "embed" not in name and "lm_head" not in name:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)


@pytest.fixture(scope="module")
def decoders(tiny_decoders):
    out = {}
    for arch, folder in tiny_decoders.items():
        out[arch] = load_model(str(folder))
        perturb(out[arch].model)
    return out


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _lm_logits(loaded, ids: list[int]) -> torch.Tensor:
    """(T, V) next-token logits of the plain causal LM (its own forward, Gemma's soft-capping included)."""
    with torch.inference_mode():
        return loaded.lm(input_ids=torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_modes_keep_values_and_restore(decoders, arch, method):
    loaded = decoders[arch]
    batch = loaded.tokenizer(TEXTS, padding=True, return_tensors="pt")
    ids = loaded.text_tokenizer(TEXTS[2])["input_ids"]
    with torch.inference_mode():
        before = loaded.model(**batch).logits
    lm_before = _lm_logits(loaded, ids)
    with MODES[method](loaded.model):
        assert loaded.model.config._attn_implementation == f"headlab_{method}"
        with torch.inference_mode():
            inside = loaded.model(**batch).logits
        lm_inside = _lm_logits(loaded, ids)
    assert loaded.model.config._attn_implementation == "eager"
    assert _hook_count(loaded.model) == 0
    torch.testing.assert_close(inside, before, atol=1e-5, rtol=1e-5)  # padding, sliding window, caps intact
    torch.testing.assert_close(lm_inside, lm_before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_conservation_prompted(decoders, arch, method):
    """The label word's logit = input + bias + absorbed; one relevance per query head; biases where Qwen2 has them."""
    loaded = decoders[arch]
    result = HeadRelevance(loaded, method=method).attribute(TEXTS, batch_size=2)
    assert_conserved(result)
    assert result.per_example.shape == (3, 3, HEADS[arch]) and np.all(np.isfinite(result.per_example))
    with torch.inference_mode():
        logits = loaded.model(**loaded.tokenizer(TEXTS, padding=True, return_tensors="pt")).logits
    np.testing.assert_allclose(result.logits, logits.max(dim=1).values.numpy(), rtol=1e-5, atol=1e-6)
    assert np.all(np.abs(result.input_relevance) > 1e-3)
    assert np.all(np.abs(result.bias_relevance) > 1e-3) == (arch == "qwen2")  # Qwen2's Q/K/V biases
    assert np.all(np.abs(result.absorbed_relevance) > 1e-4) == (method == "attnlrp")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_conservation_next_token(decoders, arch, method):
    """Plain text: the logit of the actual next token (default: the text's last token), conserved."""
    loaded = decoders[arch]
    result = HeadRelevance(loaded, method=method).attribute_next_token(TEXTS, batch_size=2)
    assert_conserved(result)
    for i, text in enumerate(TEXTS):
        ids = loaded.text_tokenizer(text)["input_ids"]
        logits = _lm_logits(loaded, ids)
        position = max(len(ids) - 2, 0)
        token = ids[position + 1] if len(ids) > 1 else int(logits[position].argmax())
        assert (result.positions[i], result.targets[i]) == (position, token)
        assert result.logits[i] == pytest.approx(float(logits[position, token]), rel=1e-5, abs=1e-5)
    last = HeadRelevance(loaded, method=method).attribute_next_token(TEXTS[2:], position=-1)
    ids = loaded.text_tokenizer(TEXTS[2])["input_ids"]
    assert last.positions[0] == len(ids) - 1 and last.targets[0] == int(_lm_logits(loaded, ids)[-1].argmax())
    assert_conserved(last)
    why = next_token_relevance(loaded, TEXTS[2], position=3, method=method)
    assert why.target == ids[4] and len(why.tokens) == len(ids)
    assert why.relevance[4:].sum() == 0  # causal: later tokens cannot matter
    assert why.relevance.sum() + why.bias + why.absorbed == pytest.approx(why.logit, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_soft_capping_by_the_identity_rule(decoders, method):
    """Gemma's final soft-capping cap * tanh(z / cap), with a cap small enough to bend the logits, keeps
    both the label logit and the next-token logit conserved."""
    loaded = decoders["gemma3"]
    config = loaded.model.config
    cap, config.final_logit_softcapping = config.final_logit_softcapping, 0.05
    try:
        prompted = HeadRelevance(loaded, method=method).attribute(TEXTS)
        text = HeadRelevance(loaded, method=method).attribute_next_token(TEXTS)
    finally:
        config.final_logit_softcapping = cap
    assert np.all(np.abs(prompted.logits) < 0.05) and np.max(np.abs(prompted.logits)) > 0.03  # tanh bends
    assert_conserved(prompted)
    assert_conserved(text)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_relevance_is_gate_gradient_per_query_head(decoders, arch, method):
    """r_lh = d logit / d gate_lh, a gate on query head h's slice of o_proj's input, in the method's mode;
    query heads sharing a KV head are told apart."""
    loaded, text = decoders[arch], TEXTS[2]
    result = HeadRelevance(loaded, method=method).attribute([text])
    target = int(result.targets[0])
    with MODES[method](loaded.model):
        brute = np.array([[gate_gradient(loaded, text, layer, head, lambda z: z[target])
                           for head in range(HEADS[arch])] for layer in range(3)])
    np.testing.assert_allclose(result.per_example[0], brute, rtol=1e-4, atol=1e-6)
    assert np.all(np.abs(brute[:, 0] - brute[:, 1]) > 1e-6)  # heads 0 and 1 share KV head 0


@pytest.mark.parametrize("method", METHODS)
def test_closed_head_has_no_relevance(decoders, method):
    loaded = decoders["llama"]
    mask = np.ones((3, 4))
    mask[1, 2] = mask[2, 0] = 0
    with mask_heads(loaded.model, loaded.adapter, mask):
        result = HeadRelevance(loaded, method=method).attribute(TEXTS)
    assert np.all(result.per_example[:, 1, 2] == 0) and np.all(result.per_example[:, 2, 0] == 0)
    assert np.all(result.per_example[:, mask == 1] != 0)
    assert_conserved(result)


def _causal_mask(batch: int, tokens: int) -> torch.Tensor:
    """(B, 1, T, T) additive mask: 0 where key <= query, the dtype's minimum elsewhere (as eager_mask)."""
    allowed = torch.ones(tokens, tokens, dtype=torch.bool).tril()
    mask = torch.zeros(tokens, tokens, dtype=torch.float64).masked_fill(~allowed, torch.finfo(torch.float64).min)
    return mask.expand(batch, 1, tokens, tokens)


def test_attnlrp_attention_rules_match_closed_form(decoders):
    """AttnLRP's attention (GQA 4 query / 2 KV heads) against the paper's rules applied by hand, from the
    relevance R = out * G at its output: probs @ v and q k^T by the epsilon-uniform matmul rule
    (R_A = A * ((R_O / 2O) B^T), R_B = B * (A^T (R_O / 2O))), the softmax by R_x = x * (R_s - s sum R_s);
    the softmax's absorbed share is sum R_s - sum R_x."""
    module = decoders["llama"].adapter.self_attention(0)
    g = torch.Generator().manual_seed(1)
    b, t, d = 2, 5, 8
    q, k, v = (torch.randn(b, h, t, d, generator=g, dtype=torch.float64, requires_grad=True) for h in (4, 2, 2))
    mask, scale = _causal_mask(b, t), d**-0.5
    out, probs = _attnlrp_attention(module, q, k, v, mask, scaling=scale, dropout=0.0)  # (B, T, H, d), (B, H, T, T)
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    g_q, g_k, g_v, g_p = torch.autograd.grad((out * grad_out).sum(), [q, k, v, probs])

    with torch.no_grad():
        p, k_rep, v_rep = probs, repeat_kv(k, 2), repeat_kv(v, 2)
        ctx = p @ v_rep  # (B, H, T, d)
        r_ctx = ctx * grad_out.transpose(1, 2)
        z = r_ctx / (2 * ctx)
        r_p, r_v = p * (z @ v_rep.transpose(-1, -2)), (v_rep * (p.transpose(-1, -2) @ z)).view(b, 2, 2, t, d).sum(2)
        qk = q @ k_rep.transpose(-1, -2)
        x = qk * scale + mask
        r_x = x * (r_p - p * r_p.sum(-1, keepdim=True))  # 0 at masked keys (s = 0 and R_s = 0 there)
        z = torch.where(mask == 0, r_x / (2 * qk), 0)
        r_q, r_k = q * (z @ k_rep), (k_rep * (z.transpose(-1, -2) @ q)).view(b, 2, 2, t, d).sum(2)
        absorbed = r_p.sum(dim=(1, 2, 3)) - r_x.sum(dim=(1, 2, 3))

    for mine, by_hand in ((q * g_q, r_q), (k * g_k, r_k), (v * g_v, r_v)):
        torch.testing.assert_close(mine.detach(), by_hand, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(softmax_absorbed(probs, g_p), absorbed, rtol=1e-5, atol=1e-6)
    total = r_q.sum((1, 2, 3)) + r_k.sum((1, 2, 3)) + r_v.sum((1, 2, 3)) + absorbed
    torch.testing.assert_close(total, r_ctx.sum((1, 2, 3)))  # the attention's own conservation


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_elementwise_rules(decoders, arch, method):
    """In either mode, a layer's RMSNorm (offset + w for Gemma) passes relevance on unchanged, R_x = R_y,
    elementwise; in its MLP the activation follows the identity rule, R_gate = R_act, and the gated product
    the uniform rule, R_act = R_up = R_product / 2. Relevance R = a * grad, from R_out = out * G, G random."""
    layer = decoders[arch].adapter.layers[1]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 32, generator=g, requires_grad=True)
    with MODES[method](decoders[arch].model), \
            record_activations([layer.mlp.act_fn, layer.mlp.up_proj], inputs=False) as outs, \
            record_activations([layer.mlp.act_fn, layer.mlp.down_proj], inputs=True) as ins:
        y = layer.input_layernorm(x)
        grad_y = torch.randn(y.shape, generator=g)
        (grad_x,) = torch.autograd.grad((y * grad_y).sum(), x)
        out = layer.mlp(x)
        grad_out = torch.randn(out.shape, generator=g)
        tensors = [*outs.tensors, *ins.tensors]
        act, up, gate, product = (t.detach() * grad for t, grad in
                                  zip(tensors, torch.autograd.grad((out * grad_out).sum(), tensors)))
    torch.testing.assert_close(x.detach() * grad_x, y.detach() * grad_y, rtol=1e-4, atol=1e-6)
    scale = float(product.abs().max())
    for left, right in ((gate, act), (act, product / 2), (up, product / 2)):
        torch.testing.assert_close(left, right, rtol=1e-4, atol=1e-6 * scale)


def test_attnlrp_matches_conservative_on_the_value_path(decoders):
    """Both methods agree on values; they differ in relevance (AttnLRP's reaches Q/K and the softmax)."""
    loaded = decoders["llama"]
    a = HeadRelevance(loaded, method="conservative").attribute(TEXTS)
    b = HeadRelevance(loaded, method="attnlrp").attribute(TEXTS)
    np.testing.assert_allclose(a.logits, b.logits, rtol=1e-6)
    assert not np.allclose(a.per_example, b.per_example, rtol=1e-3)


def test_bad_arguments_raise_value_error(decoders, tiny_dir):
    loaded = decoders["llama"]
    with pytest.raises(ValueError, match="'method' parameter"):
        HeadRelevance(loaded, method="lrp")
    with pytest.raises(ValueError, match="'position' parameter"):
        HeadRelevance(loaded).attribute_next_token(TEXTS, position=5)  # "awful" has fewer tokens
    with pytest.raises(ValueError, match="encoder"):
        HeadRelevance(load_model(str(tiny_dir))).attribute_next_token(TEXTS)
    with pytest.raises(ValueError, match="'method' parameter"):
        token_relevance(loaded, TEXTS[0], method="attn")


# ----------------------------------------------------------------------------- the real SmolLM2


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return load_model(str(smollm2_dir))


def test_smollm2_relevance(smollm2):
    """The real SmolLM2 (30 layers x 9 query / 3 KV heads): both methods conserve on prompted reviews, the
    relevance table runs, and a next-token explanation on plain text conserves too."""
    data = load_data("default", split="dev", label_names=smollm2.label_names).subset(2, seed=0)
    for method in METHODS:
        result = HeadRelevance(smollm2, method=method).attribute(data.texts)
        assert result.per_example.shape == (2, 30, 9) and np.all(np.isfinite(result.per_example))
        assert_conserved(result)
    frame = relevance_table(smollm2, data, limit=1, method="attnlrp")
    assert len(frame) == 30 * 9 and np.all(np.isfinite(frame[["relevance", "importance"]].to_numpy()))
    why = next_token_relevance(smollm2, "The capital of France is Paris", method="attnlrp")
    assert why.tokens[-1] == "ĠParis" and why.target == smollm2.text_tokenizer.convert_tokens_to_ids("ĠParis")
    assert why.relevance.sum() + why.bias + why.absorbed == pytest.approx(why.logit, rel=1e-4)
