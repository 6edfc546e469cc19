"""FLOP as a method of the loop: factorised layers train their gates to the target, the end of the gate phase
leaves thin matrices that compute what the gated layers did, and the export stores and loads them back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.errors import ModelError
from core.lowrank import LowRankLinear, low_rank_names
from core.models import load_model
from core.pruned import load_pruned
from pruning.__main__ import main
from pruning.config import TrainConfig
from pruning.distributed import Dist
from pruning.export import ONNX_FILE
from pruning.factorised import FactorisedLinear
from pruning.runs import RunStore
from pruning.session import Job, TrainSession
from tests.conftest import make_tiny

torch.set_num_threads(1)
SMALL = ["--batch-size", "8", "--eval-every", "10", "--eval-budget", "1", "--eval-examples", "8"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("flop") / "model")


def flop_session(folder: Path, reviews: Path, tmp_path: Path, steps: int, **options) -> TrainSession:
    config = TrainConfig.build(model=str(folder), data=str(reviews), method="flop", batch_size=8, steps=steps,
                               finetune_steps=0, **options).check()
    job = Job(run_id=1, config=config.to_dict(), run_dir=tmp_path, attempt=1, resume=False)
    return TrainSession(config, job, None, None, load_model(str(folder)), Dist())


def test_flop_gates_train_alone_and_the_end_of_the_gates_keeps_the_function(tiny, reviews, tmp_path):
    s = flop_session(tiny, reviews, tmp_path, 40, target_sparsity=0.5, warmup_steps=20, gate_lr=0.5,
                     lambda_lr=0.5)
    s.setup_gates()
    layers = s.method.layers
    assert len(layers) == 2 * 6 and all(isinstance(m, FactorisedLinear) for m in layers.values())
    gate_ids = {id(p) for m in layers.values() for p in m.gates.parameters()}
    stepped = {id(p) for group in s.optimizer.param_groups for p in group["params"]}
    assert not gate_ids & stepped  # the gates are the method's: its Adam, not the model's AdamW
    before = s.method.expected_sparsity(0)
    while s.step < s.c.gate_steps:
        s.train_step()
        s.step += 1
    after = s.method.expected_sparsity(s.step)
    assert before < 0.05 and after > 0.25  # the Lagrangian pushed s-hat towards the target
    batch = s.examples.batch(list(range(8)))[0]
    s.student.model.eval()
    with torch.no_grad():
        gated = s.student.model(**batch).logits
    s.setup_finetune(s.current_state())
    thin = {n: m for n, m in s.student.model.named_modules() if isinstance(m, LowRankLinear)}
    assert thin and all(m.rank * (m.in_features + m.out_features) < m.in_features * m.out_features
                        for m in thin.values())
    s.student.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(s.student.model(**batch).logits, gated, rtol=1e-4, atol=1e-5)


def test_a_flop_run_exports_thin_matrices_that_load_back_and_run_in_onnx(tiny, reviews, tmp_path, monkeypatch):
    monkeypatch.setenv("HEADLAB_HOME", str(tmp_path))
    assert main(["train", "--model", str(tiny), "--data", str(reviews), "--method", "flop", "--steps", "30",
                 "--warmup-steps", "10", "--gate-lr", "0.5", "--lambda-lr", "0.5", "--target-sparsity", "0.6",
                 "--finetune-steps", "4", *SMALL]) == 0
    run = RunStore().list()[0]
    assert run.status == "done", run.error
    back = load_pruned(run.result["export"])
    ranks = low_rank_names(back.model)
    assert ranks and run.final.sparsity > 0.2  # the record's sparsity is the thin matrices' share
    assert run.final.parameters < run.final.dense_parameters
    texts = ["a great film", "an awful film that goes on"]
    batch = back.tokenizer(texts, padding=True, return_tensors="pt")
    out = tmp_path / "exported"
    assert main(["runs", "export", str(run.id), "--out", str(out), "--onnx"]) == 0
    again = load_pruned(out)
    assert low_rank_names(again.model) == ranks
    with torch.no_grad():
        torch.testing.assert_close(again.model(**batch).logits, back.model(**batch).logits)
    assert (out / ONNX_FILE).is_file()


def test_a_bad_low_rank_record_is_one_clear_error(tiny, reviews, tmp_path, monkeypatch):
    monkeypatch.setenv("HEADLAB_HOME", str(tmp_path))
    assert main(["train", "--model", str(tiny), "--data", str(reviews), "--method", "flop", "--steps", "12",
                 "--warmup-steps", "4", "--gate-lr", "0.5", "--lambda-lr", "0.5", "--finetune-steps", "0",
                 *SMALL]) == 0
    folder = Path(RunStore().list()[0].result["export"])
    import json

    record = json.loads((folder / "pruning.json").read_text())
    record["low_rank"] = {"bert.encoder.layer.0.nothing": 3}
    (folder / "pruning.json").write_text(json.dumps(record))
    with pytest.raises(ModelError, match="low_rank"):
        load_pruned(folder)


def test_flop_refuses_lora_and_a_warmup_past_the_gates(tiny, reviews, tmp_path, monkeypatch):
    monkeypatch.setenv("HEADLAB_HOME", str(tmp_path))
    base = ["train", "--model", str(tiny), "--data", str(reviews), "--method", "flop", *SMALL]
    assert main([*base, "--lora"]) == 2
    assert main([*base, "--steps", "10", "--warmup-steps", "20"]) == 2
