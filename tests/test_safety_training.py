"""Training never runs on silently wrong inputs: a target of 0 keeps the model whole, latency is timed on
typical texts, a damaged checkpoint is refused, SIGTERM stops cleanly, and named data columns are used."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import pruning.cli.apply
import pruning.live
import pruning.record
import pruning.session
from core.data import read_table
from core.latency import median_length
from core.models import load_model
from core.summary import summarise
from pruning.__main__ import main
from pruning.checkpoints import CHECKPOINT, load_checkpoint, save_checkpoint
from pruning.config import TrainConfig
from pruning.gates import GateShape, GateState
from pruning.lagrangian import TargetSchedule
from pruning.live import compare_state, figures, measure_pruned
from pruning.loop import run_job
from pruning.runs import RunStore
from pruning.size import exact_sparsity

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent
SMALL = dict(batch_size=8, eval_every=10, eval_budget=1.0, eval_examples=8, checkpoint_every=1)
SMALL_FLAGS = ["--batch-size", "8", "--eval-every", "10", "--eval-budget", "1", "--eval-examples", "8",
               "--checkpoint-every", "1"]


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_model(str(tiny_dir))


def new_run(store: RunStore, **fields) -> int:
    return store.create(TrainConfig.build(**{**SMALL, **fields}).to_dict())


def one_line_error(capsys) -> str:
    """The one `error:` line on stderr (after any progress bar), no traceback."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and err.strip().endswith(errors[0]) and "Traceback" not in err, err
    return errors[0]


# ----------------------------------------------------------------------------- 1. target 0


def test_target_zero_never_starts_pruning():
    schedule = TargetSchedule(0.0, start=5, warmup=20)
    assert not any(schedule.pruning(step) for step in range(100))
    assert TargetSchedule(0.3, start=5, warmup=20).pruning(5)


def test_cofi_at_target_zero_keeps_the_model_whole(tiny, tiny_dir, reviews, tmp_path):
    """Before the fix the FFN unit gates (P(open) 0.83 at init) were sampled and rounded by CoFi's
    deterministic count, so a run at target 0 ended with units pruned."""
    store = RunStore(tmp_path / "runs.sqlite")
    run_id = new_run(store, model=str(tiny_dir), data=str(reviews), method="cofi", target_sparsity=0.0,
                     steps=40, prefinetune_steps=5, warmup_steps=20, finetune_steps=5)
    assert run_job(store, run_id, teacher=tiny) == "done"
    dense = GateState.dense(GateShape.of(tiny))
    assert all(store.gates(run_id, step) == dense for step in store.gate_steps(run_id))
    for row in store.metrics(run_id):
        assert (row["heads_alive"], row["units_alive"], row["hidden_alive"]) == ([4, 4], [64, 64], 32), row["step"]
        assert row["sparsity"] == row["expected_sparsity"] == exact_sparsity(dense)  # the dense model's own
        assert "lagrangian" not in row["losses"]
    final = store.get(run_id).result
    assert final["parameters"] == final["dense_parameters"]


# ----------------------------------------------------------------------------- 2. typical timing batches


@pytest.fixture
def long_first(tmp_path) -> Path:
    """41 rows: one review of ~200 tokens first, then 40 of 5 to 14 tokens."""
    rows = ["text,label", f'"{" ".join(["long"] * 200)}",pos']
    rows += [f'"{" ".join(["good" if i % 2 else "bad"] * (3 + i % 10))}",{"pos" if i % 2 else "neg"}'
             for i in range(40)]
    path = tmp_path / "long_first.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def timed_widths(monkeypatch, module) -> list[tuple[int, int]]:
    """(batch size, tokens) of every batch `module.compare` times from now on."""
    seen, real = [], module.compare

    def spy(models, batch, **kwargs):
        seen.append(tuple(batch["input_ids"].shape))
        return real(models, batch, **kwargs)

    monkeypatch.setattr(module, "compare", spy)
    return seen


def assert_typical(widths: list[tuple[int, int]], median: int) -> None:
    assert widths and all(tokens <= median + 5 for _, tokens in widths), (widths, median)
    assert all(tokens == median for size, tokens in widths if size == 1), (widths, median)


def test_summary_times_batches_of_the_median_length(tiny, long_first):
    data = read_table(long_first, label_names=tiny.label_names)
    median = median_length(tiny.tokenizer, data.texts, tiny.max_length)
    assert len(tiny.tokenizer(data.texts[0])["input_ids"]) > 200 > median
    summary = summarise(tiny, data)
    assert_typical([(lat.batch_size, lat.seq_len) for lat in summary.latency.values()], median)
    assert summary.flops.seq_len == median


def test_gates_page_training_and_apply_time_batches_of_the_median_length(tiny, tiny_dir, long_first, tmp_path,
                                                                          monkeypatch):
    data = read_table(long_first, label_names=tiny.label_names)
    median = median_length(tiny.tokenizer, data.texts, tiny.max_length)
    live = timed_widths(monkeypatch, pruning.live)
    compare_state(tiny, GateState.dense(tiny), data)  # the Gates page
    measure_pruned(tiny, tiny, data, figures(tiny, data, median))  # every eval step of a run
    assert_typical(live, median)
    applied = timed_widths(monkeypatch, pruning.live)  # apply measures through pruning.live.measure_pruned
    assert main(["apply", "--model", str(tiny_dir), "--data", str(long_first), "--whole-file", "--ffn-keep", "0.5",
                 "--out", str(tmp_path / "pruned"), "--json"]) == 0
    assert_typical(applied, median)


# ----------------------------------------------------------------------------- 3. damaged checkpoints


def stop_after(store: RunStore, run_id: int, step: int):
    """A progress callback requesting a stop once `step` steps are done."""
    def progress(done, total, message):
        if done == step:
            store.request_stop(run_id)
            time.sleep(1.1)  # the loop reads the stop flag at most once a second
    return progress


def test_checkpoint_round_trip_and_a_changed_tensor_is_refused(tmp_path):
    payload = {"step": 3, "model": {"w": torch.arange(6.0).reshape(2, 3)}, "rng": [torch.zeros(2, dtype=torch.uint8)]}
    save_checkpoint(tmp_path, payload)
    loaded = load_checkpoint(tmp_path)
    assert loaded["step"] == 3 and torch.equal(loaded["model"]["w"], payload["model"]["w"]) and "sha256" not in loaded
    body = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    body["model"]["w"][0, 0] = 7.0  # what damaged bytes inside a tensor look like after torch.load
    torch.save(body, tmp_path / CHECKPOINT)
    with pytest.raises(ValueError, match="is corrupt \\(checksum mismatch\\)"):
        load_checkpoint(tmp_path)
    torch.save({"format": 1, "step": 3}, tmp_path / CHECKPOINT)  # written before checksums
    with pytest.raises(ValueError, match="not a HeadLab training checkpoint of format 2"):
        load_checkpoint(tmp_path)


def test_garbage_in_a_real_checkpoint_fails_the_resume_with_one_line(tiny, tiny_dir, reviews, tmp_path, monkeypatch,
                                                                     capsys):
    monkeypatch.setenv("HEADLAB_HOME", str(tmp_path))
    store = RunStore()
    run_id = new_run(store, model=str(tiny_dir), data=str(reviews), method="random", target_sparsity=0.3,
                     finetune_steps=30)
    assert run_job(store, run_id, stop_after(store, run_id, 5), teacher=tiny) == "stopped"
    path = store.get(run_id).run_dir / CHECKPOINT
    raw = bytearray(path.read_bytes())
    middle = len(raw) // 2
    raw[middle:middle + 4096] = np.random.default_rng(0).bytes(4096)
    path.write_bytes(bytes(raw))
    rows = store.metrics(run_id, superseded=True)

    assert main(["runs", "resume", str(run_id)]) == 2
    err = one_line_error(capsys)
    assert err.startswith(f"error: The checkpoint {path} is corrupt (checksum mismatch); "), err
    run = store.get(run_id)
    assert run.status == "failed" and "is corrupt (checksum mismatch)" in run.error and "\n" not in run.error
    assert path.read_bytes() == bytes(raw)  # nothing overwritten: not the checkpoint, not the curve
    assert store.metrics(run_id, superseded=True) == rows


# ----------------------------------------------------------------------------- 4. SIGTERM


def test_sigterm_checkpoints_stops_and_resumes(tiny_dir, reviews, tmp_path, monkeypatch, capsys):
    """A real `python -m pruning train` sent SIGTERM mid-run stops at the next step, checkpointed."""
    monkeypatch.setenv("HEADLAB_HOME", str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-m", "pruning", "train", "--model", str(tiny_dir), "--data", str(reviews),
                             "--method", "cofi", "--target-sparsity", "0.4", "--steps", "100", "--prefinetune-steps",
                             "5", "--warmup-steps", "40", "--finetune-steps", "10", *SMALL_FLAGS],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HEADLAB_HOME": str(tmp_path)})
    store = RunStore(tmp_path / "runs.sqlite")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (store.list() and store.list()[0].step > 0):
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    sent = time.time()
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and time.time() - sent < 10, (proc.returncode, err)
    run = store.list()[0]
    stopped_at = load_checkpoint(run.run_dir)["step"]
    assert run.status == "stopped" and 0 < stopped_at == run.step < 110 and "stopped" in out

    assert main(["runs", "resume", str(run.id)]) == 0
    run = store.get(run.id)
    assert (run.status, run.step, run.attempt) == ("done", 110, 2)
    resumed = [r["step"] for r in store.metrics(run.id) if r["attempt"] == 2]
    assert resumed and min(resumed) > stopped_at and resumed[-1] == 110


# ----------------------------------------------------------------------------- 5. data columns


def read_by_trainer(monkeypatch) -> dict[str, list[str]]:
    """The texts the trainer encodes for training and the texts of every dataset it evaluates on."""
    seen: dict[str, list[str]] = {"train": [], "eval": []}
    encode, measure = pruning.session.encode, pruning.live.figures

    def encode_spy(tokenizer, texts, max_length):
        seen["train"] += list(texts)
        return encode(tokenizer, texts, max_length)

    def figures_spy(loaded, data, seq_len, progress=None):
        seen["eval"] += data.texts
        return measure(loaded, data, seq_len, progress)

    monkeypatch.setattr(pruning.session, "encode", encode_spy)
    monkeypatch.setattr(pruning.live, "figures", figures_spy)
    monkeypatch.setattr(pruning.record, "figures", figures_spy)
    return seen


def train_dense(tiny_dir: Path, data: Path, *columns: str) -> int:
    return main(["train", "--model", str(tiny_dir), "--data", str(data), "--method", "dense", "--finetune-steps",
                 "3", *SMALL_FLAGS, *columns])


def test_named_text_column_is_what_training_and_evaluation_read(tiny_dir, junk_text, tmp_path, monkeypatch):
    monkeypatch.setenv("HEADLAB_HOME", str(tmp_path))
    junk = read_by_trainer(monkeypatch)
    assert train_dense(tiny_dir, junk_text) == 0
    assert set(junk["train"]) == set(junk["eval"]) == {"movie"}  # the default column: junk, without a word
    real = read_by_trainer(monkeypatch)
    assert train_dense(tiny_dir, junk_text, "--text-column", "review", "--label-column", "label") == 0
    assert len(set(real["train"])) == 96 and all(t.startswith("a ") and " film number " in t for t in real["train"])
    reviews = set(read_table(junk_text, text_column="review").texts)
    assert real["eval"] and set(real["eval"]) <= reviews - set(real["train"])  # the dev split of the same column
    args = TrainConfig.from_dict(RunStore().list()[0].config).cli_args()  # the newest run: what a rerun gets
    start = args.index("--text-column")
    assert args[start:start + 4] == ["--text-column", "review", "--label-column", "label"]


def test_unknown_or_misplaced_column_is_refused_with_one_line(tiny_dir, junk_text, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HEADLAB_HOME", str(tmp_path))
    assert train_dense(tiny_dir, junk_text, "--text-column", "reviews") == 2
    err = one_line_error(capsys)
    assert "no text column 'reviews'" in err and "review" in err, err
    assert RunStore().list() == []  # refused before a run was recorded
    with pytest.raises(ValueError, match="'text_column' parameter of TrainConfig must be blank for data 'default'"):
        TrainConfig(text_column="review").check()
    with pytest.raises(ValueError, match="'label_column' parameter of TrainConfig must be a string"):
        TrainConfig(data=str(junk_text), label_column=3).check()
