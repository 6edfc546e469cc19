"""The memory budget check before training: the estimate by hand, the default config fits, an impossible
one is refused with one clear line (CLI exit 2) instead of being killed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertForSequenceClassification

from core.models import load_model
from pruning import memory
from pruning.__main__ import main
from pruning.config import TrainConfig
from pruning.gates import GateShape
from pruning.runs import RunStore
from tests.conftest import MINILM_DIR

torch.set_num_threads(1)
TINY_SHAPE = GateShape(layers=2, heads=4, head_dim=8, intermediate=64, hidden=32)  # conftest's tiny BERT


def test_estimate_of_the_tiny_model_by_hand(tiny_dir):
    params = sum(p.numel() for p in load_model(str(tiny_dir)).model.parameters())
    # embeddings 30522*32 + 128*32 + 2*32 + LN 2*32; per layer Q, K, V, O 4*(32*32 + 32), FFN 32*64 + 64
    # + 64*32 + 32, 2 LN 2*2*32; pooler 32*32 + 32; classifier 32*2 + 2
    assert params == 30522 * 32 + 128 * 32 + 2 * 32 + 64 + 2 * (4 * 1056 + 2112 + 2080 + 128) + 1056 + 66 == 999138
    m = memory.estimate(params, params, TINY_SHAPE, batch=8, seq_len=12, gated=True)
    assert m.weights == 4 * params * 5 == 19_982_760  # weights, gradients, 2 AdamW moments, eval snapshot
    assert m.teacher == 4 * params == 3_996_552
    # per layer and token: floats 8*32 + 2*64 + 2*4*12 + (5*32 + 64) = 704 -> 2816 bytes, masks 4*12 + 2*32 = 112
    # bytes; embeddings 4*32 + 32 = 160 bytes; 8 examples x 12 tokens
    assert m.activations == 8 * 12 * (2 * (2816 + 112) + 160) == 577_536
    assert m.total == round((19_982_760 + 3_996_552 + 577_536 + 512 * 2**20) * 1.2) == 673_713_312
    assert m.needed == m.total and m.fits  # available unknown: no check
    ungated = memory.estimate(params, params, TINY_SHAPE, batch=8, seq_len=12, gated=False)
    assert m.activations - ungated.activations == 8 * 12 * 2 * 4 * (5 * 32 + 64)
    two = memory.estimate(params, params, TINY_SHAPE, batch=4, seq_len=12, gated=True, processes=2)
    assert two.needed == 2 * two.total  # CPU processes of a node share its memory


def test_available_memory_is_read_from_the_system():
    free = memory.available_bytes(torch.device("cpu"))
    kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
              if line.startswith("MemAvailable:"))
    assert free is not None and abs(free - kb * 1024) < 2**30  # the same figure, read a moment apart


@pytest.fixture(scope="module")
def minilm_classifier(tmp_path_factory) -> Path:
    """MiniLM-L6 (the default model's size: 6 layers x 12 heads, hidden 384) with a 2-label head."""
    folder = tmp_path_factory.mktemp("minilm") / "model"
    model = BertForSequenceClassification.from_pretrained(MINILM_DIR, num_labels=2, id2label={0: "neg", 1: "pos"},
                                                          label2id={"neg": 0, "pos": 1})
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(MINILM_DIR).save_pretrained(folder)
    return folder


def test_default_config_fits(minilm_classifier):
    c = TrainConfig().check()
    loaded = load_model(str(minilm_classifier))
    params = sum(p.numel() for p in loaded.model.parameters())
    m = memory.estimate(params, params, GateShape.of(loaded), c.batch_size, c.max_length, gated=True,
                        available=memory.available_bytes(torch.device("cpu")))
    assert memory.check(m) is m and m.total < 2 * 2**30, m


def test_impossible_config_is_refused_with_one_line(minilm_classifier, tmp_path, monkeypatch, capsys):
    """1000 full-length (512-token) reviews per step on MiniLM-L6: ~280 GiB of activations."""
    monkeypatch.setenv("HEADLAB_HOME", str(tmp_path))
    review = " ".join(["a great film"] * 180)  # > 512 tokens: cut at max_length
    rows = ["text,label"] + [f'"{review} {i}",{("pos", "neg")[i % 2]}' for i in range(1250)]
    data = tmp_path / "long.csv"
    data.write_text("\n".join(rows) + "\n")
    rc = main(["train", "--model", str(minilm_classifier), "--data", str(data), "--batch-size", "1000",
               "--max-length", "512", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: Training needs about "), err
    assert re.search(r"activations \d+\.\d GiB for 1000 examples x 512 tokens", err[-1])
    assert "lower batch_size or max_length" in err[-1] and not any("Traceback" in line for line in err)
    run = RunStore().list()[0]
    assert run.status == "failed" and "Training needs about" in run.error  # the page shows why
