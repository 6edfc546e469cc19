"""`python -m pruning apply`: the before/after table, the saved folder, one-line errors with exit 2."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from core.pruned import PRUNING_FILE, load_pruned
from pruning.__main__ import main
from pruning.cli.apply import parse_heads
from pruning.export import ONNX_FILE


def apply(*args: str) -> int:
    """Exit status of `python -m pruning apply ARGS`, run in this process (timing on 1 thread: steadier on a
    shared 2-core machine)."""
    try:
        return main(["apply", "--threads", "1", *args])
    except SystemExit as exc:  # argparse usage errors
        return exc.code


def test_parse_heads():
    assert parse_heads("0:1, 0:5,3:2") == [(0, 1), (0, 5), (3, 2)]
    assert parse_heads("") == []
    for bad in ("0-1", "0:1,", "a:b", "1:2:3", "-1:0"):
        with pytest.raises(ValueError, match="LAYER:HEAD"):
            parse_heads(bad)


def test_apply_prints_table_and_saves(tiny_dir, reviews_csv, tmp_path, capsys):
    out = tmp_path / "pruned"
    rc = apply("--model", str(tiny_dir), "--prune-heads", "0:1,1:0,1:1,1:2,1:3", "--ffn-keep", "0.5",
               "--hidden-keep", "0.75", "--data", str(reviews_csv), "--out", str(out), "--onnx")
    printed = capsys.readouterr().out
    assert rc == 0
    for row in ("parameters", "encoder MFLOPs/example", "attention MFLOPs", "FFN MFLOPs", "accuracy",
                "latency batch 1 (ms)", "latency batch 32 (ms)", "faster"):
        assert row in printed
    assert "skipped attention in layer(s) 1" in printed
    assert (out / PRUNING_FILE).exists() and (out / ONNX_FILE).exists()
    record = json.loads((out / PRUNING_FILE).read_text())
    assert record["kept_heads"] == [[0, 2, 3], []]
    assert load_pruned(out).adapter.num_heads(0) == 3


def test_apply_json(tiny_dir, reviews_csv, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert apply("--model", str(tiny_dir), "--prune-heads", "0:0", "--data", str(reviews_csv), "--limit", "10",
                 "--out", str(out), "--json") == 0
    result = json.loads(capsys.readouterr().out)
    figures = result["figures"]
    assert figures["parameters"]["pruned"] < figures["parameters"]["dense"]
    assert figures["attention_mflops"]["pruned"] < figures["attention_mflops"]["dense"]
    assert figures["ffn_mflops"]["pruned"] == figures["ffn_mflops"]["dense"]
    assert set(figures["latency_b32_ms"]) == {"dense", "pruned"}
    assert 0 < result["sparsity"] < 0.2
    # the folder exists now: refused without --overwrite, replaced with it
    assert apply("--model", str(tiny_dir), "--data", str(reviews_csv), "--out", str(out)) == 2
    assert "already exists" in capsys.readouterr().err
    assert apply("--model", str(tiny_dir), "--prune-heads", "1:1", "--data", str(reviews_csv), "--limit", "10",
                 "--out", str(out), "--overwrite", "--json") == 0
    assert json.loads((out / PRUNING_FILE).read_text())["kept_heads"] == [[0, 1, 2, 3], [0, 2, 3]]


@pytest.mark.parametrize("args, message", [
    (["--prune-heads", "0-1"], "LAYER:HEAD"),
    (["--prune-heads", "0:9"], "0:9 does not exist"),
    (["--prune-heads", "5:0"], "5:0 does not exist"),
    (["--ffn-keep", "0"], r"--ffn-keep must be a fraction in \(0, 1\]"),
    (["--ffn-keep", "1.5"], r"--ffn-keep must be a fraction in \(0, 1\]"),
    (["--hidden-keep", "abc"], r"--hidden-keep must be a fraction in \(0, 1\]"),
    (["--criterion", "taylor"], "invalid choice"),
])
def test_bad_input_exits_2_with_one_line(args, message, tiny_dir, reviews_csv, tmp_path, capsys):
    rc = apply("--model", str(tiny_dir), "--data", str(reviews_csv), "--out", str(tmp_path / "o"), *args)
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1
    assert re.search(message, err)
    assert not (tmp_path / "o").exists()


def test_argparse_errors_exit_2(capsys):
    assert apply("--prune-heads", "0:1") == 2  # --out missing
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--out" in err and err.count("\n") == 1


def test_missing_model_folder(tmp_path, capsys):
    assert apply("--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")) == 2
    assert "does not exist" in capsys.readouterr().err


def test_module_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pruning", "apply", "--model", str(tmp_path / "nope"),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_pruned_folder_gives_same_logits_as_reported_model(tiny_dir, reviews_csv, tmp_path):
    out = tmp_path / "p"
    assert apply("--model", str(tiny_dir), "--prune-heads", "0:3", "--ffn-keep", "0.25", "--data", str(reviews_csv),
                 "--limit", "5", "--out", str(out), "--json") == 0
    from core.models import load_model
    from pruning.gate_state import GateState
    from pruning.hooks import gated

    dense = load_model(str(tiny_dir))
    state = GateState.from_closed_heads(dense, [(0, 3)]).with_ffn_keep(dense.adapter, 0.25)
    back = load_pruned(out)
    batch = dense.tokenizer(["a great film", "an awful one"], padding=True, return_tensors="pt")
    with gated(dense, state), torch.no_grad():
        expected = dense.model(**batch).logits
    with torch.no_grad():
        assert (back.model(**batch).logits - expected).abs().max() <= 1e-4
