"""The invariant: a gated model and its physically pruned copy compute the same logits.

Tiny random BERTs (weights spread out so that logits differ between texts and closing a unit
visibly changes them) cover every granularity; the real default model is checked once.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from core.models import builtin_dir, load_model
from core.size import encoder_flops
from core.structure import pruning_info
from pruning.gates import CoFiGates, GateState
from pruning.hooks import gated
from pruning.surgery import prune

TOL = 1e-4
TEXTS = ["a great film, warm and funny", "an awful, boring movie that never seems to end at all", "meh"]


def spread(loaded, seed: int = 0):
    """Re-draw the weights of a (private) tiny model with a larger spread: varied, non-trivial logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in loaded.model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("LayerNorm.weight"):
                p.copy_(1 + 0.2 * noise)
            elif p.dim() == 1:
                p.copy_(0.2 * noise)
            else:
                p.copy_(0.3 * noise)
    return loaded


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return spread(load_model(str(tiny_dir)))


def batch_of(loaded, texts=TEXTS):
    return loaded.tokenizer(texts, padding=True, return_tensors="pt")


@torch.no_grad()
def logits(loaded, batch):
    return loaded.model(**batch).logits


def gated_logits(loaded, state, batch):
    with gated(loaded, state), torch.no_grad():
        return loaded.model(**batch).logits


def random_state(loaded, seed: int, soft: bool = False) -> GateState:
    """Random heads (layer 1 entirely closed), FFN units, hidden dims, FFN of layer 0 closed."""
    g = torch.Generator().manual_seed(seed)
    dense = GateState.dense(loaded)
    L, H, d_ff, d = dense.shape
    head = (torch.rand(L, H, generator=g) > 0.4).float()
    head[0, 0] = 1.0
    head[L - 1] = 0.0
    inter = (torch.rand(L, d_ff, generator=g) > 0.5).float()
    hidden = (torch.rand(d, generator=g) > 0.25).float()
    ffn = torch.ones(L)
    ffn[0] = 0.0
    if soft:  # open gates take values in (0.2, 1]
        head = head * (0.2 + 0.8 * torch.rand(L, H, generator=g))
        inter = inter * (0.2 + 0.8 * torch.rand(L, d_ff, generator=g))
        hidden = hidden * (0.2 + 0.8 * torch.rand(d, generator=g))
        ffn = ffn * 0.7
    return GateState(head=head, mha=torch.ones(L), intermediate=inter, ffn=ffn, hidden=hidden)


def check_equal(loaded, state, batch=None) -> float:
    batch = batch if batch is not None else batch_of(loaded)
    dense = logits(loaded, batch)
    gated_out = gated_logits(loaded, state, batch)
    pruned = prune(loaded, state)
    diff = (gated_out - logits(pruned, batch)).abs().max().item()
    assert diff <= TOL, f"gated and pruned logits differ by {diff:.2e}"
    if not state.is_dense():
        assert (gated_out - dense).abs().max() > 1e-3, "the gates changed nothing: the test would be vacuous"
    return diff


def test_dense_state_changes_nothing_and_hooks_are_removed(tiny):
    batch = batch_of(tiny)
    before = logits(tiny, batch)
    assert (before[0] - before[1]).abs().max() > 0.05  # the spread model tells texts apart
    assert torch.equal(gated_logits(tiny, GateState.dense(tiny), batch), before)
    with gated(tiny, GateState.from_closed_heads(tiny, [(0, 0)])):
        pass
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in tiny.model.modules())
    assert torch.equal(logits(tiny, batch), before)


def test_hooks_are_removed_on_error(tiny):
    with pytest.raises(RuntimeError), gated(tiny, GateState.dense(tiny)):
        raise RuntimeError("boom")
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in tiny.model.modules())


@pytest.mark.parametrize("heads", [[(0, 1)], [(0, 0), (0, 3), (1, 2)], [(1, 0), (1, 1), (1, 2), (1, 3)]])
def test_closed_heads(tiny, heads):
    state = GateState.from_closed_heads(tiny, heads)
    check_equal(tiny, state)
    pruned = prune(tiny, state)
    for layer in range(2):
        expected = 4 - sum(1 for lay, _ in heads if lay == layer)
        assert pruned.adapter.num_heads(layer) == expected


def test_all_heads_closed_keeps_the_bias_but_zero_mha_does_not(tiny):
    all_heads = GateState.from_closed_heads(tiny, [(1, h) for h in range(4)])
    no_mha = GateState.dense(tiny).replace(mha=torch.tensor([1.0, 0.0]))
    batch = batch_of(tiny)
    assert (gated_logits(tiny, all_heads, batch) - gated_logits(tiny, no_mha, batch)).abs().max() > 1e-3
    check_equal(tiny, all_heads, batch)
    check_equal(tiny, no_mha, batch)
    flops = encoder_flops(prune(tiny, no_mha).adapter, 10)
    assert flops.attention == encoder_flops(prune(tiny, all_heads).adapter, 10).attention


@pytest.mark.parametrize("groups", [
    {"ffn": torch.tensor([0.0, 1.0])},
    {"ffn": torch.tensor([0.0, 0.0]), "mha": torch.tensor([0.0, 0.0])},  # nothing but LayerNorms left
])
def test_closed_sublayers(tiny, groups):
    check_equal(tiny, GateState.dense(tiny).replace(**groups))


def test_ffn_units_and_hidden_dims(tiny):
    dense = GateState.dense(tiny)
    check_equal(tiny, dense.with_ffn_keep(tiny.adapter, 0.3))
    check_equal(tiny, dense.with_hidden_keep(tiny.adapter, 0.5))
    check_equal(tiny, dense.with_hidden_keep(tiny.adapter, 0.1, criterion="random"))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_binary_patterns(tiny, seed):
    check_equal(tiny, random_state(tiny, seed))


@pytest.mark.parametrize("seed", [0, 1])
def test_soft_gates_are_folded(tiny, seed):
    state = random_state(tiny, seed, soft=True)
    assert not state.is_binary()
    check_equal(tiny, state)


def test_learned_gate_state_prunes_and_gates_are_differentiable(tiny):
    torch.manual_seed(0)
    gates = CoFiGates(tiny)
    with torch.no_grad():  # make some gates close
        for g in gates.gates.values():
            g.log_alpha.normal_(0.0, 0.5)
    gates.train()
    loss = 0.0
    with gated(tiny, gates.sample()) as hooks:
        for _ in range(6):  # several samples: a single one may clamp a gate at 0 or 1 (zero gradient)
            loss = loss + tiny.model(**batch_of(tiny)).logits.sum()
            hooks.update(gates.sample())  # swapping the state inside the block
    loss.backward()
    for name, g in gates.gates.items():
        assert g.log_alpha.grad is not None and g.log_alpha.grad.abs().sum() > 0, name
    gates.eval()
    check_equal(tiny, gates.deterministic())


def test_pruned_model_is_smaller_and_original_is_untouched(tiny):
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    state = random_state(tiny, 0)
    pruned = prune(tiny, state)
    after = tiny.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(pruned.model) < count(tiny.model)
    dense_flops, pruned_flops = encoder_flops(tiny.adapter, 16), encoder_flops(pruned.adapter, 16)
    assert pruned_flops.attention < dense_flops.attention and pruned_flops.ffn < dense_flops.ffn
    assert GateState.from_dict(pruning_info(pruned.model).gate_state) == state
    assert pruning_info(tiny.model) is None
    assert pruned.fingerprint != tiny.fingerprint and "Pruned: kept" in pruned.notes[-1]


def test_refuses_wrong_shape_and_repruning(tiny, tiny_dir):
    other = GateState(head=torch.ones(3, 4), mha=torch.ones(3), intermediate=torch.ones(3, 64), ffn=torch.ones(3),
                      hidden=torch.ones(32))
    with pytest.raises(ValueError, match="sizes"):
        prune(tiny, other)
    with pytest.raises(ValueError, match="sizes"), gated(tiny, other):
        pass
    pruned = prune(tiny, GateState.from_closed_heads(tiny, [(0, 0)]))
    with pytest.raises(ValueError, match="already physically pruned"):
        prune(pruned, GateState.dense(tiny))
    with pytest.raises(ValueError, match="every hidden dim"):
        prune(tiny, GateState.dense(tiny).replace(hidden=torch.zeros(32)))


@pytest.fixture(scope="module")
def default_model():
    if not (builtin_dir("default") / "config.json").exists():
        pytest.skip("the built-in 'default' model is not prepared on this machine (run `make prepare`)")
    return load_model("default")


def test_real_default_model(default_model):
    loaded = default_model
    state = random_state(loaded, 7)  # last layer: no attention; layer 0: no FFN; ~half units; 3/4 hidden
    state = state.replace(head=state.head * torch.cat([torch.full((1, 12), 0.5), torch.ones(5, 12)]))  # soft
    texts = ["an absorbing, beautifully acted drama", "a tedious mess from start to finish", "fine",
             "the plot is thin but the jokes land more often than not, and the cast clearly had fun"]
    diff = check_equal(loaded, state, batch_of(loaded, texts))
    pruned = prune(loaded, state)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(pruned.model) < count(loaded.model)
    assert encoder_flops(pruned.adapter, 32).total < 0.6 * encoder_flops(loaded.adapter, 32).total
    print(f"default model: gated vs pruned max |diff| = {diff:.2e}")


def test_prune_inside_a_gated_block_does_not_copy_the_hooks(tiny):
    batch = batch_of(tiny)
    state = GateState.from_closed_heads(tiny, [(0, 1)])
    with gated(tiny, GateState.from_closed_heads(tiny, [(1, 2)])):
        pruned = prune(tiny, state)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in pruned.model.modules())
    assert (logits(pruned, batch) - gated_logits(tiny, state, batch)).abs().max() <= TOL


def test_pruned_model_still_reports_attentions_per_layer(tiny):
    batch = batch_of(tiny)
    with torch.no_grad():  # the original has run with output_attentions: transformers hooked it already
        assert len(tiny.model(**batch, output_attentions=True).attentions) == 2
    pruned = prune(tiny, GateState.from_closed_heads(tiny, [(0, 1)] + [(1, h) for h in range(4)]))
    with torch.no_grad():
        out = pruned.model(**batch, output_attentions=True, output_hidden_states=True)
    T = batch["input_ids"].shape[1]
    assert [tuple(a.shape) for a in out.attentions] == [(3, 3, T, T), (3, 0, T, T)]
    assert len(out.hidden_states) == 3
    assert pruned.adapter.num_heads(1) == 0 and isinstance(pruned.adapter.self_attention(1), nn.Module)
    assert encoder_flops(pruned.adapter, T).attention < encoder_flops(tiny.adapter, T).attention
