"""Decoder foundations: GGUF -> fp32 safetensors conversion (core.gguf), the LM text (core.lm_text) and
sliding-window perplexity (core.perplexity).

The real SmolLM2 is loaded from its GGUF once per session (most of it transformers reading the GGUF
metadata: ~40 s on 2 idle cores, minutes on busy ones); the converted folder is the prepared built-in
(HEADLAB_HOME/models/smollm2) when it exists, else a conversion into a temporary folder.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import core.gguf
from core.__main__ import main as core_main
from core.cli import torch_threads
from core.data import TextDataset, split_dataset
from core.data.tasks import split_indices
from core.errors import ModelError
from core.folders import MARKER, FolderError, FolderExists, read_marker
from core.gguf import (
    RECORD,
    WRITER,
    check_gguf_file,
    conversion_record,
    load_gguf,
    save_converted,
    smollm2_gguf,
)
from core.lm_text import lee_documents, lee_splits, strip_wiki_markup, wiki_documents
from core.models import builtin_dir
from core.perplexity import perplexity, token_perplexity, windows
from core.prepare import prepare

SENTENCE = "Hundreds of people were forced to leave their homes as strong winds pushed the bushfire on."


def tiny_llama(seed: int = 0, vocab: int = 97, tied: bool = True) -> LlamaForCausalLM:
    """A random 2-layer Llama with GQA (4 query heads, 2 KV heads, head dim 8), eval mode."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tied)
    return LlamaForCausalLM(config).eval()


# ----------------------------------------------------------------------------- sliding window
def test_windows_score_every_token_once_with_the_stated_context():
    assert windows(9, 4, 2) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 9, 8)]
    assert windows(5, 8, 4) == [(0, 5, 1)]
    assert windows(1, 8, 4) == [] and windows(0, 8, 4) == []
    for n in range(0, 40):
        for window, stride in ((2, 1), (4, 3), (5, 2), (8, 7), (16, 8)):
            spans = windows(n, window, stride)
            targets = [t for _, end, first in spans for t in range(first, end)]
            assert targets == list(range(1, n)), (n, window, stride)
            for i, (begin, end, first) in enumerate(spans):
                assert begin < first <= end and end - begin <= window
                assert begin == i * stride
                if i:  # past the first window every scored token sees >= window - stride tokens before it
                    assert first - begin >= window - stride


def hand_nll(model, ids: list[int], context_start) -> tuple[float, int, int]:
    """Sum of -log p(token t | tokens context_start(t)..t-1) over t >= 1, argmax hits and count: one
    forward pass per token."""
    nll, hits = 0.0, 0
    with torch.no_grad():
        for t in range(1, len(ids)):
            logits = model(torch.tensor([ids[context_start(t):t]])).logits[0, -1].double()
            nll -= torch.log_softmax(logits, -1)[ids[t]].item()
            hits += int(logits.argmax().item() == ids[t])
    return nll, hits, len(ids) - 1


def test_full_context_perplexity_equals_a_token_by_token_computation():
    model = tiny_llama()
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 97, n).tolist() for n in (12, 1, 7, 30)]
    result = token_perplexity(model, docs, window=32, stride=16)  # every document fits in one window
    parts = [hand_nll(model, ids, lambda t: 0) for ids in docs]
    nll, hits, tokens = (sum(p[i] for p in parts) for i in range(3))
    assert result.tokens == tokens == 11 + 0 + 6 + 29
    assert result.nll == pytest.approx(nll / tokens, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert result.accuracy == hits / tokens
    assert (result.window, result.stride, result.documents) == (32, 16, 4)
    assert result.seconds > 0 and result.threads >= 1


def test_strided_perplexity_uses_each_windows_own_context():
    model = tiny_llama(seed=2)
    ids = np.random.default_rng(3).integers(0, 97, 20).tolist()
    spans = windows(20, 6, 4)
    assert spans == [(0, 6, 1), (4, 10, 6), (8, 14, 10), (12, 18, 14), (16, 20, 18)]
    begin_of = {t: begin for begin, end, first in spans for t in range(first, end)}  # where t's context starts
    nll, hits, tokens = hand_nll(model, ids, begin_of.__getitem__)
    result = token_perplexity(model, [ids], window=6, stride=4)
    assert result.tokens == tokens == 19
    assert result.nll == pytest.approx(nll / tokens, rel=1e-5)
    assert result.accuracy == hits / tokens
    full = token_perplexity(model, [ids], window=20, stride=10)
    assert abs(full.nll - result.nll) > 1e-4  # the window really cut the context


def test_perplexity_refuses_bad_windows():
    model = tiny_llama()
    for window, stride, word in ((1, 1, "'window'"), (8, 8, "'stride'"), (8, 0, "'stride'"),
                                 (65, 8, "max_position_embeddings")):
        with pytest.raises(ValueError, match=word):
            token_perplexity(model, [[1, 2, 3]], window=window, stride=stride)
    with pytest.raises(ValueError, match="two or more tokens"):
        token_perplexity(model, [[1], []], window=8, stride=4)


# ----------------------------------------------------------------------------- LM text
def test_lee_split_sizes_are_fixed_and_seeded():
    docs = lee_documents()
    assert len(docs) == 293 and all(docs) and len(set(docs)) == 293  # 300 lines, 7 repeated
    splits = lee_splits()
    assert [len(s) for s in (splits.train, splits.dev, splits.test)] == [234, 29, 30]
    assert splits.dev.name == "lee/dev" and "29 of 293" in splits.dev.selection
    assert sorted(splits.train.documents + splits.dev.documents + splits.test.documents) == sorted(docs)
    assert lee_splits() == splits  # deterministic
    assert lee_splits(seed=14).dev != splits.dev
    # the same rule as every other HeadLab split (core.data.split_dataset on the classification tasks)
    rows = TextDataset(texts=list(docs), labels=[0] * len(docs), label_names=["doc"], name="lee")
    same = split_dataset(rows)
    assert (same.train.texts, same.dev.texts, same.test.texts) == tuple(
        [docs[i] for i in idx] for idx in split_indices(len(docs)).values())
    assert 300_000 < sum(map(len, docs)) < 400_000


def test_strip_wiki_markup_keeps_the_prose():
    source = ("{{Infobox person|name=X|born={{birth date|1900|1|1}}}}\n'''Ada''' was a [[mathematician]] "
              "and [[writer|author]].<ref>{{cite book|title=T}}</ref> She wrote [http://example.org notes]."
              "<ref name=\"a\" />\n[[File:Ada.jpg|thumb|Ada in [[London]]]]\n== Life ==\n* She lived in "
              "[[London#Centre|London]].<!-- hidden -->\n{| class=\"wikitable\"\n| a || b\n|}\n[[de:Ada]]\n"
              "== References ==\n{{reflist}}\n[[Category:People]]")
    assert strip_wiki_markup(source) == ("Ada was a mathematician and author. She wrote notes.\n\nLife\n"
                                         "She lived in London.")


def test_wikipedia_articles_are_plain_text():
    wiki = wiki_documents()
    assert 90 <= len(wiki) <= 106 and wiki.name == "wiki"  # 206 pages: 99 redirects, 1 non-article, dabs
    assert wiki.characters > 2_000_000
    for doc in wiki.documents:
        assert "[[" not in doc and "{{" not in doc and "<ref" not in doc and "'''" not in doc
    assert wiki.documents[0].startswith("Anarchism is a political philosophy")


# ----------------------------------------------------------------------------- GGUF conversion
@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> SimpleNamespace:
    """The GGUF-loaded SmolLM2 model, the tokenizer and the converted folder.

    When the built-in is prepared, its folder and tokenizer are reused and only the GGUF weights are read
    (the conversion already checked that the saved tokenizer splits text like the GGUF one); otherwise the
    whole conversion runs into a temporary folder.
    """
    source = smollm2_gguf()
    folder = builtin_dir("smollm2")
    if conversion_record(folder) is not None:
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, local_files_only=True,
                                                     dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    else:
        model, tokenizer = load_gguf(source)
        folder = tmp_path_factory.mktemp("smollm2") / "smollm2"
        save_converted(model, tokenizer, folder, source=source)
    return SimpleNamespace(model=model, tokenizer=tokenizer, folder=folder)


@pytest.fixture(scope="session")
def converted(smollm2):
    """The converted folder loaded with transformers alone (model, tokenizer)."""
    model = AutoModelForCausalLM.from_pretrained(smollm2.folder, local_files_only=True, use_safetensors=True).eval()
    return model, AutoTokenizer.from_pretrained(smollm2.folder, local_files_only=True)


RELOAD_WITHOUT_GGUF = """
import json, sys
sys.modules["gguf"] = None  # any import of gguf now fails
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, sentence, out = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, use_safetensors=True).eval()
tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
ids = tokenizer(sentence, return_tensors="pt")
with torch.no_grad():
    torch.save(model(**ids).logits, out)
c = model.config
print(json.dumps(dict(layers=c.num_hidden_layers, heads=c.num_attention_heads, kv=c.num_key_value_heads,
                      hidden=c.hidden_size, head_dim=c.head_dim, mlp=c.intermediate_size, vocab=c.vocab_size,
                      tied=model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(),
                      arch=type(model).__name__, ids=ids["input_ids"][0].tolist(),
                      gguf_loaded="gguf" in sys.modules and sys.modules["gguf"] is not None,
                      chat=bool(tokenizer.chat_template))))
"""


def test_converted_smollm2_reloads_without_gguf_with_the_same_logits(smollm2, tmp_path):
    out = tmp_path / "logits.pt"
    done = subprocess.run([sys.executable, "-c", RELOAD_WITHOUT_GGUF, str(smollm2.folder), SENTENCE, str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    assert facts == dict(layers=30, heads=9, kv=3, hidden=576, head_dim=64, mlp=1536, vocab=49152, tied=True,
                         arch="LlamaForCausalLM", ids=smollm2.tokenizer(SENTENCE)["input_ids"], gguf_loaded=False,
                         chat=True)
    with torch.no_grad():
        expected = smollm2.model(**smollm2.tokenizer(SENTENCE, return_tensors="pt")).logits
    assert (torch.load(out) - expected).abs().max().item() < 1e-4


def test_converted_folder_is_a_plain_marked_safetensors_folder(smollm2):
    names = {p.name for p in smollm2.folder.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja", MARKER, RECORD} <= names
    assert not any(name.endswith((".bin", ".pt", ".gguf")) for name in names)
    config = json.loads((smollm2.folder / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert read_marker(smollm2.folder)["written_by"] == WRITER
    record = conversion_record(smollm2.folder)
    assert record.architecture == "LlamaForCausalLM" and record.tied_embeddings and record.chat_template
    assert 134_000_000 < record.parameters < 135_000_000 and record.max_logit_diff < 1e-4
    assert 500e6 < record.folder_bytes < 600e6  # fp32, the tied lm_head stored once


def test_converted_smollm2_perplexity_on_lee_dev_is_in_band_and_far_below_random(converted):
    model, tokenizer = converted
    docs = lee_splits().dev.documents[:4]  # 1,254 tokens
    with torch_threads(1):  # ~7 s either way; 2 threads on 2 cores shared with other jobs take 30 s
        result = perplexity(model, tokenizer, docs)
        torch.manual_seed(0)
        random = AutoModelForCausalLM.from_config(model.config).eval()
        noise = perplexity(random, tokenizer, docs[:1])
    assert result.tokens > 800 and (result.window, result.stride) == (512, 256)
    assert 15 < result.perplexity < 60, result  # measured 24.4 (all 29 dev articles: 29.8)
    assert 0.25 < result.accuracy < 0.6, result  # measured 0.363
    assert noise.perplexity > 1000 and noise.perplexity > 100 * result.perplexity, noise  # measured 55,000


def test_save_converted_on_a_tiny_tied_llama(smollm2, tmp_path):
    """The saving half of a conversion without the minute of GGUF reading: a tiny tied Llama with a
    quantisation record in its config (as a GGUF-loaded model has), SmolLM2's tokenizer."""
    model = tiny_llama(vocab=49152)
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf"}
    out = tmp_path / "tiny"
    steps = []
    record = save_converted(model, smollm2.tokenizer, out, source="x.gguf",
                            progress=lambda done, total, message: steps.append((done, total)))
    assert steps == [(2, 5), (3, 5), (4, 5), (5, 5)]  # load_gguf reports 0 and 1
    assert record.tied_embeddings and record.max_logit_diff < 1e-6 and record.architecture == "LlamaForCausalLM"
    assert conversion_record(out) == record
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    with pytest.raises(FolderExists):
        save_converted(model, smollm2.tokenizer, out, source="x.gguf")
    assert save_converted(model, smollm2.tokenizer, out, source="y.gguf", overwrite=True).source == "y.gguf"
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep")
    with pytest.raises(FolderError, match="not written by HeadLab"):
        save_converted(model, smollm2.tokenizer, user, source="x.gguf", overwrite=True)
    assert (user / "notes.txt").read_text() == "keep" and not list(tmp_path.glob(".*partial*"))


def test_prepare_smollm2_reuses_a_converted_folder(smollm2, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HEADLAB_HOME", str(tmp_path / "home"))
    out = builtin_dir("smollm2")
    save_converted(tiny_llama(vocab=49152), smollm2.tokenizer, out, source="tiny.gguf")

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(core.gguf, "convert_gguf", no_conversion)
    assert prepare("smollm2").source == "tiny.gguf"
    assert core_main(["prepare", "smollm2"]) == 0
    assert capsys.readouterr().out.startswith("smollm2: LlamaForCausalLM, 1.6 M parameters")
    with pytest.raises(AssertionError, match="converted again"):
        prepare("smollm2", force=True)
    shutil.rmtree(out)
    with pytest.raises(AssertionError, match="converted again"):
        prepare("smollm2")


def test_not_a_gguf_file_is_one_clear_line(tmp_path):
    with pytest.raises(ModelError, match="is not a file"):
        check_gguf_file(tmp_path / "missing.gguf")
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not gguf")
    with pytest.raises(ModelError, match="not a GGUF file"):
        load_gguf(fake)
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(smollm2_gguf().read_bytes()[:4096])
    with pytest.raises(ModelError, match="cannot load cut.gguf"):
        load_gguf(truncated)
    assert check_gguf_file(smollm2_gguf()) == smollm2_gguf()
