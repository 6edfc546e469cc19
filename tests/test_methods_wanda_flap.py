"""Wanda, Wanda-sp and FLAP: the invariants that make each method that method.

Wanda: every masked row loses exactly int(s * in) weights (2:4: 2 of every 4), the masks are those of
|W_ij| * ||X_j|| measured on the already pruned earlier layers (an independent layer-by-layer recomputation
through the whole model), they stay applied through a fine-tune. The layer-by-layer pass reproduces the
model's own forward. Wanda-sp: the same counts in every layer, layer 0's heads by the formula. FLAP: one
global sort of the standardised fluctuation, the compensated bias keeps each output projection's mean output
on the calibration set. All: the target sparsity, gated == pruned, a CLI run exports and loads back.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from core.models import load_model
from core.pruned import load_pruned
from pruning import calibration
from pruning.__main__ import main
from pruning.config import TrainConfig
from pruning.distributed import Dist
from pruning.gate_state import GateState
from pruning.hooks import gated
from pruning.methods.flap import Flap, FlapOptions, flap_scores
from pruning.methods.wanda import BATCH, layer_linears
from pruning.runs import RunStore
from pruning.sequential import editable_copy, sequential_prune
from pruning.session import Job, TrainSession
from pruning.size import exact_sparsity
from pruning.sparse_size import is_two_four, sparse_size, zero_masks
from pruning.surgery import prune
from tests.conftest import make_tiny

torch.set_num_threads(1)
LABEL_MAP = "pos=fresh,neg=rotten"
SMALL = ["--batch-size", "8", "--eval-every", "10", "--eval-budget", "1", "--eval-examples", "8"]
ARCHS = ["bert", "llama", "qwen2", "gemma3"]


@pytest.fixture(scope="module")
def folders(tiny_decoders, tmp_path_factory) -> dict[str, Path]:
    return {"bert": make_tiny(tmp_path_factory.mktemp("bert") / "model"), **tiny_decoders}


@pytest.fixture(scope="module")
def models(folders) -> dict[str, object]:
    return {arch: load_model(str(folder)) for arch, folder in folders.items()}


def session(arch: str, folders, models, reviews: Path, tmp_path: Path, method: str, **options) -> TrainSession:
    extra = {} if arch == "bert" else {"label_map": LABEL_MAP}
    config = TrainConfig.build(model=str(folders[arch]), data=str(reviews), method=method, batch_size=8,
                               finetune_steps=0, **extra, **options).check()
    job = Job(run_id=1, config=config.to_dict(), run_dir=tmp_path, attempt=1, resume=False)
    return TrainSession(config, job, None, None, models[arch], Dist())


def calibration_of(s: TrainSession, n: int = 64) -> list:
    return calibration.batches(s.examples, n, BATCH, s.c.seed)


def logits(loaded, batch) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(**batch).logits


# ----------------------------------------------------------------------------- the layer-by-layer pass


@pytest.mark.parametrize("arch", ARCHS)
def test_the_layer_by_layer_pass_sees_what_the_model_computes(arch, folders, models, reviews, tmp_path):
    """Nothing pruned: each layer's Linear inputs, rerun layer by layer from the recorded calls (Gemma3's
    sliding-window and global layers included), equal those of the whole model's forward."""
    s = session(arch, folders, models, reviews, tmp_path, "wanda")
    base, batches = s.base, calibration_of(s, 16)
    every = {n: m for i in range(len(base.adapter.layers)) for n, m in layer_linears(base, i).items()}
    whole = calibration.linear_inputs(base, s.examples, batches, every)
    seen = {}
    sequential_prune(base, s.examples, batches, lambda i: layer_linears(base, i), lambda i, stats: seen.update(stats))
    assert seen.keys() == whole.keys()
    for name, stats in seen.items():
        assert stats.n == whole[name].n > 0
        torch.testing.assert_close(stats.norm, whole[name].norm, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- Wanda


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_wanda_rows_lose_exactly_their_share_and_two_four_holds(arch, folders, models, reviews, tmp_path):
    for sparsity in (0.5, 0.25):
        result = session(arch, folders, models, reviews, tmp_path, "wanda", target_sparsity=sparsity).method.prune()
        assert result.state == GateState.dense(models[arch]) and result.source is None
        assert len(result.masks) == len(models[arch].adapter.layers) * (6 if arch == "bert" else 7)
        for name, mask in result.masks.items():
            assert mask.shape == models[arch].model.get_parameter(name).shape
            assert ((mask == 0).sum(1) == int(mask.shape[1] * sparsity)).all(), name
    result = session(arch, folders, models, reviews, tmp_path, "wanda", pattern="2:4").method.prune()
    assert all(is_two_four(mask) for mask in result.masks.values())
    size = sparse_size(models[arch].model, result.masks)
    assert size.sparsity == 0.5 and size.two_four_bytes < size.csr_bytes < 1.1 * size.dense_bytes


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_wanda_measures_each_layer_on_the_pruned_earlier_layers(arch, folders, models, reviews, tmp_path):
    """An independent recomputation: layer by layer, the Linear inputs of the whole model's forward with the
    earlier layers already masked, the |W| * ||X|| ranking of each row by topk. Scoring every layer on the
    dense model instead gives other masks after layer 0."""
    s = session(arch, folders, models, reviews, tmp_path, "wanda")
    result = s.method.prune()
    work, batches = editable_copy(s.base, "test"), calibration_of(s)
    dense_stats = calibration.linear_inputs(s.base, s.examples, batches, {
        n: m for i in range(len(s.base.adapter.layers)) for n, m in layer_linears(s.base, i).items()})
    differs = False
    for layer in range(len(work.adapter.layers)):
        linears = layer_linears(work, layer)
        stats = calibration.linear_inputs(work, s.examples, batches, linears)
        for name, module in linears.items():
            w = module.weight.detach()
            for source, expect_same in ((stats[name], True), (dense_stats[name], False)):
                scores = w.abs().double() * source.norm
                mask = torch.zeros_like(w).scatter_(1, scores.topk(w.shape[1] // 2, dim=1).indices, 1.0)
                if expect_same:
                    assert torch.equal(mask, result.masks[name]), name
                else:
                    differs |= not torch.equal(mask, result.masks[name])
            with torch.no_grad():
                module.weight.mul_(result.masks[name])
    assert differs


def test_wanda_masks_stay_applied_through_a_fine_tune(tiny_dir, reviews, tmp_path, monkeypatch):
    monkeypatch.setenv("HEADLAB_HOME", str(tmp_path))
    assert main(["train", "--model", str(tiny_dir), "--data", str(reviews), "--method", "wanda",
                 "--finetune-steps", "3", *SMALL]) == 0
    run = RunStore().list()[0]
    assert run.status == "done" and run.config["method"] == "wanda"
    exported, base = load_pruned(run.result["export"]), load_model(str(tiny_dir))
    config = TrainConfig.from_dict(run.config)
    s = TrainSession(config, Job(run_id=9, config=config.to_dict(), run_dir=tmp_path / "again", attempt=1,
                                 resume=False), None, None, base, Dist())
    masks = s.method.prune().masks  # the same seed: the run's masks
    moved = 0
    for name, mask in masks.items():
        w = exported.model.get_parameter(name).detach()
        assert (w[mask == 0] == 0).all() and (w[mask == 1] != 0).all(), name
        moved += int((w != base.model.get_parameter(name).detach() * mask).sum())
    assert moved > 0  # the fine-tune changed the kept weights
    read_back = zero_masks(exported.model)
    assert read_back.keys() == masks.keys() and all(torch.equal(read_back[n], m) for n, m in masks.items())
    assert sparse_size(exported.model, read_back).sparsity == 0.5
    assert f"Weight masks: {sparse_size(exported.model, read_back).describe()}" in run.final.note  # said in the record
    for extra in (["--lora"], ["--pattern", "2:4", "--target-sparsity", "0.6"]):
        assert main(["train", "--model", str(tiny_dir), "--data", str(reviews), "--method", "wanda", *extra]) == 2


def test_sparse_size_by_hand():
    model = nn.Linear(8, 4)  # weight (4, 8), bias (4,)
    mask = torch.tensor([[1, 1, 0, 0, 0, 1, 0, 1]] * 4, dtype=torch.float32)  # 4 of 8 per row, 2 per group of 4
    size = sparse_size(model, {"weight": mask})
    assert (size.elements, size.nonzeros, size.dense_bytes, size.other_bytes) == (32, 16, 128, 16)
    assert size.csr_bytes == 16 * (4 + 4) + 5 * 4  # values + column indices + row pointers
    assert size.two_four_bytes == 16 * 4 + 16 * 2 // 8  # values + 2-bit positions
    mask[0, :4] = torch.tensor([1, 1, 1, 0])
    assert sparse_size(model, {"weight": mask}).two_four_bytes is None
    with pytest.raises(ValueError, match="does not have"):
        sparse_size(model, {"missing": mask})


def test_zero_masks_name_a_tied_weight_as_named_parameters_does():
    """A decoder's LM head shares the embedding table: its mask must be named like the one parameter."""
    model = nn.ModuleDict({"embed": nn.Embedding(6, 4), "head": nn.Linear(4, 6, bias=False)})
    model["head"].weight = model["embed"].weight
    with torch.no_grad():
        model["embed"].weight[0, :2] = 0
    masks = zero_masks(model)
    assert list(masks) == ["embed.weight"] and int((masks["embed.weight"] == 0).sum()) == 2
    assert sparse_size(model, masks).nonzeros == 22


# ----------------------------------------------------------------------------- Wanda-sp and FLAP


def group_step(loaded) -> float:
    """Sparsity of closing every query head of layer 0's first KV group: the largest step one more
    closed unit (a head and, with it, its KV head) can make."""
    shape = GateState.dense(loaded).head.shape
    group = shape[1] // loaded.adapter.num_kv_heads(0)
    return exact_sparsity(GateState.from_closed_heads(loaded, [(0, h) for h in range(group)]))


CASES = [(m, a) for m in ("wanda-sp", "flap") for a in ARCHS]


@pytest.mark.parametrize("method,arch", CASES)
def test_structured_methods_reach_the_target_and_gated_equals_pruned(method, arch, folders, models, reviews,
                                                                     tmp_path):
    options = {"compensate": False} if method == "flap" and arch in ("qwen2", "gemma3") else {}
    s = session(arch, folders, models, reviews, tmp_path, method, target_sparsity=0.3, **options)
    result = s.method.prune()
    state, source = (result, None) if isinstance(result, GateState) else (result.state, result.source)
    layers = len(s.base.adapter.layers)
    tolerance = group_step(s.base) * (layers if method == "wanda-sp" else 1)
    assert abs(exact_sparsity(state, model=s.method.context.sizes) - 0.3) <= tolerance
    assert state.mha.eq(1).all() and state.ffn.eq(1).all() and state.hidden.eq(1).all()
    if method == "wanda-sp":  # the same share in every layer
        assert len(set(state.head.sum(1).tolist())) == 1 and len(set(state.intermediate.sum(1).tolist())) == 1
    source = source or s.base
    batch = s.examples.batch(list(range(8)))[0]
    with gated(source, state):
        expected = logits(source, batch)
    torch.testing.assert_close(logits(prune(source, state), batch), expected, rtol=1e-4, atol=1e-5)


def test_wanda_sp_scores_layer_zero_heads_by_the_formula(folders, models, reviews, tmp_path):
    s = session("llama", folders, models, reviews, tmp_path, "wanda-sp", target_sparsity=0.3)
    state = s.method.prune()
    o = s.base.adapter.attention_output(0)
    stats = calibration.linear_inputs(s.base, s.examples, calibration_of(s), {"o": o})["o"]
    scores = (o.weight.detach().abs().double() * stats.squares.sqrt()).mean(0).reshape(4, -1).sum(1)
    kept = state.head[0] > 0
    assert 0 < int(kept.sum()) < 4 and scores[kept].min() > scores[~kept].max()


def raw_inputs(loaded, examples, batches, module) -> torch.Tensor:
    """(tokens, in) every real token's input to `module` on `batches`."""
    rows = []
    handle = module.register_forward_pre_hook(lambda m, args: rows.append(args[0][current[0]]))
    current = [None]
    try:
        for batch in batches:
            current[0] = batch[0]["attention_mask"].bool()
            with torch.no_grad():
                calibration.run(loaded, examples, batch)
    finally:
        handle.remove()
    return torch.cat(rows).double()


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_flap_one_global_sort_and_bias_compensation(arch, folders, models, reviews, tmp_path):
    """Scores from the raw activations (torch.var): every kept head or unit outranks every closed one; the
    sliced output projections' mean output on the calibration tokens is the dense one (not without the
    compensation)."""
    s = session(arch, folders, models, reviews, tmp_path, "flap", target_sparsity=0.3)
    result = s.method.prune()
    state, a, batches = result.state, s.base.adapter, calibration_of(s)
    sliced, plain = prune(result.source, state), prune(s.base, state)
    heads, units, shifted = [], [], False
    for layer in range(len(a.layers)):
        for name, dense, gates in (("o", a.attention_output(layer), state.head[layer]),
                                   ("down", a.ffn_out(layer), state.intermediate[layer])):
            x = raw_inputs(s.base, s.examples, batches, dense)
            w = dense.weight.detach().double()
            fluctuation = x.var(0) * w.pow(2).sum(0)
            if name == "o":
                fluctuation = fluctuation ** 2
            z = (fluctuation - fluctuation.mean()) / fluctuation.std()
            (heads if name == "o" else units).append(z.reshape(len(gates), -1).mean(1))
            keep = gates.repeat_interleave(x.shape[1] // len(gates)) > 0
            want = dense(x.float()).double().mean(0)
            for model, same in ((sliced, True), (plain, False)):
                part = getattr(model.adapter, "attention_output" if name == "o" else "ffn_out")(layer)
                got = part(x[:, keep].float()).double().mean(0)
                if same:
                    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
                else:
                    shifted |= not torch.allclose(got, want, rtol=1e-4, atol=1e-5)
    stats = calibration.linear_inputs(s.base, s.examples, batches, {
        f"{i}.{k}": m for i in range(len(a.layers)) for k, m in (("o", a.attention_output(i)), ("down", a.ffn_out(i)))})
    method_heads, method_units = flap_scores(s.base, stats)
    torch.testing.assert_close(method_heads, torch.stack(heads))
    torch.testing.assert_close(method_units, torch.stack(units))
    scores = torch.cat([torch.stack(heads).reshape(-1), torch.stack(units).reshape(-1)])
    kept = torch.cat([state.head.reshape(-1), state.intermediate.reshape(-1)]) > 0
    assert 0 < int((~kept).sum()) and scores[kept].min() > scores[~kept].max()
    assert shifted


def test_flap_refuses_compensation_a_saved_model_cannot_keep(models):
    for arch in ("qwen2", "gemma3"):
        with pytest.raises(ValueError, match="compensate false"):
            Flap.check_model(FlapOptions(), models[arch])
        Flap.check_model(FlapOptions(compensate=False), models[arch])
    Flap.check_model(FlapOptions(), models["llama"])


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_a_flap_run_exports_and_loads_back_with_the_same_logits(arch, folders, models, reviews, tmp_path,
                                                                monkeypatch):
    monkeypatch.setenv("HEADLAB_HOME", str(tmp_path))
    extra = [] if arch == "bert" else ["--label-map", LABEL_MAP]
    assert main(["train", "--model", str(folders[arch]), "--data", str(reviews), "--method", "flap",
                 "--target-sparsity", "0.3", "--finetune-steps", "0", *extra, *SMALL]) == 0
    run = RunStore().list()[0]
    assert run.status == "done", run.error
    back = load_pruned(run.result["export"])
    s = session(arch, folders, models, reviews, tmp_path / "again", "flap", target_sparsity=0.3)
    result = s.method.prune()  # the same seed: the run's structure and biases
    expected = prune(result.source, result.state)
    batch = s.examples.batch(list(range(8)))[0]
    torch.testing.assert_close(logits(back, batch), logits(expected, batch), rtol=1e-4, atol=1e-5)
    biases = [back.adapter.attention_output(i).bias for i in range(len(back.adapter.layers))]
    assert all(b is not None for b in biases) and any(b.abs().sum() > 0 for b in biases)
