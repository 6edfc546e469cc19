"""Depth pruning (`depth`: ShortGPT's Block Influence, Shortened LLaMA's removal loss and Taylor+) and LaCo's
layer collapse (`laco`) on tiny encoders and decoders: each criterion removes exactly the blocks of lowest
score computed here independently (hidden states of transformers, physically sliced models, .grad from
backward), Taylor+ never removes its protected blocks, removed blocks are sliced to zero width and the
sliced model computes what the gated one does; the RDSC merge by hand on constant weights, the similarity
check accepting / rejecting at T, and runs of both through the CLI that export and load back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from core.adapter import GateShape
from core.data import TextDataset
from core.models import load_model
from core.pruned import load_pruned
from pruning.__main__ import main
from pruning.blocks import block_state, protected_blocks, removal_count
from pruning.calibration import batches, stream
from pruning.examples import text_examples
from pruning.gate_state import GateState
from pruning.hooks import gated
from pruning.layer_merge import Search, merge_into, merged_tensors, search, working_copy
from pruning.methods.base import MethodContext
from pruning.methods.depth import CALIBRATION_BATCH, Depth, DepthOptions
from pruning.methods.laco import Laco, LacoOptions
from pruning.runs import RunStore
from pruning.session import classification_examples
from pruning.size import SizeModel, exact_sparsity
from pruning.surgery import prune
from tests import conftest

SMALL = ["--batch-size", "8", "--eval-every", "10", "--eval-budget", "1", "--eval-examples", "8"]
TEXTS = [f"a {w} film number {i} with {'some ' * (i % 4)}words" for i in range(12) for w in ("great", "awful")]
WORDS = "the cat sat on the mat and the dog ran in the park while the birds sang".split()
DOCUMENTS = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(6 + i % 5)) for i in range(12)]


@pytest.fixture(scope="module")
def encoder4_dir(tmp_path_factory) -> Path:
    """A tiny random BERT classifier with 4 layers (the shared one has 2)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(conftest.TINY, "num_hidden_layers", 4)
        return conftest.make_tiny(tmp_path_factory.mktemp("enc4") / "model", seed=3)


@pytest.fixture(scope="module")
def encoder4(encoder4_dir):
    return load_model(str(encoder4_dir))


@pytest.fixture(scope="module")
def decoders(tiny_decoders):
    return {arch: load_model(str(folder)) for arch, folder in tiny_decoders.items()}


def encoder_examples(loaded):
    data = TextDataset(texts=TEXTS, labels=[i % 2 for i in range(len(TEXTS))], label_names=list(loaded.label_names),
                       name="toy")
    return classification_examples(loaded, data, 32)


def lm_examples(loaded):
    return text_examples(loaded, DOCUMENTS, 16)


def context(loaded, examples) -> MethodContext:
    return MethodContext(base=loaded, teacher=loaded, train=None, device=torch.device("cpu"), seed=0,
                         progress=lambda *a: None, examples=examples)


CALIBRATION = 4  # examples the tests score on (one batch; the default 10 triples the cost)


def calibration(examples, n: int = CALIBRATION):
    return batches(examples, n, CALIBRATION_BATCH, 0)  # what the methods draw with seed 0


def removed(state: GateState) -> list[int]:
    closed = (state.mha == 0) & (state.ffn == 0)
    assert torch.equal(state.mha == 0, closed) and torch.equal(state.ffn == 0, closed)  # whole blocks only
    assert state.head.all() and state.intermediate.all() and state.hidden.all()
    return [int(i) for i in torch.nonzero(closed).flatten()]


def lowest(scores: list[float], n: int, allowed=None) -> list[int]:
    allowed = range(len(scores)) if allowed is None else allowed
    return sorted(sorted(allowed, key=lambda i: scores[i])[:n])


# ----------------------------------------------------------------------------- scores computed here

def hand_bi(loaded, examples) -> list[float]:
    """1 - mean cos(h_i, h_i+1) over real tokens, from transformers' own hidden_states (a decoder's last entry
    is after its final norm: read from a copy whose final norm is the identity)."""
    if loaded.is_decoder:
        loaded = working_copy(loaded, "no final norm")
        name = next(n for n, m in loaded.adapter.base.named_modules() if m is loaded.adapter.final_norm)
        setattr(loaded.adapter.base, name, torch.nn.Identity())
    layers = GateShape.of(loaded).layers
    sums, tokens = [0.0] * layers, 0
    for inputs, _ in calibration(examples):
        with torch.no_grad():
            hs = loaded.adapter.base(**inputs, output_hidden_states=True).hidden_states
        real = inputs["attention_mask"].bool()
        for i in range(layers):
            a, b = hs[i][real], hs[i + 1][real]
            sums[i] += float(((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).sum())
        tokens += int(real.sum())
    return [1 - x / tokens for x in sums]


def hand_loss(model_logits, examples) -> float:
    """Mean CE over the calibration set: class CE per example, or next-token CE per real token."""
    total, count = 0.0, 0
    for inputs, targets in calibration(examples):
        with torch.no_grad():
            logits = model_logits(inputs)
        if examples.language_modelling:
            mask = inputs["attention_mask"][:, 1:].bool() & inputs["attention_mask"][:, :-1].bool()
            nll = F.cross_entropy(logits[:, :-1][mask], inputs["input_ids"][:, 1:][mask], reduction="sum")
            total, count = total + float(nll), count + int(mask.sum())
        else:
            total, count = total + float(F.cross_entropy(logits, targets, reduction="sum")), count + len(targets)
    return total / count


def logits_of(loaded, examples):
    if examples.language_modelling:
        return lambda inputs: loaded.lm(**inputs, use_cache=False).logits
    return lambda inputs: loaded.model(**inputs).logits


def hand_ppl(loaded, examples) -> list[float]:
    """The loss of the physically sliced model without block i, for every i."""
    shape = GateShape.of(loaded)
    out = []
    for layer in range(shape.layers):
        keep = torch.ones(shape.layers)
        keep[layer] = 0
        sliced = prune(loaded, GateState.dense(shape).replace(mha=keep, ffn=keep))
        out.append(hand_loss(logits_of(sliced, examples), examples))
    return out


def hand_taylor(loaded, examples) -> list[float]:
    """sum over each block's *weight parameters of |sum_batches W * grad| with .grad from backward on a copy."""
    copied = working_copy(loaded, "taylor")
    copied.model.requires_grad_(True)
    blocks = [[p for n, p in layer.named_parameters() if n.endswith("weight")] for layer in copied.adapter.layers]
    total = [[torch.zeros_like(p, dtype=torch.float64) for p in block] for block in blocks]
    for inputs, targets in calibration(examples):
        copied.model.zero_grad()
        logits = logits_of(copied, examples)(inputs)
        if examples.language_modelling:
            mask = inputs["attention_mask"][:, 1:].bool() & inputs["attention_mask"][:, :-1].bool()
            loss = F.cross_entropy(logits[:, :-1][mask], inputs["input_ids"][:, 1:][mask])
        else:
            loss = F.cross_entropy(logits, targets)
        loss.backward()
        for block, sums in zip(blocks, total):
            for p, acc in zip(block, sums):
                acc += (p.detach() * p.grad).double()
    return [sum(float(acc.abs().sum()) for acc in sums) for sums in total]


# ----------------------------------------------------------------------------- depth

def depth_state(loaded, examples, **options) -> GateState:
    return Depth(DepthOptions(calibration_examples=CALIBRATION, **options), context(loaded, examples)).prune()


@pytest.mark.parametrize("criterion", ["bi", "ppl", "taylor"])
def test_depth_removes_the_lowest_scoring_blocks_of_an_encoder(criterion, encoder4):
    examples = encoder_examples(encoder4)
    assert (calibration(examples)[0][0]["attention_mask"] == 0).any()  # padding in the batch: left out
    scores = {"bi": hand_bi, "ppl": hand_ppl, "taylor": hand_taylor}[criterion](encoder4, examples)
    options = dict(depth_criterion=criterion, protect_first=1, protect_last=0)  # Taylor+ keeps block 0 only
    allowed = range(1, 4) if criterion == "taylor" else None
    for n in (1, 2):
        assert removed(depth_state(encoder4, examples, blocks=n, **options)) == lowest(scores, n, allowed)
    assert len(set(scores)) == 4  # distinct scores: the ranking is not decided by ties


@pytest.mark.parametrize("criterion", ["bi", "ppl", "taylor"])
def test_depth_removes_the_lowest_scoring_blocks_of_a_decoder_on_text(criterion, decoders):
    loaded = decoders["llama"]
    examples = lm_examples(loaded)
    scores = {"bi": hand_bi, "ppl": hand_ppl, "taylor": hand_taylor}[criterion](loaded, examples)
    assert len(set(scores)) == 3
    for n in (1, 2):
        state = depth_state(loaded, examples, depth_criterion=criterion, blocks=n, protect_first=0, protect_last=0)
        assert removed(state) == lowest(scores, n)


def test_the_block_count_gives_the_sparsity_closest_to_the_target(encoder4):
    shape, sizes = GateShape.of(encoder4), SizeModel.of(encoder4)
    order = [2, 0, 3, 1]
    sparsity = [exact_sparsity(block_state(shape, order[:n]), model=sizes) for n in range(5)]
    step = (1 - sparsity[0]) / 4  # each block holds a quarter of the counted weights (dense: biases, norms)
    assert sparsity == pytest.approx([sparsity[0] + n * step for n in range(5)]) and 0 < sparsity[0] < 0.05
    for target, want in ((0.1, 0), (0.2, 1), (0.3, 1), (0.49, 2), (0.7, 3), (0.95, 4)):
        assert removal_count(order, shape, sizes, target) == want
    examples = encoder_examples(encoder4)
    bi = hand_bi(encoder4, examples)
    assert removed(depth_state(encoder4, examples, target_sparsity=0.3)) == lowest(bi, 1)
    assert removed(depth_state(encoder4, examples, target_sparsity=0.6)) == lowest(bi, 2)
    assert len(removed(depth_state(encoder4, examples, target_sparsity=0.99))) == 3  # one block always stays


def test_taylor_plus_never_removes_its_protected_blocks(encoder4, decoders):
    assert protected_blocks(32) == [0, 1, 2, 3, 30, 31]
    assert protected_blocks(8, 4, 2) == [0, 1, 2, 3, 6, 7]
    assert protected_blocks(4) == [0, 1, 2] and protected_blocks(3) == [0, 1] and protected_blocks(2) == [0]
    assert protected_blocks(4, 1, 1) == [0, 3]
    examples = encoder_examples(encoder4)
    scores = hand_taylor(encoder4, examples)
    for target in (0.25, 0.5, 0.99):  # however many the target asks for: only blocks 1 and 2 may go
        got = removed(depth_state(encoder4, examples, depth_criterion="taylor", target_sparsity=target,
                                  protect_first=1, protect_last=1))
        assert set(got) <= {1, 2} and got == lowest(scores, len(got), [1, 2])
    assert removed(depth_state(encoder4, examples, depth_criterion="taylor", blocks=1)) == [3]  # defaults: 0-2 kept
    with pytest.raises(ValueError, match="at most 2 may go"):
        Depth.check_model(DepthOptions(depth_criterion="taylor", blocks=3, protect_first=1, protect_last=1), encoder4)
    with pytest.raises(ValueError, match="at most 2 may go"):
        Depth.check_model(DepthOptions(blocks=3), decoders["llama"])


@pytest.mark.parametrize("arch", ["bert", "llama", "qwen2", "gemma3"])
def test_removed_blocks_are_sliced_away_and_gated_equals_pruned(arch, encoder4, decoders):
    loaded = encoder4 if arch == "bert" else decoders[arch]
    examples = encoder_examples(loaded) if arch == "bert" else lm_examples(loaded)
    state = depth_state(loaded, examples, depth_criterion="ppl", blocks=2)
    gone = removed(state)
    pruned = prune(loaded, state)
    a = pruned.adapter
    assert len(a.layers) == len(loaded.adapter.layers)  # the block's module stays ...
    for layer in gone:  # ... with no attention and no FFN weights: only its norms run
        for part in ("query", "key", "value", "attention_output", "ffn_in", "ffn_out"):
            assert getattr(a, part)(layer).weight.numel() == 0, (layer, part)
    assert sum(p.numel() for p in pruned.model.parameters()) < sum(p.numel() for p in loaded.model.parameters())
    inputs, _ = calibration(examples)[0]
    run = logits_of(pruned, examples)
    with torch.no_grad():
        got = run(inputs)
        with gated(loaded, state):
            want = logits_of(loaded, examples)(inputs)
        mask = inputs["attention_mask"].bool()
        if got.dim() == 3:
            got, want = got[mask], want[mask]
        assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
        states = stream(pruned, examples, (inputs, None))
        for layer in gone:
            x, y = states[layer][mask], states[layer + 1][mask]
            if loaded.is_decoder:  # pre-norm: a removed block is the identity
                assert torch.equal(x, y)
            else:  # post-LayerNorm: x -> LN_ffn(LN_attn(x))
                assert torch.allclose(y, a.ffn_norm(layer)(a.attention_norm(layer)(x)), atol=1e-5)


# ----------------------------------------------------------------------------- LaCo

def fill_constant(loaded, value_of_layer) -> dict[str, torch.Tensor]:
    """Set every merged tensor of layer l to value_of_layer(l); returns the norm tensors before, by name."""
    with torch.no_grad():
        for layer in range(len(loaded.adapter.layers)):
            for t in merged_tensors(loaded.adapter, layer):
                t.fill_(value_of_layer(layer))
    return {n: p.detach().clone() for n, p in loaded.model.named_parameters() if "norm" in n.lower()}


@pytest.mark.parametrize("arch", ["bert", "qwen2"])
def test_the_rdsc_merge_of_three_layers_by_hand(arch, tiny_decoders, tmp_path):
    """theta_0 = 1, theta_1 = 2, theta_2 = 3 everywhere: theta*_0 = 1 + (2 - 1) + (3 - 1) = 4 (the notebook's
    in-place add_ would give 3: a plain drop). Norms keep layer 0's own values; the original is untouched."""
    if arch == "bert":
        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(conftest.TINY, "num_hidden_layers", 3)
            folder = conftest.make_tiny(tmp_path / "enc3")
    else:
        folder = tiny_decoders[arch]
    loaded = load_model(str(folder))
    assert len(merged_tensors(loaded.adapter, 0)) == (12 if arch == "bert" else 10)  # 6 x (W, b); 7 W + q/k/v b
    with torch.no_grad():
        for layer in range(3):
            for t in merged_tensors(loaded.adapter, layer):
                t.fill_(layer + 1.0)
    norms = {n: p.detach().clone() for n, p in loaded.model.named_parameters() if "norm" in n.lower()}
    assert norms
    work = working_copy(loaded, "test")
    merge_into(work.adapter, 0, [1, 2])
    for layer, value in ((0, 4.0), (1, 2.0), (2, 3.0)):
        for t in merged_tensors(work.adapter, layer):
            assert torch.equal(t, torch.full_like(t, value)), layer
    for t in merged_tensors(loaded.adapter, 0):
        assert torch.equal(t, torch.ones_like(t))
    for n, p in work.model.named_parameters():
        if n in norms:
            assert torch.equal(p, norms[n]), n


def hand_similarity(reference, candidate, examples, n: int) -> float:
    """Mean over examples of the cosine of the flattened last hidden states (real tokens), transformers' own
    last_hidden_state (a decoder's after its final norm)."""
    cosines = []
    for inputs, _ in calibration(examples, n):
        with torch.no_grad():
            a = reference.adapter.base(**inputs).last_hidden_state
            b = candidate.adapter.base(**inputs).last_hidden_state
        for row in range(len(a)):
            real = inputs["attention_mask"][row].bool()
            x, y = a[row][real].flatten(), b[row][real].flatten()
            cosines.append(float(x @ y / (x.norm() * y.norm())))
    return sum(cosines) / len(cosines)


@pytest.mark.parametrize("arch", ["bert", "llama", "gemma3"])
def test_the_similarity_check_accepts_above_t_and_rejects_at_or_below(arch, encoder4, decoders):
    loaded = encoder4 if arch == "bert" else decoders[arch]
    examples = encoder_examples(loaded) if arch == "bert" else lm_examples(loaded)
    layers = len(loaded.adapter.layers)
    start = layers - 1 - 2  # H = last, C = 2: layer H - C merged with the one above it
    # the candidate by hand: layer `start` gets theta + (theta_above - theta) = theta_above, the other slices off
    expected = working_copy(loaded, "by hand")
    with torch.no_grad():
        for t, above in zip(merged_tensors(expected.adapter, start), merged_tensors(loaded.adapter, start + 1)):
            t.copy_(t + (above - t))
    shape = GateShape.of(loaded)
    keep = torch.ones(shape.layers)
    keep[start + 1] = 0
    candidate = prune(expected, GateState.dense(shape).replace(mha=keep, ffn=keep))
    s = hand_similarity(loaded, candidate, examples, 5)
    assert 0.0 < s < 1 - 1e-6
    margin = min(1e-4, (1 - s) / 4)
    options = dict(merge_layers=2, target_sparsity=0.0, lowest_layer=start)  # one candidate, then l < L
    accepted = Laco(LacoOptions(similarity_threshold=s - margin, **options), context(loaded, examples)).prune()
    assert removed(accepted.state) == [start + 1]
    for t, want in zip(merged_tensors(accepted.source.adapter, start), merged_tensors(expected.adapter, start)):
        assert torch.equal(t, want)
    sliced = prune(accepted.source, accepted.state)
    assert hand_similarity(loaded, sliced, examples, 5) == pytest.approx(s, abs=1e-7)
    rejected = Laco(LacoOptions(similarity_threshold=s + margin, **options), context(loaded, examples)).prune()
    assert removed(rejected.state) == []
    for t, want in zip(merged_tensors(rejected.source.adapter, start), merged_tensors(loaded.adapter, start)):
        assert torch.equal(t, want)  # a rejected merge is undone
    cal = calibration(examples, 5)
    steps = search(loaded, examples, cal, Search(merge_layers=2, lowest=start, threshold=0.0)).steps
    at_t = search(loaded, examples, cal, Search(merge_layers=2, lowest=start, threshold=steps[0].similarity)).steps
    assert steps[0].accepted and not at_t[0].accepted  # s > T, strictly


def test_the_laco_loop_steps_down_on_the_merged_model_and_stops_at_the_target(encoder4):
    examples = encoder_examples(encoder4)
    cal = calibration(examples, 5)
    both = search(encoder4, examples, cal, Search(merge_layers=2, threshold=-1.0))
    # l = 3 - 2 = 1 merges layer 2 into 1; l = 0 merges the current layer above it, the merged 1
    assert [(s.layer, s.merged, s.accepted) for s in both.steps] == [(1, [2], True), (0, [1], True)]
    assert both.removed == [1, 2]
    originals = [merged_tensors(encoder4.adapter, layer) for layer in range(3)]
    for t, t0, t1, t2 in zip(merged_tensors(both.source.adapter, 0), *originals):
        merged_1 = t1 + (t2 - t1)
        assert torch.equal(t, t0 + (merged_1 - t0))  # theta*_0 = theta_0 + (theta*_1 - theta_0), theta*_1 ~ theta_2
        assert torch.allclose(t, t2, atol=1e-7)
    one = search(encoder4, examples, cal, Search(merge_layers=2, threshold=-1.0, target=0.2))
    assert one.removed == [2] and len(one.steps) == 1  # one block (25%) meets the target: stop
    wide = search(encoder4, examples, cal, Search(merge_layers=3, threshold=-1.0, target=0.2))
    assert wide.removed == [1] and wide.steps[0].merged == [1]  # the last merge takes only what the target needs
    with pytest.raises(ValueError, match="H - C"):
        Laco.check_model(LacoOptions(merge_layers=4), encoder4)
    with pytest.raises(ValueError, match="does not exist"):
        Laco.check_model(LacoOptions(merge_layers=2, highest_layer=4), encoder4)


# ----------------------------------------------------------------------------- through the CLI

def run_and_export(args: list[str], tmp_path: Path):
    assert main(["train", *args, "--finetune-steps", "2", *SMALL]) == 0
    run = RunStore().list()[0]
    assert run.status == "done", run.error
    out = tmp_path / f"exported-{run.id}"
    assert main(["runs", "export", str(run.id), "--out", str(out)]) == 0
    again, trained = load_model(str(out)), load_pruned(run.run_dir / "model")
    batch = trained.tokenizer(["a great film", "an awful film that goes on"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(again.model(**batch).logits, trained.model(**batch).logits)
    return run, RunStore().gates(run.id, 0), trained


def test_depth_and_laco_through_the_cli_on_an_encoder(encoder4_dir, encoder4, reviews, tmp_path, monkeypatch):
    monkeypatch.setenv("HEADLAB_HOME", str(tmp_path))
    model = ["--model", str(encoder4_dir), "--data", str(reviews)]
    run, state, trained = run_and_export([*model, "--method", "depth", "--depth-criterion", "bi",
                                          "--target-sparsity", "0.5"], tmp_path)
    assert run.config["options"]["depth_criterion"] == "bi" and len(removed(state)) == 2
    assert trained.architecture().parameters < encoder4.architecture().parameters
    run, state, trained = run_and_export([*model, "--method", "laco", "--merge-layers", "3",
                                          "--similarity-threshold", "-1", "--target-sparsity", "0"], tmp_path)
    assert removed(state) == [1, 2]  # l = 3 - 3 = 0: layers 1, 2 merged into 0


def test_depth_and_laco_through_the_cli_on_a_decoder(tiny_decoders, decoders, reviews, tmp_path, monkeypatch):
    monkeypatch.setenv("HEADLAB_HOME", str(tmp_path))
    model = ["--model", str(tiny_decoders["llama"]), "--data", str(reviews), "--label-map", "pos=fresh,neg=rotten"]
    run, state, trained = run_and_export([*model, "--method", "depth", "--depth-criterion", "bi", "--blocks", "1",
                                          "--lora"], tmp_path)
    assert len(removed(state)) == 1 and trained.is_decoder
    run, state, trained = run_and_export([*model, "--method", "laco", "--merge-layers", "2",
                                          "--similarity-threshold", "-1"], tmp_path)
    assert removed(state) == [1]  # l = 2 - 2 = 0 merges layer 1 into 0 (a third of the blocks: target met)


def test_a_laco_run_without_fine_tune_exports_the_merged_model(encoder4_dir, encoder4, reviews, tmp_path,
                                                              monkeypatch):
    monkeypatch.setenv("HEADLAB_HOME", str(tmp_path))
    assert main(["train", "--model", str(encoder4_dir), "--data", str(reviews), "--method", "laco", "--merge-layers",
                 "3", "--similarity-threshold", "-1", "--target-sparsity", "0", "--finetune-steps", "0", *SMALL]) == 0
    run = RunStore().list()[0]
    exported = load_pruned(run.result["export"])
    expected = working_copy(encoder4, "by hand")
    with torch.no_grad():  # theta*_0 = theta_0 + (theta_1 - theta_0) + (theta_2 - theta_0), by hand
        for t, t1, t2 in zip(merged_tensors(expected.adapter, 0), merged_tensors(encoder4.adapter, 1),
                             merged_tensors(encoder4.adapter, 2)):
            t.copy_(t + ((t1 - t) + (t2 - t)))
    keep = torch.tensor([1.0, 0.0, 0.0, 1.0])
    state = GateState.dense(GateShape.of(encoder4)).replace(mha=keep, ffn=keep)
    batch = encoder4.tokenizer(["a great film", "an awful film that goes on"], return_tensors="pt", padding=True)
    with torch.no_grad(), gated(expected, state):
        want = expected.model(**batch).logits
    with torch.no_grad():
        assert torch.allclose(exported.model(**batch).logits, want, atol=1e-5)
