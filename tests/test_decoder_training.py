"""Training decoders: the language-modelling loss by hand, LoRA (only adapters and gates train, the merge
keeps the logits), CoFi and L0 steps on tiny random decoders, trained gates prune to the gated model,
the memory estimate of a decoder, and a whole LoRA run that exports plain weights."""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from core.adapter import Adapter, GateShape
from core.data import TextDataset
from core.models import load_model
from core.pruned import load_pruned
from pruning import memory
from pruning.config import TrainConfig
from pruning.distill import LayerMatcher, layer_outputs, rms_normalised
from pruning.distributed import Dist
from pruning.examples import text_examples
from pruning.gate_state import GateState
from pruning.hooks import gated
from pruning.loop import run_job
from pruning.lora import LoraSettings, add_lora, has_lora, lora_parameters, merge_lora, merged_copy
from pruning.losses import IGNORE, TaskLoss, next_token_targets
from pruning.runs import RunStore
from pruning.session import Job, TrainSession, classification_examples
from pruning.surgery import prune

torch.set_num_threads(1)
LABEL_MAP = "pos=fresh,neg=rotten"  # the reviews fixture's labels as a prompted decoder's default labels
SMALL = dict(batch_size=8, eval_every=10, eval_budget=1.0, eval_examples=8, checkpoint_every=1, lr=1e-3,
             label_map=LABEL_MAP)


@pytest.fixture(scope="module")
def decoders(tiny_decoders) -> dict[str, object]:
    return {arch: load_model(str(folder)) for arch, folder in tiny_decoders.items()}


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_model(str(tiny_dir))


def session(folder: Path, teacher, reviews: Path, tmp_path: Path, **overrides) -> TrainSession:
    config = TrainConfig.build(**{**SMALL, "model": str(folder), "data": str(reviews), **overrides}).check()
    job = Job(run_id=1, config=config.to_dict(), run_dir=tmp_path, attempt=1, resume=False)
    return TrainSession(config, job, None, None, teacher, Dist())


# ----------------------------------------------------------------------------- losses


def test_next_token_targets_shift_and_ignore_padding():
    ids = torch.tensor([[5, 6, 7, 8], [9, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    assert next_token_targets(ids, mask).tolist() == [[6, 7, 8, IGNORE], [3, IGNORE, IGNORE, IGNORE]]


def test_language_modelling_loss_by_hand():
    """Row 0 scores positions 0..2 (targets 1, 2, 0), row 1 (one pad) positions 0..1: 5 terms."""
    torch.manual_seed(0)
    logits, teacher = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    ids = torch.tensor([[2, 1, 2, 0], [1, 0, 2, 1]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    targets = next_token_targets(ids, mask)
    scored = [(0, 0, 1), (0, 1, 2), (0, 2, 0), (1, 0, 0), (1, 1, 2)]  # (row, position, next token)
    ce = sum(-math.log(torch.softmax(logits[b, t], -1)[y]) for b, t, y in scored) / 5
    assert float(TaskLoss(0.5, 2.0)(logits, targets)["task"]) == pytest.approx(ce, rel=1e-6)
    kl = 0.0
    for b, t, _ in scored:  # T^2 KL(p_t^T || p_s^T) at T = 2, averaged over the scored positions
        p, q = torch.softmax(teacher[b, t] / 2, -1), torch.softmax(logits[b, t] / 2, -1)
        kl += float((p * (p / q).log()).sum())
    terms = TaskLoss(0.25, 2.0)(logits, targets, teacher)
    assert float(terms["task"]) == pytest.approx(0.75 * ce, rel=1e-6)
    assert float(terms["distill_ce"]) == pytest.approx(0.25 * 4 * kl / 5, rel=1e-5)
    changed = logits.clone()
    changed[1, 2:] += 100.0  # the padded row's unscored positions do not count
    assert float(TaskLoss(0.5, 2.0)(changed, targets)["task"]) == pytest.approx(ce, rel=1e-6)
    with pytest.raises(ValueError, match="next-token targets"):
        TaskLoss(0.5, 2.0)(logits, torch.tensor([0, 1]))


def test_classification_loss_is_unchanged():
    logits, labels = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0])
    expected = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(1))) / 2
    assert float(TaskLoss(0.5, 2.0)(logits, labels)["task"]) == pytest.approx(expected, rel=1e-6)


def test_decoder_layer_matching_reads_the_residual_stream(decoders):
    """The captured states are the input of layer 0 and every layer's output; the last one is before the
    final norm (transformers' hidden_states[-1] is after it); the normalised MSE ignores each token's scale."""
    loaded = decoders["llama"]
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with torch.no_grad(), layer_outputs(loaded.adapter) as states:
        out = loaded.model(**batch, output_hidden_states=True)
    assert len(states) == 4 and all(torch.equal(a, b) for a, b in zip(states[:-1], out.hidden_states[:-1]))
    assert not torch.allclose(states[-1], out.hidden_states[-1])
    assert torch.allclose(loaded.adapter.final_norm(states[-1]), out.hidden_states[-1], atol=1e-6)
    matcher = LayerMatcher(32, layers=[2], normalise=True)
    scaled = [h * torch.arange(1.0, 5.0)[None, :, None] for h in states[1:]]  # each token scaled on its own
    loss, alignment = matcher(scaled, states[1:])
    assert alignment == [2] and float(loss.detach()) == pytest.approx(0.0, abs=1e-6)
    assert torch.allclose(rms_normalised(10 * states[1]).pow(2).mean(-1), torch.ones(1, 4), atol=1e-4)


# ----------------------------------------------------------------------------- LoRA


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_lora_merge_keeps_the_logits_and_leaves_no_peft_module(decoders, arch):
    loaded = decoders[arch]
    model = copy.deepcopy(loaded.model)
    student = dataclasses.replace(loaded, model=model, adapter=Adapter(model))
    trainable = add_lora(student, LoraSettings(rank=4, alpha=8.0, dropout=0.0))
    assert trainable == lora_parameters(loaded.adapter, 4) > 0
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in student.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)  # B starts at 0; a trained delta is not
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8, 9], [3, 4, 5, 2, 2]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])}
    with torch.no_grad():
        dense = loaded.model(**batch).logits
        unmerged = student.model(**batch).logits
        copied = merged_copy(student)
        assert has_lora(student.model) and not has_lora(copied.model)
        assert torch.allclose(copied.model(**batch).logits, unmerged, atol=1e-5)
        merge_lora(student.model)
        merged = student.model(**batch).logits
    assert not torch.allclose(unmerged, dense, atol=1e-3)  # the delta matters
    assert torch.allclose(merged, unmerged, atol=1e-5) and not has_lora(student.model)
    assert sum(p.numel() for p in student.model.parameters()) == sum(p.numel() for p in loaded.model.parameters())


def test_lora_skips_projections_of_a_removed_block(decoders):
    """A block removed whole (its attention and MLP sliced to nothing) gets no adapters; the other layers'
    seven projections each do, and the parameter count agrees."""
    loaded = decoders["llama"]
    dense = GateState.dense(loaded)
    state = dense.replace(mha=torch.tensor([0.0, 1.0, 1.0]), ffn=torch.tensor([0.0, 1.0, 1.0]))
    pruned = prune(loaded, state)
    trainable = add_lora(pruned, LoraSettings(rank=2))
    adapted = {n.rpartition(".lora_A")[0] for n, _ in pruned.model.named_parameters() if ".lora_A." in n}
    assert len(adapted) == 2 * 7 and not any(".layers.0." in n for n in adapted)
    assert trainable == lora_parameters(Adapter(merge_lora(pruned.model)), 2)


def test_lora_on_a_sliced_decoder_with_uneven_gqa_groups(decoders):
    """Qwen2 (6 query heads in 2 KV groups of 3) with one head of layer 0 closed keeps 2 + 3 heads there:
    its K/V expand their output per query head, get no adapter and keep their weights; every other
    projection is adapted, the forward runs and the merge keeps the logits."""
    loaded = decoders["qwen2"]
    pruned = prune(loaded, GateState.from_closed_heads(loaded, [(0, 0)]))
    add_lora(pruned, LoraSettings(rank=2))
    adapted = {n.rpartition(".lora_A")[0] for n, _ in pruned.model.named_parameters() if ".lora_A." in n}
    skipped = {"lm.model.layers.0.self_attn.k_proj", "lm.model.layers.0.self_attn.v_proj"}
    assert len(adapted) == 3 * 7 - 2 and not adapted & skipped
    with torch.no_grad():
        for name, p in pruned.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
        batch = {"input_ids": torch.tensor([[5, 6, 7, 8, 9]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
        unmerged = pruned.lm(**batch).logits
        merge_lora(pruned.model)
        assert torch.allclose(pruned.lm(**batch).logits, unmerged, atol=1e-5)


def test_lora_on_an_encoder_adapts_its_six_projections(tiny_dir):
    loaded = load_model(str(tiny_dir))
    add_lora(loaded, LoraSettings(rank=2))
    adapted = [n for n, p in loaded.model.named_parameters() if p.requires_grad]
    assert len(adapted) == 2 * 6 * 2 and all("lora_" in n for n in adapted)  # A and B x 6 modules x 2 layers


@pytest.mark.parametrize("method", ["cofi", "l0"])
def test_lora_steps_train_only_adapters_and_gates(method, decoders, tiny_decoders, reviews, tmp_path):
    extra = dict(target_sparsity=0.5, prefinetune_steps=0, warmup_steps=4) if method == "cofi" else {}
    s = session(tiny_decoders["llama"], decoders["llama"], reviews, tmp_path, method=method, steps=6,
                finetune_steps=0, lora=True, **extra)
    s.setup_gates()
    base = {n.replace(".base_layer", ""): p.detach().clone() for n, p in s.student.model.named_parameters()
            if "lora_" not in n}
    adapters = {n: p.detach().clone() for n, p in s.student.model.named_parameters() if "lora_" in n}
    gates = [p.detach().clone() for p in s.method.gates.parameters()]
    for _ in range(4):
        s.train_step()
        s.step += 1
    now = dict(s.student.model.named_parameters())
    frozen = {n.replace(".base_layer", ""): p for n, p in now.items() if "lora_" not in n}
    assert frozen.keys() == base.keys() and all(torch.equal(frozen[n], base[n]) for n in base)  # bitwise
    assert all(not p.requires_grad for p in frozen.values())
    assert any(not torch.equal(now[n], p) for n, p in adapters.items())
    assert any(not torch.equal(a, b) for a, b in zip(gates, s.method.gates.parameters()))
    assert {id(p) for group in s.optimizer.param_groups for p in group["params"]} >= {id(now[n]) for n in adapters}


# ----------------------------------------------------------------------------- CoFi and L0 on decoders


def fixed_batch(s: TrainSession):
    return s.examples.batch(list(range(16)))  # (batch, labels) of the first 16 training examples


def test_l0_steps_lower_the_task_loss_and_close_heads(decoders, tiny_decoders, reviews, tmp_path):
    """The prompt's label CE on a fixed batch falls (the review's word sits ~50 prompt tokens before the
    answer: a random 3-layer model needs ~30 steps to find it), and the heads' P(open) falls."""
    s = session(tiny_decoders["llama"], decoders["llama"], reviews, tmp_path, method="l0", steps=40, finetune_steps=0,
                l0_lambda=0.05, distill=False, lr=3e-3)
    s.setup_gates()
    batch, labels = fixed_batch(s)

    def task_loss() -> float:
        with torch.no_grad():
            return float(s.task(s.student.model(**batch).logits, labels)["task"])

    before = task_loss()
    for _ in range(40):
        s.train_step()
        s.step += 1
    s.hooks.update(s.method.gate_state(s.step))
    after = task_loss()
    assert after < 0.5 * before, (before, after)
    assert s.method.gates.penalty() < 0.9 * s.shape.layers * s.shape.heads  # P(open) summed over the heads fell
    assert set(s.losses) == {"loss", "task", "l0"}


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_cofi_steps_prune_towards_the_target_and_the_weights_compensate(arch, decoders, tiny_decoders, reviews,
                                                                         tmp_path):
    """After 20 steps the gates' expected sparsity has risen towards the target (from the 0.14 of the FFN
    units' gates starting half open; it first dips while the target ramps up from 0), and the trained
    weights under the learned structure are closer to the teacher (KL) than the untouched weights under it."""
    teacher = decoders[arch]
    s = session(tiny_decoders[arch], teacher, reviews, tmp_path, method="cofi", steps=20, finetune_steps=0,
                target_sparsity=0.4, prefinetune_steps=0, warmup_steps=10, gate_lr=0.5, lambda_lr=1.0)
    s.setup_gates()
    start = s.method.expected_sparsity(0)
    for _ in range(20):
        s.train_step()
        s.step += 1
    assert s.method.expected_sparsity(s.step) > start + 0.05, start
    assert set(s.losses) >= {"distill_layer", "lagrangian"}
    state = s.method.gate_state(s.step)
    batch, _ = fixed_batch(s)
    s.hooks.update(state)
    s.student.model.eval()
    with torch.no_grad():
        want = teacher.model(**batch).logits
        trained = float(s.task.distill_ce(s.student.model(**batch).logits, want))
        with gated(teacher, state):
            untouched = float(s.task.distill_ce(teacher.model(**batch).logits, want))
    assert trained < untouched, (trained, untouched)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_trained_gates_prune_to_the_gated_model(arch, decoders, tiny_decoders, reviews, tmp_path):
    """CoFi steps with LoRA; the LoRA deltas merged, the deterministic (soft) gates folded and sliced give
    the class logits and the LM logits of the gated model."""
    s = session(tiny_decoders[arch], decoders[arch], reviews, tmp_path, method="cofi", steps=12, finetune_steps=0,
                target_sparsity=0.5, prefinetune_steps=0, warmup_steps=6, lora=True, lr=1e-2)
    s.setup_gates()
    for _ in range(12):
        s.train_step()
        s.step += 1
    state = s.method.gate_state(s.step)
    assert state.closed_heads() or bool((state.intermediate == 0).any())  # something is really removed
    s.hooks.remove()
    student = s.student
    student.model.eval()
    merge_lora(student.model)
    batch, _ = s.examples.batch(list(range(6)))
    with torch.no_grad(), gated(student, state):
        want, want_lm = student.model(**batch).logits, student.lm(**batch).logits
    pruned = prune(student, state)
    with torch.no_grad():
        got, got_lm = pruned.model(**batch).logits, pruned.lm(**batch).logits
    mask = batch["attention_mask"].bool()
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    assert torch.allclose(got_lm[mask], want_lm[mask], atol=1e-4), (got_lm - want_lm)[mask].abs().max()


def test_prompt_texts_are_cut_before_the_template(decoders, tmp_path):
    """max_length counts the text's tokens: a long review is cut inside the prompt, whose end (the answer
    cue) stays."""
    loaded = decoders["llama"]
    long = "a truly great film " * 40
    data = TextDataset([long, "short"], [0, 1], ["fresh", "rotten"], "t")
    examples = classification_examples(loaded, data, 16)
    closing = loaded.tokenizer(["x"])["input_ids"][0][-4:]
    assert examples.enc.truncated == 1 and all(ids[-4:] == closing for ids in examples.enc.ids)
    empty = len(loaded.tokenizer([""])["input_ids"][0])
    assert empty < len(examples.enc.ids[0]) <= empty + 16 + 1


# ----------------------------------------------------------------------------- memory


def test_decoder_memory_estimate_by_hand(decoders):
    shape = GateShape.of(decoders["llama"])  # 3 layers, 4 heads of 8 (2 KV), d 32, f 48
    assert (shape.layers, shape.heads, shape.kv_heads, shape.head_dim, shape.hidden, shape.intermediate) == \
        (3, 4, 2, 8, 32, 48)
    work = memory.Workload(decoder=True, eager=True)
    # per layer and token: 4*32 + (4 + 4)*8 + 3*4*8 + 32 + 4*48 + 2*4*10 = 128 + 64 + 96 + 32 + 192 + 80 = 592
    # floats, + gated 4*8 + 5*32 + 48 = 240; per token 3*32 floats (embeddings, final norm)
    layer = 4 * (592 + 240)
    assert memory.activation_bytes(shape, 2, 10, gated=True, work=work) == 2 * 10 * (3 * layer + 4 * 96)
    sdpa = memory.activation_bytes(shape, 2, 10, gated=True, work=memory.Workload(decoder=True, eager=False))
    assert memory.activation_bytes(shape, 2, 10, gated=True, work=work) - sdpa == 2 * 10 * 3 * 4 * 80
    lm = memory.activation_bytes(shape, 2, 10, gated=True, work=memory.Workload(decoder=True, vocab=1000))
    assert lm - memory.activation_bytes(shape, 2, 10, gated=True, work=work) == 2 * 10 * 4 * 8 * 1000
    lora = memory.Workload(decoder=True, lora_rank=4, lora_dropout=True)
    # + 7 r floats and a dropped copy of 5 h + a d_h + f = 240 inputs (floats and mask bytes)
    assert memory.activation_bytes(shape, 2, 10, gated=True, work=lora) - \
        memory.activation_bytes(shape, 2, 10, gated=True, work=work) == 2 * 10 * 3 * (4 * (28 + 240) + 240)
    full = memory.estimate(1000, 1000, shape, 2, 10, gated=True, work=work)
    adapted = memory.estimate(1000, 1000, shape, 2, 10, gated=True, work=memory.Workload(decoder=True, lora_rank=4),
                              trainable=50)
    assert full.weights == 4 * 1000 * 5 and adapted.weights == 4 * (1000 * 3 + 50 * 3)


def test_smollm2_activation_estimate_matches_the_saved_tensors(smollm2_dir, reviews, tmp_path):
    """On the real SmolLM2 (CoFi, LoRA rank 8, eager attention) the estimated activations of a batch of
    the two longest prompts are within -10% / +25% of the bytes autograd really saves for backward
    (parameters and buffers excluded), and the weights' share counts only the LoRA parameters as trained."""
    teacher = load_model(str(smollm2_dir))
    s = session(smollm2_dir, teacher, reviews, tmp_path, method="cofi", batch_size=2, steps=4, finetune_steps=0,
                target_sparsity=0.5, prefinetune_steps=0, warmup_steps=2, lora=True)
    s.setup_gates()
    longest = sorted(range(len(s.examples)), key=lambda i: -len(s.examples.enc.ids[i]))[:2]
    batch, labels = s.examples.batch(longest)
    modules = (s.student.model, s.teacher.model, *s.method.modules())
    fixed = {t.untyped_storage().data_ptr() for m in modules for t in (*m.parameters(), *m.buffers())}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in fixed:
            saved[storage.data_ptr()] = max(saved.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    s.step = 1  # pruning: gates sampled, hooks and layer matching active
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        s.loss_terms(batch, labels)
    budget = s.memory_budget()
    measured = sum(saved.values())
    assert budget.seq_len == batch["input_ids"].shape[1] and budget.batch == 2
    assert 0.9 * measured < budget.activations < 1.25 * measured, (budget.activations, measured)
    parameters = sum(p.numel() for p in teacher.model.parameters())
    per_layer = 8 * ((576 + 576) * 2 + (576 + 192) * 2 + (576 + 1536) * 3)  # q, o; k, v; gate, up, down
    assert lora_parameters(teacher.adapter, 8) == 30 * per_layer
    assert budget.weights == 4 * (3 * parameters + 3 * 30 * per_layer)  # weights, 2 snapshots; LoRA grads, moments


# ----------------------------------------------------------------------------- a whole run


def test_a_lora_cofi_run_on_a_decoder_exports_plain_weights(decoders, tiny_decoders, reviews, tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    config = TrainConfig.build(**{**SMALL, "model": str(tiny_decoders["llama"]), "data": str(reviews), "lr": 1e-2},
                               method="cofi", steps=16, finetune_steps=4, target_sparsity=0.5, prefinetune_steps=0,
                               warmup_steps=8, lora=True).check()
    run_id = store.create(config.to_dict())
    assert run_job(store, run_id, teacher=decoders["llama"]) == "done"
    run = store.get(run_id)
    final = run.result
    assert run.status == "done" and final["sparsity"] > 0.1 and final["parameters"] < final["dense_parameters"]
    folder = Path(final["export"])
    names = [n for f in folder.glob("*.safetensors") for n in safe_open(f, "pt").keys()]
    assert names and not any("lora" in n or "base_layer" in n for n in names)
    exported = load_pruned(folder)
    assert not has_lora(exported.model) and exported.is_decoder
    assert exported.architecture().parameters == final["parameters"]


def stop_at(store: RunStore, run_id: int, step: int):
    """A progress callback requesting a stop after `step` steps (the loop reads the flag once a second)."""
    def progress(done, total, message):
        if done == step:
            store.request_stop(run_id)
            time.sleep(1.1)
    return progress


def test_a_lora_run_resumed_in_its_fine_tune_is_the_same_run(decoders, tiny_decoders, reviews, tmp_path):
    """Stopped after slicing (the fine-tune's fresh adapters on the pruned model), resumed from the
    checkpoint: the same losses and accuracies as the run that was never stopped."""
    store = RunStore(tmp_path / "runs.sqlite")
    config = TrainConfig.build(**{**SMALL, "model": str(tiny_decoders["llama"]), "data": str(reviews), "lr": 1e-2,
                                  "eval_every": 4}, method="l0", steps=8, finetune_steps=6, l0_lambda=1.0,
                               gate_lr=2.0, lora=True).check()
    stopped = store.create(config.to_dict())
    assert run_job(store, stopped, stop_at(store, stopped, 10), teacher=decoders["llama"]) == "stopped"
    assert store.get(stopped).step == 10
    assert run_job(store, stopped, teacher=decoders["llama"]) == "done"
    whole = store.create(config.to_dict())
    assert run_job(store, whole, teacher=decoders["llama"]) == "done"
    a, b = store.metrics(whole), store.metrics(stopped)
    assert [r["step"] for r in a] == [r["step"] for r in b] and a[-1]["phase"] == "finetune"
    assert sum(a[-1]["heads_alive"]) < 12  # the fine-tune trains a sliced model (LoRA on what is left)
    for x, y in zip(a, b):
        assert y["losses"] == pytest.approx(x["losses"], abs=1e-5) and y["accuracy"] == x["accuracy"], x["step"]


def test_a_lora_cofi_run_on_an_encoder(tiny, tiny_dir, reviews, tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    config = TrainConfig.build(**{**SMALL, "model": str(tiny_dir), "data": str(reviews), "label_map": {}},
                               method="cofi", steps=12, finetune_steps=2, target_sparsity=0.5, prefinetune_steps=0,
                               warmup_steps=6, lora=True, lora_rank=4).check()
    run_id = store.create(config.to_dict())
    assert run_job(store, run_id, teacher=tiny) == "done"
    final = store.get(run_id).result
    assert final["parameters"] < final["dense_parameters"] and final["losses"].keys() == {"task", "distill_ce"}
    exported = load_pruned(final["export"])
    assert not has_lora(exported.model) and exported.architecture().parameters == final["parameters"]


# ----------------------------------------------------------------------------- language modelling


@pytest.fixture(scope="module")
def documents(tmp_path_factory) -> Path:
    """30 documents (24 train, 3 dev once split 80/10/10 by document) of a repetitive toy language."""
    words = "the cat sat on the mat and the dog ran in the park while the birds sang".split()
    docs = [" ".join(words[(i + j) % len(words)] for j in range(40)) for i in range(30)]
    path = tmp_path_factory.mktemp("text") / "docs.txt"
    path.write_text("\n\n".join(docs) + "\n")
    return path


def test_documents_are_cut_into_pieces(decoders, tiny_dir):
    """Pieces of max_length tokens per document; a one-token piece (it predicts nothing) is dropped."""
    loaded = decoders["llama"]
    text = "one two three four five six seven"
    examples = text_examples(loaded, [text, "eight"], 3)
    ids = loaded.text_tokenizer([text])["input_ids"][0]
    pieces = [ids[i:i + 3] for i in range(0, len(ids), 3)]
    assert examples.enc.ids == [p for p in pieces if len(p) > 1] and len(ids) > 3
    assert examples.language_modelling and examples.enc.truncated == 1  # one document was cut in pieces
    batch, targets = examples.batch([0, 1])
    assert targets.tolist()[0] == [ids[1], ids[2], IGNORE] and batch["input_ids"].shape == targets.shape
    with pytest.raises(ValueError, match="causal LM"):
        text_examples(load_model(str(tiny_dir)), [text], 3)


def test_l0_on_documents_lowers_the_next_token_loss(decoders, tiny_decoders, documents, tmp_path):
    s = session(tiny_decoders["llama"], decoders["llama"], documents, tmp_path, method="l0", steps=10,
                finetune_steps=0, task="lm", label_map={}, max_length=32, l0_lambda=0.01, distill=False, lr=1e-2)
    assert s.examples.language_modelling and len(s.dev) == 3
    s.setup_gates()
    batch, targets = s.examples.batch(list(range(8)))

    def lm_loss() -> float:
        with torch.no_grad():
            return float(TaskLoss(0.0, 1.0)(s.student.lm(**batch).logits, targets)["task"])

    before = lm_loss()
    for _ in range(10):
        s.train_step()
        s.step += 1
    assert lm_loss() < 0.8 * before and set(s.losses) == {"loss", "task", "l0"}


def test_a_run_on_documents_records_perplexity(decoders, tiny_decoders, documents, tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    config = TrainConfig.build(**{**SMALL, "label_map": {}, "lr": 3e-3}, model=str(tiny_decoders["llama"]),
                               data=str(documents), task="lm", method="cofi", steps=6, finetune_steps=2,
                               target_sparsity=0.3, prefinetune_steps=2, warmup_steps=4, max_length=32).check()
    assert config.data_spec.is_text and TrainConfig.from_dict(config.to_dict()) == config
    run_id = store.create(config.to_dict())
    assert run_job(store, run_id, teacher=decoders["llama"]) == "done"
    first, final = store.metrics(run_id)[0], store.get(run_id).result
    assert first["perplexity"] == pytest.approx(first["dense_perplexity"], rel=1e-4)  # step 0: the dense model
    assert final["final"] and final["examples"] == 3 and final["perplexity"] < final["dense_perplexity"]
    assert 0 < final["accuracy"] <= 1 and final["speedup_b1"] > 0


def test_the_train_command_runs_on_documents(tiny_decoders, documents, tmp_path, monkeypatch):
    """`pruning train --task lm` on a text file: the data check reads documents, not labelled rows."""
    from pruning.__main__ import main

    monkeypatch.setenv("HEADLAB_HOME", str(tmp_path))
    assert main(["train", "--model", str(tiny_decoders["llama"]), "--data", str(documents), "--task", "lm",
                 "--method", "random", "--target-sparsity", "0.3", "--finetune-steps", "2", "--max-length", "32",
                 "--batch-size", "4", "--eval-examples", "2"]) == 0
    run = RunStore().list()[0]
    assert run.status == "done" and run.final.perplexity is not None
