"""LLM-Pruner and Minitron: their scores against independent computations on tiny models, coupled groups
and width / depth states that slice to the gated model, and whole runs through the CLI that export."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from core.adapter import GateShape
from core.data import TextDataset
from core.models import load_model
from core.pruned import load_pruned
from pruning.__main__ import main
from pruning.activation_scores import layer_scores, stream_norms, width_scores
from pruning.calibration import batches
from pruning.examples import text_examples
from pruning.gate_state import GateState
from pruning.hooks import gated
from pruning.methods.base import MethodContext
from pruning.methods.llm_pruner import LLMPruner, LLMPrunerOptions, pruned_layers
from pruning.methods.minitron import Minitron, MinitronOptions
from pruning.runs import RunStore
from pruning.session import classification_examples
from pruning.size import SizeModel, exact_sparsity
from pruning.surgery import prune
from pruning.taylor import aggregate, gradients, group_scores

torch.set_num_threads(1)
WORDS = "the cat sat on the mat and the dog ran in the park while the birds sang".split()


@pytest.fixture(scope="module")
def decoders(tiny_decoders) -> dict[str, object]:
    return {arch: load_model(str(folder)) for arch, folder in tiny_decoders.items()}


@pytest.fixture(scope="module")
def encoder(tiny_dir):
    return load_model(str(tiny_dir))


def rows(n: int = 12) -> TextDataset:
    texts = [" ".join(WORDS[i % 5:i % 5 + 3 + i % 7]) for i in range(n)]  # 3 to 9 words: padded batches
    return TextDataset(texts=texts, labels=[i % 2 for i in range(n)], label_names=["neg", "pos"], name="toy")


def documents(loaded, n: int = 12, words: int = 40):
    """Documents of `words` words each, cut into pieces of 16 tokens (a document's last piece is shorter)."""
    docs = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(words)) for i in range(n)]
    return text_examples(loaded, docs, 16)


def examples_of(loaded):
    return documents(loaded) if loaded.is_decoder else classification_examples(loaded, rows(), 32)


def context(loaded) -> MethodContext:
    return MethodContext(base=loaded, teacher=loaded, train=rows(), device=torch.device("cpu"), seed=0,
                         progress=lambda *a: None, examples=examples_of(loaded))


def logits(loaded, batch) -> torch.Tensor:
    with torch.no_grad():
        return (loaded.lm if loaded.is_decoder else loaded.model)(**batch).logits


def assert_pruned_equals_gated(loaded, state, batch) -> None:
    with gated(loaded, state):
        expected = logits(loaded, batch)
    torch.testing.assert_close(logits(prune(loaded, state), batch), expected, atol=2e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- LLM-Pruner: Taylor scores


def hand_loss(loaded, inputs, targets) -> torch.Tensor:
    """The task loss without HeadLab's code: transformers' own LM loss, or CE on the class logits."""
    if loaded.is_decoder:
        labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
        return loaded.lm(**inputs, labels=labels).loss
    return F.cross_entropy(loaded.model(**inputs).logits, targets)


def group_slices(loaded, layer: int, unit: int):
    """(member, parameter, index) of every element of attention unit `unit` (a KV group with its query heads)."""
    a, s = loaded.adapter, GateShape.of(loaded)
    q = slice(unit * s.group_size * s.head_dim, (unit + 1) * s.group_size * s.head_dim)
    kv = slice(unit * s.head_dim, (unit + 1) * s.head_dim)
    out = [("attention_output", a.attention_output(layer).weight, (slice(None), q))]
    for name, idx in (("query", q), ("key", kv), ("value", kv)):
        module = getattr(a, name)(layer)
        out += [(name, module.weight, (idx,))] + ([(name, module.bias, (idx,))] if module.bias is not None else [])
    return out


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_taylor_scores_of_one_group_equal_autograd_by_hand(arch, decoders, encoder):
    loaded = decoders["llama"] if arch == "llama" else encoder
    ex = examples_of(loaded)
    calibration = batches(ex, 6, 16, seed=0)  # one batch, one backward pass
    (inputs, targets), = calibration
    layer, unit = 1, 1
    parts = group_slices(loaded, layer, unit)
    params = [p for _, p, _ in parts]
    loaded.model.requires_grad_(True)
    grads = torch.autograd.grad(hand_loss(loaded, inputs, targets), params)
    fisher = [torch.zeros_like(p) for p in params]
    for i in range(inputs["input_ids"].shape[0]):
        one = {k: v[i:i + 1] for k, v in inputs.items()}
        for f, g in zip(fisher, torch.autograd.grad(hand_loss(loaded, one, targets[i:i + 1]), params)):
            f += g ** 2 / inputs["input_ids"].shape[0]
    loaded.model.requires_grad_(False)
    first = sum(float((g * p)[idx].abs().sum()) for (_, p, idx), g in zip(parts, grads))
    second = sum(float((g * p - 0.5 * f * p * p)[idx].abs().sum())
                 for (_, p, idx), g, f in zip(parts, grads, fisher))
    members: dict[str, float] = {}  # vector-wise: |sum g W| per member (a weight with its bias), summed
    for (name, p, idx), g in zip(parts, grads):
        members[name] = members.get(name, 0.0) + float((g * p)[idx].sum())
    vector = sum(abs(v) for v in members.values())

    def score(**kw) -> float:
        return float(group_scores(loaded, ex, calibration, **kw).attention[layer, unit])

    assert score() == pytest.approx(first, rel=1e-4)
    assert score(second_order=True) == pytest.approx(second, rel=1e-4)
    ours = gradients(loaded, ex, calibration, params, second_order=True)  # the Fisher diagonal itself
    for p, g, f in zip(params, grads, fisher):
        torch.testing.assert_close(ours.grad[p], g, rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(ours.fisher[p], f, rtol=1e-3, atol=1e-12)
        assert float(f.abs().max()) > 0
    assert score(importance="vector") == pytest.approx(vector, rel=1e-4)
    assert all(not p.requires_grad and p.grad is None for p in loaded.model.parameters())


def test_mlp_channel_score_sums_gate_up_and_down_by_hand(decoders):
    loaded = decoders["qwen2"]
    ex = examples_of(loaded)
    calibration = batches(ex, 6, 16, seed=0)
    (inputs, targets), = calibration
    a, layer, unit = loaded.adapter, 2, 5
    mats = [(a.ffn_gate(layer).weight, (unit,)), (a.ffn_in(layer).weight, (unit,)),
            (a.ffn_out(layer).weight, (slice(None), unit))]
    loaded.model.requires_grad_(True)
    grads = torch.autograd.grad(hand_loss(loaded, inputs, targets), [p for p, _ in mats])
    loaded.model.requires_grad_(False)
    per_member = [float((g * p)[idx].abs().sum()) for (p, idx), g in zip(mats, grads)]
    for how, expected in (("sum", sum(per_member)), ("max", max(per_member)), ("last", per_member[-1]),
                          ("prod", per_member[0] * per_member[1] * per_member[2])):
        got = float(group_scores(loaded, ex, calibration, aggregation=how).mlp[layer, unit])
        assert got == pytest.approx(expected, rel=1e-4), how


def test_aggregations_of_a_hand_made_group():
    members = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.5, 1.0], [2.0, 4.0, 5.0]])  # 3 members, 3 groups
    assert aggregate(members, "sum").tolist() == [6.0, 6.5, 6.0]
    assert aggregate(members, "prod").tolist() == [6.0, 4.0, 0.0]
    assert aggregate(members, "max").tolist() == [3.0, 4.0, 5.0]
    assert aggregate(members, "last").tolist() == [2.0, 4.0, 5.0]
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(members, "mean")


# ----------------------------------------------------------------------------- LLM-Pruner: coupled groups


@pytest.mark.parametrize("arch", ["bert", "llama", "qwen2"])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_llm_pruner_removes_coupled_groups_and_prunes_to_the_gated_model(arch, scope, decoders, encoder):
    loaded = encoder if arch == "bert" else decoders[arch]
    shape = GateShape.of(loaded)
    dense_first = 0.5 if arch == "bert" else 0.34  # layer 0 stays dense (bert: 2 layers, decoders: 3)
    options = LLMPrunerOptions(target_sparsity=0.3, dense_first=dense_first, dense_last=0.0, scope=scope)
    c = context(loaded)
    state = LLMPruner(options, c).prune()
    layers = pruned_layers(shape.layers, dense_first, 0.0)
    assert layers == list(range(1, shape.layers))
    assert bool((state.head[0] == 1).all()) and bool((state.intermediate[0] == 1).all())
    groups = state.head.reshape(shape.layers, shape.kv_heads, shape.group_size)
    assert bool((groups == groups[..., :1]).all())  # a KV group goes with all its query heads
    assert state.hidden.min() == 1 and state.mha.min() == 1 and state.ffn.min() == 1
    assert exact_sparsity(state, model=c.sizes) == pytest.approx(0.3, abs=0.03)
    if scope == "layer":  # block-wise: the same count in every pruned layer
        assert len({int(state.intermediate[layer].sum()) for layer in layers}) == 1
    scores = group_scores(loaded, c.examples, batches(c.examples, 10, 16, 0), layers=layers)
    kept = groups[..., 0] > 0
    for layer in layers:  # the kept groups are the most important ones
        s, k = scores.attention[layer], kept[layer]
        if scope == "layer" and (~k).any():
            assert s[k].min() >= s[~k].max()
        u, ku = scores.mlp[layer], state.intermediate[layer] > 0
        if scope == "layer":
            assert u[ku].min() >= u[~ku].max()
    batch = c.examples.batch(list(range(4)))[0]
    assert_pruned_equals_gated(loaded, state, batch)


def test_llm_pruner_refuses_a_range_without_layers(encoder):
    with pytest.raises(ValueError, match="no layer to prune"):
        LLMPruner.check_model(LLMPrunerOptions(dense_first=0.5, dense_last=0.5), encoder)


# ----------------------------------------------------------------------------- Minitron: activation scores


def recorded(loaded, examples, batch):
    """Activations of one padded batch recorded here: W_O inputs, FFN-out inputs, norm outputs."""
    a = loaded.adapter
    seen: dict[str, list[torch.Tensor]] = {"head": [], "neuron": [], "norm": []}
    handles = [a.attention_output(i).register_forward_pre_hook(lambda m, x: seen["head"].append(x[0]))
               for i in range(len(a.layers))]
    handles += [a.ffn_out(i).register_forward_pre_hook(lambda m, x: seen["neuron"].append(x[0]))
                for i in range(len(a.layers))]
    handles += [n.register_forward_hook(lambda m, x, y: seen["norm"].append(y)) for n in stream_norms(loaded)]
    logits(loaded, batch[0])
    for h in handles:
        h.remove()
    return seen


def modelopt(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ModelOpt's aggregation by hand, example by example: mean |x| over the real tokens, L2 over examples."""
    means = [x[b][mask[b].bool()].abs().mean(0) for b in range(x.shape[0])]
    return torch.stack(means).pow(2).sum(0).sqrt()


@pytest.mark.parametrize("arch", ["bert", "qwen2"])
def test_minitron_width_scores_equal_the_recorded_activations(arch, decoders, encoder):
    loaded = encoder if arch == "bert" else decoders[arch]
    shape = GateShape.of(loaded)
    ex = classification_examples(loaded, rows(), 32) if arch == "bert" else \
        text_examples(loaded, [" ".join(WORDS[: 4 + 3 * i]) for i in range(6)], 32)  # unequal lengths: padding
    batch = ex.batch(list(range(6)))
    mask = batch[0]["attention_mask"]
    assert not bool(mask.all())
    seen = recorded(loaded, ex, batch)
    scores = width_scores(loaded, ex, [batch])
    head = torch.stack([modelopt(x, mask).reshape(shape.heads, shape.head_dim).norm(dim=1) for x in seen["head"]])
    torch.testing.assert_close(scores.head, head, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(scores.intermediate, torch.stack([modelopt(x, mask) for x in seen["neuron"]]),
                               rtol=1e-4, atol=1e-6)
    assert len(seen["norm"]) == (2 * shape.layers if loaded.is_decoder else 2 * shape.layers + 1)
    torch.testing.assert_close(scores.hidden, sum(modelopt(y, mask) for y in seen["norm"]), rtol=1e-4, atol=1e-6)
    groups = scores.groups(shape.group_size)  # GQA: a group is the L2 norm of its heads
    torch.testing.assert_close(groups[:, 1], head[:, shape.group_size:2 * shape.group_size].norm(dim=1))
    # the same batch split in two gives the same scores (sums of squares over examples)
    torch.testing.assert_close(width_scores(loaded, ex, [ex.batch([0, 1, 2]), ex.batch([3, 4, 5])]).head, head,
                               rtol=1e-4, atol=1e-6)


def test_minitron_layer_scores_by_hand(decoders):
    loaded = decoders["llama"]
    ex = documents(loaded)
    batch = ex.batch(list(range(4)))
    with torch.no_grad():
        hidden = loaded.lm(**batch[0], output_hidden_states=True).hidden_states  # the inputs of layers 0, 1, 2
    bi = layer_scores(loaded, ex, [batch], "bi")
    real = batch[0]["attention_mask"].bool()
    assert not bool(real.all())  # padding is left out
    for layer in range(2):  # the last entry of hidden_states is after the final norm
        expected = 1 - F.cosine_similarity(hidden[layer], hidden[layer + 1], dim=-1)[real].mean()
        assert float(bi[layer]) == pytest.approx(float(expected), rel=1e-4)
    loss = layer_scores(loaded, ex, [batch], "loss")
    shape = GateShape.of(loaded)
    for layer in range(shape.layers):  # the model with the layer cut out, transformers' own loss
        kept = torch.ones(shape.layers)
        kept[layer] = 0
        dropped = prune(loaded, GateState.dense(loaded).replace(mha=kept, ffn=kept))
        with torch.no_grad():
            expected = hand_loss(dropped, batch[0], None)
        assert float(loss[layer]) == pytest.approx(float(expected), rel=1e-4)


@pytest.mark.parametrize("arch", ["bert", "llama", "gemma3"])
def test_minitron_width_and_depth_reach_the_same_size(arch, decoders, encoder):
    loaded = encoder if arch == "bert" else decoders[arch]
    shape = GateShape.of(loaded)
    c = context(loaded)
    target = 1 / shape.layers  # one layer's worth
    states = {axis: Minitron(MinitronOptions(target_sparsity=target, axis=axis, calibration_examples=12), c).prune()
              for axis in ("width", "depth", "both")}
    sizes = SizeModel.of(loaded)
    width, depth = (exact_sparsity(states[a], model=sizes) for a in ("width", "depth"))
    assert depth == pytest.approx(target, abs=0.02)  # exactly one layer removed
    assert int((states["depth"].mha == 0).sum()) == 1 and bool((states["depth"].mha == states["depth"].ffn).all())
    assert width == pytest.approx(depth, abs=0.05)  # width's granularity: a head, a neuron, a hidden channel
    assert states["width"].mha.min() == 1 and states["width"].hidden.min() == 0
    bi = layer_scores(loaded, c.examples, batches(c.examples, 12, 8, 0), "bi")
    assert int(torch.argmin(bi)) == int(torch.nonzero(states["depth"].mha == 0))  # the least influential layer
    both = states["both"]
    assert exact_sparsity(both, model=sizes) == pytest.approx(target, abs=0.1)
    batch = c.examples.batch(list(range(4)))[0]
    for state in states.values():
        assert_pruned_equals_gated(loaded, state, batch)


def test_minitron_gqa_heads_stay_in_every_group_or_groups_go(decoders):
    loaded = decoders["qwen2"]  # 6 query heads in 2 KV groups of 3
    c = context(loaded)
    heads = Minitron(MinitronOptions(target_sparsity=0.4, hidden=False), c).prune()
    groups = Minitron(MinitronOptions(target_sparsity=0.4, hidden=False, gqa="groups"), c).prune()
    per_group = heads.head.reshape(3, 2, 3).sum(2)
    assert bool((per_group == per_group[0, 0]).all()) and 0 < per_group[0, 0] < 3  # the same count in each group
    g = groups.head.reshape(3, 2, 3)
    assert bool((g == g[..., :1]).all())  # whole groups
    assert heads.hidden.min() == 1
    electra = SimpleNamespace(source="electra", adapter=SimpleNamespace(base=SimpleNamespace(embeddings_project=None)))
    with pytest.raises(ValueError, match="ELECTRA"):  # an embedding projection: no hidden channels to prune
        Minitron.check_model(MinitronOptions(), electra)
    Minitron.check_model(MinitronOptions(hidden=False), electra)
    assert Minitron.distills_always


# ----------------------------------------------------------------------------- whole runs through the CLI


LABEL_MAP = "pos=fresh,neg=rotten"  # the reviews fixture's labels as a prompted decoder's labels
SMALL = ["--batch-size", "8", "--eval-every", "10", "--eval-budget", "1", "--eval-examples", "8", "--threads", "1"]


@pytest.mark.parametrize("method, extra", [("llm-pruner", ["--dense-first", "0"]),
                                           ("minitron", ["--axis", "both", "--calibration-examples", "16"])])
@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_a_run_through_the_cli_exports_what_the_gates_prune_to(method, extra, kind, tiny_dir, tiny_decoders, reviews,
                                                              tmp_path, monkeypatch):
    monkeypatch.setenv("HEADLAB_HOME", str(tmp_path))
    folder = tiny_dir if kind == "encoder" else tiny_decoders["llama"]
    data = ["--data", str(reviews)] + ([] if kind == "encoder" else ["--label-map", LABEL_MAP])
    assert main(["train", "--model", str(folder), *data, "--method", method, "--target-sparsity", "0.3",
                 "--finetune-steps", "0", *extra, *SMALL]) == 0
    run = RunStore().list()[0]
    assert run.status == "done", run.error
    state = RunStore().gates(run.id, 0)
    base = load_model(str(folder))
    assert exact_sparsity(state, model=SizeModel.of(base)) == pytest.approx(0.3, abs=0.08)
    exported = load_pruned(run.result["export"])
    ex = examples_of(base)
    batch = ex.batch(list(range(4)))[0]
    torch.testing.assert_close(logits(exported, batch), logits(prune(base, state), batch), atol=1e-5, rtol=1e-4)


def test_an_llm_pruner_run_recovers_with_lora_on_a_decoder(tiny_decoders, reviews, tmp_path, monkeypatch):
    monkeypatch.setenv("HEADLAB_HOME", str(tmp_path))
    assert main(["train", "--model", str(tiny_decoders["llama"]), "--data", str(reviews), "--label-map", LABEL_MAP,
                 "--method", "llm-pruner", "--target-sparsity", "0.3", "--dense-first", "0",
                 "--dense-last", "0", "--second-order", "--finetune-steps", "3", "--lora", "--lr", "1e-4",
                 "--no-distill", *SMALL]) == 0
    run = RunStore().list()[0]
    assert run.status == "done", run.error
    assert run.result["parameters"] < run.result["dense_parameters"]
    assert load_pruned(run.result["export"]).is_decoder
