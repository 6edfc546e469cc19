"""Gates and physical pruning of decoders: the gated model and its pruned copy compute the same class
logits and LM logits; GQA's rule (a KV head's rows survive iff one of its query heads does); exact
parameter counts; tied embeddings sliced once; save -> load and ONNX round trips.

The three tiny random decoders (conftest `tiny_decoders`: Llama 4/2 heads tied, Qwen2 6/2 with Q/K/V
biases untied, Gemma3 4/1 with sandwich norms) cover every granularity; the real SmolLM2 is checked once.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from core.adapter import GateShape
from core.data import TextDataset
from core.evaluate import evaluate
from core.models import load_model
from core.prompting import PromptClassifier
from core.pruned import PRUNING_FILE
from core.size import encoder_flops
from core.structure import pruning_info
from pruning.export import ONNX_FILE, onnx_max_diff, save_pruned
from pruning.gate_state import GROUPS, GateState
from pruning.gates import CoFiGates
from pruning.hooks import gated
from pruning.live import measure_pruned
from pruning.size import SizeModel, exact_sparsity, expected_sparsity, prunable_size
from pruning.surgery import prune

TOL = 1e-5
ARCHS = ("llama", "qwen2", "gemma3")
TEXTS = ["a great film, warm and funny", "an awful, boring movie that never seems to end at all", "meh"]


@pytest.fixture(scope="module")
def decoders(tiny_decoders):
    torch.set_num_threads(1)
    return {arch: load_model(str(tiny_decoders[arch])) for arch in ARCHS}


def batch_of(loaded, texts=TEXTS):
    return loaded.tokenizer(texts, padding=True, return_tensors="pt")


@torch.no_grad()
def outputs(loaded, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Class logits (B, labels) and LM logits at the real tokens (N, V)."""
    lm_logits = loaded.lm(**batch).logits[batch["attention_mask"].bool()]
    return loaded.model(**batch).logits, lm_logits


def gated_outputs(loaded, state, batch):
    with gated(loaded, state):
        return outputs(loaded, batch)


def check_equal(loaded, state, batch=None):
    """Gated == pruned (class and LM logits) within TOL, and the gates visibly change the model."""
    batch = batch if batch is not None else batch_of(loaded)
    pruned = prune(loaded, state)
    for got, want in zip(outputs(pruned, batch), gated_outputs(loaded, state, batch)):
        diff = (got - want).abs().max().item()
        assert diff <= TOL, f"gated and pruned logits differ by {diff:.2e}"
    assert (gated_outputs(loaded, state, batch)[0] - outputs(loaded, batch)[0]).abs().max() > 1e-3, "vacuous"
    return pruned


def random_state(loaded, seed: int, soft: bool = False) -> GateState:
    """Random query heads (layer 1 without any), FFN units (layer 2's FFN closed), hidden dims."""
    g = torch.Generator().manual_seed(seed)
    L, H, d_ff, d = GateState.dense(loaded).shape
    head = (torch.rand(L, H, generator=g) > 0.4).float()
    head[0, 0], head[1] = 1.0, 0.0
    inter = (torch.rand(L, d_ff, generator=g) > 0.5).float()
    hidden = (torch.rand(d, generator=g) > 0.25).float()
    mha, ffn = torch.ones(L), torch.tensor([1.0, 1.0, 0.0])
    if soft:  # open gates take values in (0.2, 1]
        head = head * (0.2 + 0.8 * torch.rand(L, H, generator=g))
        inter = inter * (0.2 + 0.8 * torch.rand(L, d_ff, generator=g))
        hidden = hidden * (0.2 + 0.8 * torch.rand(d, generator=g))
        mha, ffn = mha * 0.6, ffn * 0.7
    return GateState(head=head, mha=mha, intermediate=inter, ffn=ffn, hidden=hidden)


# Kept query heads of layer 0 spread unevenly over its KV heads (Gemma3 has a single KV head: even).
UNEVEN = {"llama": [0, 1, 2], "qwen2": [0, 3, 4], "gemma3": [1, 3]}


def structured_state(loaded, arch: str) -> GateState:
    """Layer 0: UNEVEN heads; layer 1: no head; layer 2: no FFN; half the units, 3/4 of the hidden dims."""
    dense = GateState.dense(loaded)
    head = torch.zeros_like(dense.head)
    head[0, UNEVEN[arch]] = 1.0
    head[2] = 1.0
    state = dense.replace(head=head, ffn=torch.tensor([1.0, 1.0, 0.0]))
    return state.with_ffn_keep(loaded.adapter, 0.5).with_hidden_keep(loaded.adapter, 0.75, criterion="random")


# ----------------------------------------------------------------------------- gated == pruned


@pytest.mark.parametrize("arch", ARCHS)
def test_dense_gates_change_nothing(decoders, arch):
    loaded = decoders[arch]
    batch = batch_of(loaded)
    for got, want in zip(gated_outputs(loaded, GateState.dense(loaded), batch), outputs(loaded, batch)):
        assert torch.equal(got, want)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in loaded.model.modules())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("seed, soft", [(0, False), (1, False), (2, True), (3, True)])
def test_random_gates_prune_to_the_same_logits(decoders, arch, seed, soft):
    check_equal(decoders[arch], random_state(decoders[arch], seed, soft))


@pytest.mark.parametrize("arch", ARCHS)
def test_uneven_groups_empty_attention_and_empty_mlp(decoders, arch):
    loaded = decoders[arch]
    state = structured_state(loaded, arch)
    pruned = check_equal(loaded, state)
    a = pruned.adapter
    group = GateShape.of(loaded).group_size
    attention = a.self_attention(0)
    kept_kv = sorted({h // group for h in UNEVEN[arch]})
    assert a.num_heads(0) == len(UNEVEN[arch]) and a.num_kv_heads(0) == len(kept_kv)
    if arch == "gemma3":  # 2 query heads on the one KV head: repeat_kv with 2
        assert attention.num_key_value_groups == 2
    else:  # each kept query head reads its own expanded K/V block
        assert attention.num_key_value_groups == 1
        expected = [kept_kv.index(h // group) for h in UNEVEN[arch]]
        assert a.key(0).kv_index.tolist() == a.value(0).kv_index.tolist() == expected
    assert a.num_heads(1) == a.num_kv_heads(1) == 0 and a.attention_output(1).weight.shape == (24, 0)
    assert a.ffn_in(2).weight.shape == a.ffn_gate(2).weight.shape == (0, 24) and a.ffn_out(2).weight.shape == (24, 0)
    with torch.no_grad():  # attention maps: one entry per layer, none for the layer without heads
        maps = pruned.model(**batch_of(pruned), output_attentions=True).attentions
    assert [m.shape[1] for m in maps] == [len(UNEVEN[arch]), 0, GateShape.of(loaded).heads]


@pytest.mark.parametrize("arch", ARCHS)
def test_closed_sublayer_gates(decoders, arch):
    loaded = decoders[arch]
    pruned = check_equal(loaded, GateState.dense(loaded).replace(mha=torch.tensor([0.0, 1.0, 1.0]),
                                                                 ffn=torch.tensor([1.0, 0.0, 1.0])))
    assert pruned.adapter.num_heads(0) == 0 and pruned.adapter.ffn_in(1).weight.shape[0] == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_gates_are_differentiable(decoders, arch):
    loaded = decoders[arch]
    state = random_state(loaded, 2, soft=True)
    state = GateState(**{name: getattr(state, name).clone().requires_grad_() for name in GROUPS})
    with gated(loaded, state):
        loaded.model(**batch_of(loaded)).logits[:, 0].sum().backward()
    for name in GROUPS:
        grad = getattr(state, name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def expected_parameters(loaded, state: GateState) -> int:
    """Parameters of the pruned model counted from the config and the gate state alone."""
    cfg, a = loaded.model.config, loaded.adapter
    shape = GateShape.of(loaded)
    dh, group = shape.head_dim, shape.group_size
    d = int((state.hidden > 0).sum())
    qkv_bias = a.query(0).bias is not None
    norms_per_layer = 4 if arch_of(loaded) == "gemma3" else 2
    total = cfg.vocab_size * d * (1 if cfg.tie_word_embeddings else 2) + d  # table, LM head, final norm
    for layer in range(shape.layers):
        heads = torch.nonzero(state.head[layer] > 0).flatten().tolist() if state.mha[layer] > 0 else []
        kv = len({h // group for h in heads})
        units = int((state.intermediate[layer] > 0).sum()) if state.ffn[layer] > 0 else 0
        total += (len(heads) + 2 * kv) * dh * (d + qkv_bias) + d * len(heads) * dh  # q, k, v, o (no o bias)
        total += 3 * d * units + norms_per_layer * d
        total += 2 * dh if arch_of(loaded) == "gemma3" else 0  # q_norm, k_norm (per head)
    return total


def arch_of(loaded) -> str:
    return {"llama": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3"}[loaded.model.config.model_type]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_gqa_rule_and_exact_parameter_counts(decoders, arch, seed):
    loaded = decoders[arch]
    state = random_state(loaded, seed)
    pruned = prune(loaded, state)
    a, group, dh = pruned.adapter, GateShape.of(loaded).group_size, GateShape.of(loaded).head_dim
    plan = pruning_info(pruned.model).plan
    for layer in range(3):
        kept = plan.heads[layer]
        assert a.query(layer).weight.shape[0] == len(kept) * dh
        kv = [g for g in range(GateShape.of(loaded).kv_heads) if any(h // group == g for h in kept)]
        assert plan.kv_heads(group)[layer] == kv
        original = loaded.adapter.key(layer).weight
        rows = torch.cat([original[g * dh:(g + 1) * dh] for g in kv]) if kv else original[:0]
        hidden = torch.as_tensor(plan.hidden)
        assert torch.equal(a.key(layer).weight, rows[:, hidden])  # the kept KV heads' rows, as they were
    assert sum(p.numel() for p in pruned.model.parameters()) == expected_parameters(loaded, state)
    assert loaded.architecture().parameters == expected_parameters(loaded, GateState.dense(loaded))


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_tied_embeddings_are_sliced_once(decoders, arch):
    loaded = decoders[arch]
    pruned = prune(loaded, structured_state(loaded, arch))
    table, head = pruned.adapter.word_embeddings, pruned.lm.get_output_embeddings()
    assert head.weight is table.weight and head.weight.data_ptr() == table.weight.data_ptr()
    assert table.weight.shape == (loaded.model.config.vocab_size, 24)
    assert type(table) is type(loaded.adapter.word_embeddings)  # Gemma3 keeps its sqrt(d)-scaled table
    assert "lm_head.weight" not in dict(pruned.lm.named_parameters())  # one tensor, listed once


# ----------------------------------------------------------------------------- save, load, ONNX


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_and_onnx_round_trip(decoders, arch, tmp_path):
    loaded = decoders[arch]
    state = structured_state(loaded, arch)
    pruned = prune(loaded, state.replace(head=state.head * 0.8))  # soft head gates folded in
    folder = save_pruned(pruned, tmp_path / "pruned", onnx=True)
    record = json.loads((folder / PRUNING_FILE).read_text())
    assert record["prompt"] == loaded.prompt.to_dict() and record["kept_heads"][1] == []
    config = json.loads((folder / "config.json").read_text())
    assert config["num_attention_heads"] == GateShape.of(loaded).heads and config["hidden_size"] == 32  # original
    names = set(load_file(str(folder / "model.safetensors")))
    assert ("lm_head.weight" in names) == (arch == "qwen2") and "model.embed_tokens.weight" in names
    assert not any(".bias" in n for n in names if "k_proj" in n and arch != "qwen2")  # transformers' names only

    back = load_model(str(folder))
    assert isinstance(back.model, PromptClassifier) and back.prompt == loaded.prompt
    assert back.label_names == loaded.label_names and back.is_decoder
    assert pruning_info(back.model).plan == pruning_info(pruned.model).plan
    batch = batch_of(pruned)
    for got, want in zip(outputs(back, batch), outputs(pruned, batch)):
        assert torch.equal(got, want)
    if arch != "qwen2":
        assert back.lm.get_output_embeddings().weight is back.adapter.word_embeddings.weight

    # ONNX: class logits for (input_ids, attention_mask), new batch size and length after export
    assert onnx_max_diff(pruned, folder / ONNX_FILE) <= TOL
    assert onnx_max_diff(pruned, folder / ONNX_FILE, ["the film " * 40]) <= TOL


# ----------------------------------------------------------------------------- FLOPs, sparsity, criteria


def layer_matrices(adapter) -> int:
    """Weights of every layer's Q, K, V, O, gate, up and down projections, counted from the modules."""
    names = ("query", "key", "value", "attention_output", "ffn_gate", "ffn_in", "ffn_out")
    return sum(adapter.part(layer, n).weight.numel() for layer in range(len(adapter.layers)) for n in names)


@pytest.mark.parametrize("arch", ARCHS)
def test_flops_count_gqa_kv_and_three_swiglu_matrices(decoders, arch):
    loaded = decoders[arch]
    s, t = GateShape.of(loaded), 10
    q, kv, d, f = s.heads * s.head_dim, s.kv_heads * s.head_dim, s.hidden, s.intermediate
    flops = encoder_flops(loaded.adapter, t)
    assert flops.attention == s.layers * (2 * t * d * (q + 2 * kv) + 4 * t * t * q + 2 * t * q * d)
    assert flops.ffn == s.layers * 3 * 2 * t * d * f
    pruned = prune(loaded, structured_state(loaded, arch))
    kept_kv = len({h // s.group_size for h in UNEVEN[arch]})
    layer0 = len(UNEVEN[arch]) * s.head_dim
    small = encoder_flops(pruned.adapter, t)  # layer 0 uneven, layer 1 no heads, layer 2 all heads
    assert small.attention == (2 * t * 24 * (layer0 + 2 * kept_kv * s.head_dim) + 4 * t * t * layer0
                               + 2 * t * layer0 * 24 + 2 * t * 24 * (q + 2 * kv) + 4 * t * t * q + 2 * t * q * 24)
    assert small.ffn == 2 * 3 * 2 * t * 24 * (f // 2)  # layers 0 and 1 keep half the units, layer 2 none


@pytest.mark.parametrize("arch", ARCHS)
def test_sparsity_is_the_share_of_layer_matrices_removed(decoders, arch):
    loaded = decoders[arch]
    sizes = SizeModel.of(loaded)
    assert sizes.decoder and prunable_size(3, 32, 48, sizes) == layer_matrices(loaded.adapter)
    assert exact_sparsity(GateState.dense(loaded), model=sizes) == 0
    for state in (random_state(loaded, 0), structured_state(loaded, arch)):
        pruned = prune(loaded, state)
        expected = 1 - layer_matrices(pruned.adapter) / layer_matrices(loaded.adapter)
        assert exact_sparsity(state, model=SizeModel.of(pruned)) == pytest.approx(expected, abs=1e-7)
    gates = CoFiGates(loaded)  # the expected sparsity is differentiable in the gate probabilities
    expected_sparsity(gates, model=sizes).backward()
    assert all(g.log_alpha.grad is not None for g in gates.gates.values())


def test_magnitude_criteria_read_gqa_values_and_the_swiglu_gate(decoders):
    loaded = decoders["qwen2"]  # 6 query heads in 2 KV groups of 3
    a, s = loaded.adapter, GateShape.of(loaded)
    layer = 1
    v = a.value(layer).weight.view(s.kv_heads, s.head_dim, s.hidden)
    o = a.attention_output(layer).weight.view(s.hidden, s.heads, s.head_dim)
    scores = torch.stack([v[h // s.group_size].norm() * o[:, h].norm() for h in range(s.heads)])
    heads = GateState.dense(loaded).with_head_keep(a, 0.5).head[layer]
    assert torch.nonzero(heads).flatten().tolist() == sorted(torch.topk(scores, 3).indices.tolist())
    units = torch.stack([a.ffn_gate(layer).weight[i].norm() * a.ffn_in(layer).weight[i].norm()
                         * a.ffn_out(layer).weight[:, i].norm() for i in range(s.intermediate)])
    kept = GateState.dense(loaded).with_ffn_keep(a, 0.25).intermediate[layer]
    assert torch.nonzero(kept).flatten().tolist() == sorted(torch.topk(units, 12).indices.tolist())
    state = GateState.dense(loaded).with_hidden_keep(a, 0.5)  # reads the untied LM head too
    assert state.counts()["hidden"] == (16, 32)
    check_equal(loaded, state)


# ----------------------------------------------------------------------------- live figures


def test_measure_pruned_on_a_decoder(decoders):
    loaded = decoders["llama"]
    data = TextDataset(texts=TEXTS * 2, labels=[0, 1, 0, 1, 0, 1], label_names=loaded.label_names, name="six")
    state = random_state(loaded, 1)
    pruned = prune(loaded, state)
    cmp = measure_pruned(loaded, pruned, data, rounds={1: (1, 1), 32: (1, 1)})
    want = evaluate(pruned.model, pruned.tokenizer, data).accuracy
    assert cmp.pruned.accuracy == want and cmp.dense.examples == cmp.pruned.examples == 6
    assert cmp.sparsity == exact_sparsity(state, model=SizeModel.of(loaded)) > 0
    assert cmp.pruned.parameters == sum(p.numel() for p in pruned.model.parameters()) < cmp.dense.parameters
    assert cmp.pruned.flops < cmp.dense.flops and cmp.pruned.latency_b32_ms > 0 and cmp.dense.latency_b1_ms > 0


# ----------------------------------------------------------------------------- the real SmolLM2


def test_smollm2_gated_equals_pruned_with_30_percent_of_heads_closed(smollm2_dir):
    """Compared in float64: SmolLM2's residual stream reaches ~2.8e4 (massive activations from layer 12
    on), so in float32 mere rounding moves its class logits by ~1e-4; in float64 they agree exactly.
    Pruned in float32 (folding 0/1 gates and slicing are exact), then both models turned float64."""
    loaded = load_model(str(smollm2_dir))
    state = GateState.dense(loaded).with_head_keep(loaded.adapter, 0.7, criterion="random", seed=3)
    assert state.counts()["head"] == (180, 270)
    batch = batch_of(loaded, ["a great film, warm and funny"])  # one prompt: float64 is slow
    pruned = prune(loaded, state)
    with torch.no_grad():
        dense = loaded.model(**batch).logits
        loaded.model.double()
        pruned.model.double()
        with gated(loaded, state):
            want = loaded.model(**batch).logits
        assert (pruned.model(**batch).logits - want).abs().max() <= TOL
    assert (dense - want).abs().max() > 0.1  # closing 30% of the heads matters
    plan = pruning_info(pruned.model).plan
    assert sum(pruned.adapter.key(layer).weight.shape[0] for layer in range(30)) == sum(map(len, plan.kv_heads(3))) * 64
    assert pruned.lm.get_output_embeddings().weight is pruned.adapter.word_embeddings.weight
