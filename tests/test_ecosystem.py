"""The Hugging Face ecosystem around HeadLab: `datasets` formats in (Parquet, Arrow, save_to_disk folders with
their splits), TensorBoard / MLflow copies of a run out, plain-transformers exports of standard shapes, and
the `headlab` command."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch

from core.data import DataSpec, load_data, load_splits, load_text, read_documents, read_table, source_labels
from core.data.dataset import DataError

ROOT = Path(__file__).resolve().parent.parent
FEATURES = datasets.Features({"sentence": datasets.Value("string"), "idx": datasets.Value("int32"),
                              "label": datasets.ClassLabel(names=["neg", "pos"])})


def rows(n: int, start: int = 0) -> dict[str, list]:
    """`n` reviews; even rows pos (ClassLabel id 1), odd rows neg (0)."""
    return {"sentence": [f"review {start + i} is {'good' if i % 2 == 0 else 'bad'}" for i in range(n)],
            "idx": list(range(start, start + n)), "label": [1 - i % 2 for i in range(n)]}


@pytest.fixture(scope="module")
def hf_dict(tmp_path_factory) -> Path:
    """A DatasetDict with train (40 rows), validation (10) and test (10, two unlabeled: id -1), saved to disk."""
    test = rows(10, 50)
    test["label"][:2] = [-1, -1]
    folder = tmp_path_factory.mktemp("hf") / "reviews_dd"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict(rows(40), features=FEATURES),
        "validation": datasets.Dataset.from_dict(rows(10, 40), features=FEATURES),
        "test": datasets.Dataset.from_dict(test, features=FEATURES),
    }).save_to_disk(str(folder))
    return folder


# ----------------------------------------------------------------------------- data in


def test_save_to_disk_splits_are_train_dev_test(hf_dict):
    splits = load_splits(DataSpec(str(hf_dict)))
    assert [len(s) for s in (splits.train, splits.dev, splits.test)] == [40, 10, 8]
    assert splits.train.label_names == ["neg", "pos"]  # the ClassLabel's names, not its ids
    assert splits.dev.texts[0] == "review 40 is good" and splits.dev.labels[0] == 1
    assert splits.test.texts[0] == "review 52 is good"  # the unlabeled rows were dropped
    assert any("2 of 10 rows" in w for w in splits.test.warnings)
    assert "split 'validation'" in splits.dev.selection
    # the model's label names and a label map number every split alike
    mapped = load_splits(DataSpec(str(hf_dict), label_map={"pos": "fresh", "neg": "rotten"}), ["fresh", "rotten"])
    assert mapped.dev.labels[:2] == [0, 1] and mapped.train.label_names == ["fresh", "rotten"]


def test_save_to_disk_folder_read_whole_and_column_choices(hf_dict):
    whole = load_data(DataSpec(str(hf_dict), whole_file=True))
    assert len(whole) == 58 and whole.texts[:1] == ["review 0 is good"]  # every split, in order
    assert source_labels(DataSpec(str(hf_dict))) == ["neg", "pos"]
    by_idx = read_table(hf_dict, label_column="idx")  # a named column wins over the ClassLabel one
    assert by_idx.label_names[:3] == ["0", "1", "2"]
    with pytest.raises(DataError, match="no text column 'body'"):
        read_table(hf_dict, text_column="body")


def test_a_dict_without_dev_split_cuts_it_from_train(tmp_path):
    folder = tmp_path / "train_only"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows(50), features=FEATURES)}).save_to_disk(str(folder))
    splits = load_splits(DataSpec(str(folder)))
    assert [len(s) for s in (splits.train, splits.dev, splits.test)] == [40, 5, 5]  # seeded 80/10/10 of train
    assert set(splits.train.texts) | set(splits.dev.texts) | set(splits.test.texts) == set(rows(50)["sentence"])


def test_parquet_and_arrow_files_read_like_any_table(tmp_path):
    data = datasets.Dataset.from_dict(rows(30), features=FEATURES)
    data.to_parquet(str(tmp_path / "r.parquet"))
    single = tmp_path / "single"
    data.save_to_disk(str(single))
    arrow = next(single.glob("*.arrow"))
    expected = read_table(_csv(tmp_path, rows(30)))
    for source in (tmp_path / "r.parquet", arrow, single):
        got = read_table(source)
        assert (got.texts, got.label_names, got.labels) == (expected.texts, ["neg", "pos"], expected.labels)
    splits = load_splits(DataSpec(str(tmp_path / "r.parquet")))  # one table: the seeded 80/10/10 split
    assert [len(s) for s in (splits.train, splits.dev, splits.test)] == [24, 3, 3]
    upload = io.BytesIO((tmp_path / "r.parquet").read_bytes())
    upload.name = "upload.parquet"
    assert read_table(upload).texts == expected.texts
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="cannot be read by the datasets library"):
        read_table(tmp_path / "bad.parquet")


def _csv(folder: Path, columns: dict[str, list]) -> Path:
    """The same rows as a CSV, labels written as their names (the reference reader)."""
    path = folder / "same.csv"
    lines = ["sentence,idx,label"] + [f"{s},{i},{['neg', 'pos'][lab]}" for s, i, lab in
                                      zip(columns["sentence"], columns["idx"], columns["label"])]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_documents_from_datasets_formats(tmp_path):
    docs = {"text": [f"document {i}. It has words." for i in range(20)], "source": ["web"] * 20}
    folder = tmp_path / "docs_dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(docs),
                          "validation": datasets.Dataset.from_dict({"text": ["held out"], "source": ["x"]})}
                         ).save_to_disk(str(folder))
    spec = DataSpec(str(folder), task="lm")
    assert load_text(spec, "dev").documents == ("held out",)
    assert len(load_text(spec, "train")) == 16 and len(load_text(spec, "test")) == 2  # test cut from train
    datasets.Dataset.from_dict(docs).to_parquet(str(tmp_path / "d.parquet"))
    assert read_documents(tmp_path / "d.parquet").documents == tuple(docs["text"])
    with pytest.raises(DataError, match="no text column 'body'"):
        read_documents(tmp_path / "d.parquet", "body")


# ----------------------------------------------------------------------------- runs out


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, tiny_dir, reviews):
    """A short tracked one-shot run of the tiny model (3 eval steps: 0, 5 and the final 10)."""
    from core.models import load_model
    from pruning.config import TrainConfig
    from pruning.loop import run_job
    from pruning.runs import RunStore

    root = tmp_path_factory.mktemp("tracked")
    store = RunStore(root / "runs.sqlite")
    config = TrainConfig.build(model=str(tiny_dir), data=str(reviews), method="random", target_sparsity=0.5,
                               finetune_steps=10, batch_size=8, eval_every=5, eval_budget=1.0, eval_examples=8,
                               score_examples=16, tensorboard=str(root / "tb"), mlflow=str(root / "mlruns"))
    run_id = store.create(config.to_dict())
    assert run_job(store, run_id, teacher=load_model(str(tiny_dir))) == "done"
    return store, run_id, root, config


def test_tensorboard_event_file_holds_every_measurement(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    store, run_id, root, config = tracked_run
    folders = list((root / "tb").iterdir())
    assert [f.name for f in folders] == [f"run-{run_id}-random"]
    events = EventAccumulator(str(folders[0]))
    events.Reload()
    records = store.records(run_id)
    for name in ("accuracy", "sparsity", "latency_b32_ms", "speedup_b1", "heads_alive/0"):
        scalars = events.Scalars(name)
        assert [e.step for e in scalars] == [r.step for r in records]
        want = [float(r.row()[name] if "/" not in name else r.heads_alive[0]) for r in records]
        assert [e.value for e in scalars] == pytest.approx(want, rel=1e-6)
    assert [e.value for e in events.Scalars("loss_task")] == pytest.approx([r.losses["task"] for r in records[1:]])
    (text,) = events.Tensors("config/text_summary")
    assert b"| option.target_sparsity | 0.5 |" in text.tensor_proto.string_val[0]


def test_mlflow_run_holds_params_and_metrics_at_their_steps(tracked_run):
    from mlflow.tracking import MlflowClient

    store, run_id, root, config = tracked_run
    client = MlflowClient(tracking_uri=(root / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("headlab")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["headlab.run_id"] == str(run_id)
    assert run.data.params["method"] == "random" and run.data.params["finetune_steps"] == "10"
    assert run.data.params["option.target_sparsity"] == "0.5"
    records = store.records(run_id)
    history = client.get_metric_history(run.info.run_id, "accuracy")
    assert [m.step for m in history] == [r.step for r in records]
    assert [m.value for m in history] == pytest.approx([r.accuracy for r in records])
    assert run.data.metrics["sparsity"] == pytest.approx(records[-1].sparsity)


def test_a_stopped_run_ends_killed_in_mlflow_and_finished_once_resumed(tmp_path, tiny_dir, reviews):
    from mlflow.tracking import MlflowClient

    from core.models import load_model
    from pruning.config import TrainConfig
    from pruning.loop import run_job
    from pruning.runs import RunStore

    store = RunStore(tmp_path / "runs.sqlite")
    config = TrainConfig.build(model=str(tiny_dir), data=str(reviews), method="random", finetune_steps=400,
                               batch_size=8, eval_every=100, eval_budget=1.0, eval_examples=8,
                               mlflow=str(tmp_path / "mlruns"))
    run_id = store.create(config.to_dict())
    asked = []

    def stop_after_a_step(done, total, message):  # the loop reads the stop flag about once a second
        if done >= 1 and not asked:
            asked.append(store.request_stop(run_id))

    teacher = load_model(str(tiny_dir))
    assert run_job(store, run_id, stop_after_a_step, teacher=teacher) == "stopped"
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("headlab").experiment_id
    (run,) = client.search_runs([experiment])
    assert run.info.status == "KILLED"
    assert run_job(store, run_id, teacher=teacher) == "done"
    (again,) = client.search_runs([experiment])  # the resumed run continues the same MLflow run
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"


def test_a_failing_tracker_warns_once_and_the_run_goes_on(tmp_path, capsys, reviews, tiny_dir):
    from pruning.config import TrainConfig
    from pruning.trackers import Trackers

    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    config = TrainConfig.build(model=str(tiny_dir), data=str(reviews), method="random",
                               tensorboard=str(blocker / "tb"), mlflow=str(blocker / "ml"))
    trackers = Trackers(config, 1, tmp_path)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("warning: TensorBoard logging stopped")
    assert err[1].startswith("warning: MLflow logging stopped")
    assert not any(t.alive for t in trackers.items)


# ----------------------------------------------------------------------------- plain-transformers exports


def _plain_logits(folder: Path, loaded, texts: list[str]) -> torch.Tensor:
    """Logits of `folder` loaded by plain transformers (no HeadLab class), read as `loaded` reads its own."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from pruning.standard_export import logits

    auto = AutoModelForCausalLM if loaded.is_decoder else AutoModelForSequenceClassification
    model = auto.from_pretrained(folder, local_files_only=True).eval()
    assert type(model).__module__.startswith("transformers.")
    return logits(model, loaded, texts)


TEXTS = ["a quietly moving film", "dull", "not bad at all, really, and rather long for a review"]


@pytest.mark.parametrize("arch,closed", [
    ("bert", {"ffn_keep": 0.5}),  # every head, the same FFN width everywhere
    ("llama", {"layers": [1], "heads": [(0, 0), (0, 1), (2, 0), (2, 1)]}),  # a layer gone, one KV group left each
    ("qwen2", {"heads": [(layer, h) for layer in range(3) for h in (0, 3)]}),  # 2 of 3 query heads per KV head
    ("gemma3", {"layers": [0], "ffn_keep": 0.5}),  # a sliding-window layer gone: layer_types follow
])
def test_standard_exports_load_with_plain_transformers(arch, closed, tiny_dir, tiny_decoders, tmp_path):
    from core.models import load_model
    from pruning.gate_state import GateState
    from pruning.standard_export import STANDARD, export, export_kind, standard_shape, without_layers
    from pruning.surgery import prune

    loaded = load_model(str(tiny_dir if arch == "bert" else tiny_decoders[arch]))
    state = GateState.from_closed_heads(loaded, closed.get("heads", []))
    state = without_layers(state, closed.get("layers", []))
    if "ffn_keep" in closed:
        state = state.with_ffn_keep(loaded.adapter, closed["ffn_keep"])
    pruned = prune(loaded, state)
    assert standard_shape(pruned).standard
    done = export(pruned, tmp_path / "out", onnx=arch == "bert")
    assert done.kind == STANDARD and export_kind(done.path)[0] == STANDARD
    assert not (done.path / "pruning.json").exists()
    got = _plain_logits(done.path, pruned, TEXTS)
    with torch.no_grad():
        want = pruned.model(**pruned.tokenizer(TEXTS, padding=True, return_tensors="pt")).logits
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5)
    layers = 3 - len(closed.get("layers", [])) if arch != "bert" else 2
    import json
    config = json.loads((done.path / "config.json").read_text())
    assert config["num_hidden_layers"] == layers
    if arch == "gemma3":
        assert config["layer_types"] == ["full_attention", "sliding_attention"]
    if arch == "qwen2":
        assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)


def test_other_shapes_keep_headlabs_layout_and_rounding_makes_them_standard(tiny_decoders, tmp_path):
    from core.models import load_model
    from pruning.gate_state import GateState
    from pruning.standard_export import HEADLAB, STANDARD, export, round_to_standard, standard_shape
    from pruning.surgery import prune

    loaded = load_model(str(tiny_decoders["llama"]))
    state = GateState.from_closed_heads(loaded, [(0, 0), (1, 2), (1, 3)]).with_ffn_keep(loaded.adapter, 0.5)
    verdict = standard_shape(prune(loaded, state))
    assert not verdict.standard and "unequal numbers of query heads" in verdict.reason
    done = export(prune(loaded, state), tmp_path / "headlab")
    assert done.kind == HEADLAB and (done.path / "pruning.json").exists() and verdict.reason in done.reason
    rounded = round_to_standard(loaded, state)
    # 10 of 12 heads in 5 of 6 KV groups -> 2 groups of 2 per layer; layer 1 keeps its open group 0 whole
    assert rounded.head.sum(dim=1).tolist() == [4.0, 4.0, 4.0] and rounded.head[1].tolist() == [1, 1, 1, 1]
    assert (rounded.intermediate > 0).sum(dim=1).tolist() == [24, 24, 24]
    assert torch.equal(rounded.intermediate > 0, state.intermediate > 0)  # the same units were already uniform
    assert export(prune(loaded, rounded), tmp_path / "std").kind == STANDARD
    shape = standard_shape(prune(loaded, GateState.dense(loaded).with_hidden_keep(loaded.adapter, 0.5)))
    assert not shape.standard and "hidden dims" in shape.reason


def test_apply_prune_layers_writes_a_plain_folder(tiny_dir, reviews, tmp_path, capsys):
    import json

    from pruning.__main__ import main

    out = tmp_path / "dropped"
    assert main(["apply", "--model", str(tiny_dir), "--data", str(reviews), "--prune-layers", "1", "--out", str(out),
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["export"]["kind"] == "standard" and report["sparsity"] == 0.5
    from transformers import AutoModelForSequenceClassification

    plain = AutoModelForSequenceClassification.from_pretrained(out, local_files_only=True).eval()
    dense = AutoModelForSequenceClassification.from_pretrained(tiny_dir, local_files_only=True).eval()
    assert plain.config.num_hidden_layers == 1
    # the deleted layer's weights are gone, the first layer's and the head are the dense model's
    assert torch.equal(plain.bert.encoder.layer[0].output.dense.weight, dense.bert.encoder.layer[0].output.dense.weight)
    assert torch.equal(plain.classifier.weight, dense.classifier.weight)
    assert main(["apply", "--model", str(tiny_dir), "--data", str(reviews), "--prune-layers", "2", "--out",
                 str(tmp_path / "x")]) == 2
    assert "layer 2 does not exist" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the headlab command


def test_headlab_dispatches_to_the_three_clis_with_their_exit_codes(tmp_path, monkeypatch, capsys):
    import headlab_cli

    monkeypatch.setenv("HEADLAB_HOME", str(tmp_path))
    assert headlab_cli.owner("evaluate") == "core" and headlab_cli.owner("roles") == "analysis"
    assert headlab_cli.owner("train") == "pruning" and headlab_cli.owner("runs") == "pruning"
    assert headlab_cli.main(["runs", "list"]) == 0 and capsys.readouterr().out.strip() == "no runs"
    assert headlab_cli.main(["pruning", "methods"]) == 0 and "cofi:" in capsys.readouterr().out
    assert headlab_cli.main(["evaluate", "--help"]) == 0 and "python -m core evaluate" in capsys.readouterr().out
    assert headlab_cli.main(["runs", "stop"]) == 2  # pruning's own error: a run ID is needed
    assert "needs a run ID" in capsys.readouterr().err
    assert headlab_cli.main(["apply", "--bogus"]) == 2  # argparse's usage error, as `python -m pruning`
    assert headlab_cli.main(["nope"]) == 2 and "unknown command 'nope'" in capsys.readouterr().err


def test_installed_headlab_script(tmp_path):
    script = Path(sys.executable).parent / "headlab"
    if not script.exists():
        pytest.skip("headlab is not installed in this venv (pip install -e . --no-deps)")
    env = {**os.environ, "HEADLAB_HOME": str(tmp_path)}
    done = subprocess.run([str(script), "runs", "delete"], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert done.returncode == 2 and "error: runs delete needs a run ID" in done.stderr  # pruning's own message
