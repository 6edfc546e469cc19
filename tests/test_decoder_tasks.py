"""Tasks for decoders: text without labels (built-in Lee / Wikipedia, a user's .txt / .jsonl) through the one
DataSpec, `python -m core evaluate` on text (perplexity) and on labeled data (zero-shot by prompting), and
decoding (KV cache vs none, generation of a reply).

Invariants run on the tiny random decoders; the real SmolLM2 runs the CLI's JSON (perplexity band, zero-shot
above the majority class) and a few greedy checks, on one thread (2 threads on 2 shared cores are slower).
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from core.__main__ import main as core_main
from core.cli import torch_threads
from core.data import DataError, DataSpec, load_data, load_text, read_documents
from core.errors import ModelNotPrepared
from core.generation import MAX_NEW_TOKENS, generate_reply, greedy_decode
from core.gguf import conversion_record
from core.gguf_cache import gguf_cache_dir
from core.latency import measure_prefill, text_batch
from core.lm_text import lee_splits, wiki_splits
from core.models import load_model
from core.paths import models_dir
from core.perplexity import fit_window, perplexity
from core.summary import summarise_text

DOCS = [f"Document {i} has its own words, number {i}." for i in range(12)]


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on 2 cores shared with other work, two threads of a small model run several times slower."""
    with torch_threads(1):
        yield


def lines_of(capsys) -> tuple[str, str]:
    out = capsys.readouterr()
    return out.out, out.err.strip()


# ----------------------------------------------------------------------------- text files
def test_txt_documents_are_blocks_separated_by_blank_lines(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes("\ufeffFirst line of one.\r\nSecond line of one.\r\n\r\n\r\n  Two.  \n \t \nThree\n\n".encode())
    text = read_documents(path)
    assert text.documents == ("First line of one.\nSecond line of one.", "Two.", "Three")
    assert text.name == "notes.txt" and text.selection == "the whole file, 3 documents"
    single = tmp_path / "one.txt"
    single.write_text("no blank line here\njust one document\n")
    assert read_documents(single).documents == ("no blank line here\njust one document",)
    upload = io.BytesIO(b"a\n\nb")
    upload.name = "up.txt"
    assert read_documents(upload).documents == ("a", "b")


def test_jsonl_documents_are_a_text_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"id": 1, "text": "alpha beta"}\n\n{"id": 2, "text": null}\n{"id": 3, "text": "gamma", '
                    '"body": "other"}\n')
    assert read_documents(path).documents == ("alpha beta", "gamma")  # the null text is skipped
    assert read_documents(path, text_column="BODY").documents == ("other",)
    array = tmp_path / "docs.json"
    array.write_text(json.dumps([{"content": "one"}, {"content": "two"}]))
    assert read_documents(array).documents == ("one", "two")


@pytest.mark.parametrize("name, content, column, message", [
    ("empty.txt", "  \n\n ", None, "empty.txt is empty"),
    ("latin.txt", "caf\xe9".encode("latin-1"), None, "is not UTF-8 text (byte 0xe9"),
    ("table.csv", "text\nhello\n", None, "read from .txt (documents separated by blank lines) or .jsonl"),
    ("bad.jsonl", '{"text": "a"}\n{"text": \n', None, "bad.jsonl line 2 is not valid JSON"),
    ("list.jsonl", '["a", "b"]\n', None, "item 1 is not a JSON object"),
    ("ids.jsonl", '{"id": 1}\n{"id": 2}\n', None, "has no 'text' field (fields: id)"),
    ("nulls.jsonl", '{"text": null}\n', None, "holds no non-empty document"),
    ("plain.txt", "words", "text", "is plain text and has no columns"),
    ("field.jsonl", '{"text": "a"}\n', "body", "has no text column 'body'; available columns: text"),
])
def test_bad_text_files_are_one_line(tmp_path, name, content, column, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=re.escape(message)) as info:
        read_documents(path, text_column=column)
    assert "\n" not in str(info.value)


def test_a_text_file_is_split_by_document_unless_the_whole_file_is_asked_for(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("\n\n".join(DOCS))
    spec = DataSpec(str(path), task="lm")
    # seed 13 permutes 12 items as [6 1 5 0 4 7 2 8 3 | 10 | 11 9]: train 9, dev 1, test 2
    assert load_text(spec, "dev").documents == (DOCS[10],)
    assert load_text(spec, "test").documents == (DOCS[11], DOCS[9])
    assert load_text(spec, "train").documents == tuple(DOCS[i] for i in (6, 1, 5, 0, 4, 7, 2, 8, 3))
    assert load_text(spec).selection == "dev split, 1 of 12 documents, seeded 80/10/10"
    whole = DataSpec(str(path), task="lm", whole_file=True)
    assert load_text(whole).documents == tuple(DOCS)
    assert "every document, as asked" in whole.caption(load_text(whole))
    with pytest.raises(DataError, match="there is no 'train' split"):
        load_text(whole, "train")
    short = tmp_path / "short.txt"
    short.write_text("a\n\nb\n\nc")
    with pytest.raises(DataError, match="has 3 documents; a seeded 80/10/10 split .* needs at least 10"):
        load_text(DataSpec(str(short), task="lm"))
    assert load_text(DataSpec(str(short), task="lm", whole_file=True)).documents == ("a", "b", "c")


def test_builtin_text_tasks_are_the_seeded_lee_and_wikipedia_splits():
    lm = DataSpec("LM")
    assert (lm.path, lm.task, lm.is_text, lm.is_builtin, lm.cli_args()) == ("lm", "lm", True, True, ["--data", "lm"])
    assert load_text(lm) == lee_splits().dev and len(load_text(lm)) == 29
    assert load_text("lm", "test") == lee_splits().test
    wiki = wiki_splits()
    assert [len(wiki.train), len(wiki.dev), len(wiki.test)] == [78, 9, 11]  # 98 articles
    assert load_text("wiki") == wiki.dev and load_text("wiki").name == "wiki/dev"
    assert not set(wiki.dev.documents) & set(wiki.train.documents)
    # a user's file of the same documents reads the same documents
    assert DataSpec.from_json(DataSpec("x.txt", task="lm").to_json()) == DataSpec("x.txt", task="LM")


@pytest.mark.parametrize("make, message", [
    (lambda: DataSpec("lm", task="classify"), "The built-in text 'lm' is language-modelling text (task lm)"),
    (lambda: DataSpec("default", task="lm"), "The default task is labeled data for classification"),
    (lambda: DataSpec("wiki", whole_file=True), "applies to a data file; the built-in text 'wiki' is always split"),
    (lambda: DataSpec("lm", text_column="body"), "The built-in text lm's columns are fixed"),
    (lambda: DataSpec("n.txt", task="lm", label_column="y"), "has no labels: drop the label column 'y'"),
    (lambda: DataSpec("n.txt", task="lm", label_map={"a": "b"}), "has no labels: drop the label map"),
    (lambda: DataSpec("n.txt", task="generate"), "The task must be one of classify, lm"),
    (lambda: load_data("lm"), "is language-modelling text without labels; classification needs labeled data"),
    (lambda: load_text("default"), "is labeled data for classification; perplexity reads text"),
])
def test_text_and_labeled_specs_do_not_mix(make, message):
    with pytest.raises(DataError, match=re.escape(message)) as info:
        make()
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- the CLI on text
def test_an_encoder_on_text_is_one_clear_line(tiny_dir, capsys):
    assert core_main(["evaluate", "--model", str(tiny_dir), "--data", "lm", "--limit", "1"]) == 2
    out, err = lines_of(capsys)
    assert err == (f"error: Perplexity needs a causal language model (a decoder such as smollm2); {tiny_dir} is a "
                   "bert encoder: evaluate it on labeled data, e.g. the default task.")
    assert out == ""


@pytest.mark.parametrize("args, message", [
    (["--data", "lm", "--prompt", "Say {text}"], "apply to labeled data; perplexity on text (lm) reads no prompt"),
    (["--label-words", "yes,no,maybe"], "--label-words: 3 word(s) for 2 labels (fresh, rotten)"),
    (["--prompt", "no slot"], "must contain {text}"),
    (["--data", "lm", "--window", "8", "--stride", "8"], "'stride' parameter of perplexity()"),
])
def test_bad_decoder_options_are_one_line(tiny_decoders, capsys, args, message):
    assert core_main(["evaluate", "--model", str(tiny_decoders["llama"]), "--limit", "1", *args]) == 2
    _, err = lines_of(capsys)
    assert message in err and "\n" not in err and err.startswith("error: ")


def test_prompt_options_on_an_encoder_are_refused(tiny_dir, capsys):
    assert core_main(["evaluate", "--model", str(tiny_dir), "--label-words", "bad,good"]) == 2
    assert "read a decoder as a classifier" in lines_of(capsys)[1]


def test_a_users_text_file_reaches_the_cli(tiny_decoders, tmp_path, capsys):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[:3]))
    folder = tiny_decoders["qwen2"]
    assert core_main(["evaluate", "--model", str(folder), "--data", str(path), "--task", "lm", "--whole-file",
                      "--json", "--window", "16", "--stride", "8"]) == 0
    row = json.loads(lines_of(capsys)[0])
    loaded = load_model(str(folder))
    direct = perplexity(loaded.lm, loaded.text_tokenizer, DOCS[:3], window=16, stride=8)
    assert (row["data"], row["documents"], row["tokens"]) == (str(path), 3, direct.tokens)
    assert row["perplexity"] == pytest.approx(direct.perplexity, abs=1e-3)
    assert row["next_token_accuracy"] == pytest.approx(direct.accuracy, abs=1e-4)
    assert (row["window"], row["stride"], row["prefill_tokens"], row["decode_tokens"]) == (16, 8, 64, 32)
    assert row["decode_tokens_per_s"] > 0 and 0 < row["prefill_b1_ms"] and 0 < row["prefill_b8_ms"]


def test_the_default_window_fits_the_models_positions(tiny_decoders):
    lm = AutoModelForCausalLM.from_pretrained(tiny_decoders["llama"], local_files_only=True)
    assert lm.config.max_position_embeddings == 256
    assert fit_window(lm) == (256, 128) and fit_window(lm, 64) == (64, 32) and fit_window(lm, 300, 10) == (300, 10)
    lm.config.max_position_embeddings = 8192
    assert fit_window(lm) == (512, 256)


def test_cli_perplexity_json_on_the_real_smollm2(smollm2_dir, capsys):
    code = core_main(["evaluate", "--model", str(smollm2_dir), "--data", "lm", "--limit", "2", "--json"])
    out, err = lines_of(capsys)
    assert code == 0, err
    row = json.loads(out)
    assert row["data"] == "lm:dev" and row["documents"] == 2 and row["tokens"] > 300
    assert 10 < row["perplexity"] < 60, row  # measured 21.7 on these two Lee dev articles
    assert 0.25 < row["next_token_accuracy"] < 0.6, row  # measured 0.39
    assert (row["window"], row["stride"], row["threads"]) == (512, 256, 1)
    assert row["prefill_b8_ms"] > row["prefill_b1_ms"] > 0 and row["decode_tokens_per_s"] > 0
    assert row["parameters"] == 134_515_008


def test_cli_zero_shot_on_the_real_smollm2_beats_the_majority(smollm2_dir, capsys):
    n = 40
    labels = load_data("default", "dev").subset(n, seed=0).labels
    majority = max(labels.count(0), labels.count(1)) / n
    code = core_main(["evaluate", "--model", str(smollm2_dir), "--limit", str(n), "--json"])
    out, err = lines_of(capsys)
    assert code == 0, err
    row = json.loads(out)
    assert row["data"] == "default:dev" and row["examples"] == n
    assert row["accuracy"] > majority + 0.1, (row, majority)  # measured 0.8 vs 0.6
    assert set(row) >= {"latency_b1_ms", "latency_b8_ms", "macro_f1"} and "latency_b32_ms" not in row


def test_cli_label_words_and_prompt_reach_the_decoder(tiny_decoders, tmp_path, capsys):
    """Two labels with their words swapped: every prediction flips. A user's prompt template reaches the
    job record (and changes the predictions of this random model)."""
    folder = str(tiny_decoders["llama"])
    records = {}
    for name, options in (("plain", []), ("swapped", ["--label-words", "negative,positive"]),
                          ("prompt", ["--prompt", "Review: {text}\nVerdict?", "--no-chat"])):
        out = tmp_path / f"{name}.json"
        assert core_main(["evaluate", "--model", folder, "--limit", "30", "--out", str(out), *options]) == 0
        records[name] = json.loads(out.read_text())
    capsys.readouterr()
    plain, swapped, prompt = records["plain"], records["swapped"], records["prompt"]
    assert swapped["figures"]["accuracy"] == pytest.approx(1 - plain["figures"]["accuracy"])
    flipped = {"fresh": "rotten", "rotten": "fresh"}
    assert [flipped[p["predicted"]] for p in plain["predictions"]] == [p["predicted"] for p in swapped["predictions"]]
    assert plain["prompt"]["label_words"] == ["positive", "negative"] and plain["prompt"]["chat"]
    assert prompt["prompt"] == {"template": "Review: {text}\nVerdict?", "label_words": ["positive", "negative"],
                                "chat": False}
    assert [p["confidence"] for p in prompt["predictions"]] != [p["confidence"] for p in plain["predictions"]]


# ----------------------------------------------------------------------------- decoding and timing
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_kv_cache_decoding_gives_the_no_cache_and_generate_tokens(tiny_decoders, arch):
    """Gemma3's sliding window (4 tokens) is shorter than the 20-token prompt: the cache must slide too."""
    lm = AutoModelForCausalLM.from_pretrained(tiny_decoders[arch], local_files_only=True).eval()
    ids = torch.randint(3, lm.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(1))
    cached, seconds = greedy_decode(lm, ids, 12)
    plain, _ = greedy_decode(lm, ids, 12, use_cache=False)
    reference = lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                            eos_token_id=None, pad_token_id=0)[0, 20:].tolist()
    assert len(cached) == 12 and cached == plain == reference and seconds > 0
    with pytest.raises(ValueError, match="'new_tokens' parameter"):
        greedy_decode(lm, ids, 0)


def test_kv_cache_decoding_on_the_real_smollm2(smollm2_dir):
    lm = AutoModelForCausalLM.from_pretrained(smollm2_dir, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)
    ids = tokenizer("Once upon a time, in a small village by the sea,", return_tensors="pt")["input_ids"]
    cached, _ = greedy_decode(lm, ids, 10)
    assert cached == greedy_decode(lm, ids, 10, use_cache=False)[0]
    reply = generate_reply(lm, tokenizer, "What is the capital of France?", max_new_tokens=12)
    assert tokenizer.decode(cached).startswith(" there was")
    assert "Paris" in reply.text and reply.stopped and reply.greedy and reply.tokens_per_s > 0


def test_generate_reply_is_bounded_seeded_and_leaves_the_callers_rng_alone(tiny_decoders, smollm2_dir):
    lm = AutoModelForCausalLM.from_pretrained(tiny_decoders["llama"], local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_decoders["llama"], local_files_only=True)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    first = generate_reply(lm, tokenizer, "Tell me a story.", max_new_tokens=16, temperature=1.0, seed=7)
    assert torch.equal(torch.rand(3), expected)  # sampling forked the RNG
    again = generate_reply(lm, tokenizer, "Tell me a story.", max_new_tokens=16, temperature=1.0, seed=7)
    other = generate_reply(lm, tokenizer, "Tell me a story.", max_new_tokens=16, temperature=1.0, seed=8)
    assert first.text == again.text and first.text != other.text and not first.greedy
    assert first.new_tokens <= 16 and first.prompt_tokens > 5  # the chat template wraps the prompt
    greedy = [generate_reply(lm, tokenizer, "Tell me a story.", max_new_tokens=16, seed=s) for s in (0, 99)]
    assert greedy[0].greedy and greedy[0].text == greedy[1].text  # argmax decoding ignores the seed
    for kwargs, message in (({"max_new_tokens": MAX_NEW_TOKENS + 1}, "'max_new_tokens' parameter"),
                            ({"temperature": -1}, "'temperature' parameter"), ({"prompt": " "}, "non-empty")):
        with pytest.raises(ValueError, match=message):
            generate_reply(lm, tokenizer, **{"prompt": "hi", **kwargs})


def test_prefill_rows_are_consecutive_unpadded_pieces_of_the_text(tiny_decoders):
    tokenizer = AutoTokenizer.from_pretrained(tiny_decoders["llama"], local_files_only=True)
    texts = ["The first document is short.", "The second one is a little longer than the first."]
    stream = [t for text in texts for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
    batch = text_batch(tokenizer, texts, 3, tokens=8)
    assert batch["input_ids"].shape == (3, 8) and batch["attention_mask"].all()
    assert batch["input_ids"].flatten().tolist() == (stream * 3)[:24]
    lm = AutoModelForCausalLM.from_pretrained(tiny_decoders["llama"], local_files_only=True).eval()
    timed = measure_prefill(lm, tokenizer, texts, tokens=8, repeats=5, budget_s=0.1)
    assert sorted(timed) == [1, 8]
    assert all((lat.batch_size, lat.seq_len, lat.repeats) == (b, 8, 5) for b, lat in timed.items())


def test_summarise_text_is_the_perplexity_of_the_documents(tiny_decoders):
    loaded = load_model(str(tiny_decoders["gemma3"]))
    text = lee_splits().dev.subset(2)
    summary = summarise_text(loaded, text, window=32, stride=16)
    direct = perplexity(loaded.lm, loaded.text_tokenizer, text.documents, window=32, stride=16)
    assert summary.perplexity.tokens == direct.tokens and summary.perplexity.nll == pytest.approx(direct.nll)
    row = summary.as_row()
    assert row["documents"] == 2 and row["decode_tokens"] == 32 and summary.decode.tokens_per_s > 0
    assert row["prefill_tokens"] == 64 and set(summary.prefill) == {1, 8}


# ----------------------------------------------------------------------------- a .gguf file as a model spec
def write_tiny_gguf(path: Path, d: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2, ffn: int = 48) -> Path:
    """A random Llama with GQA as a GGUF file (fp32 tensors, tied embeddings) with a byte-level BPE vocabulary
    of the 256 bytes, a few merges (" p" and " n" among them, so the default label words " positive" and
    " negative" start with different tokens) and an end token: transformers reads it in seconds."""
    rng = np.random.default_rng(0)
    tokens = [*bytes_to_unicode().values(), "Ġt", "he", "Ġthe", "Ġp", "Ġn", "<|endoftext|>"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(128)
    writer.add_embedding_length(d)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(tokens) - 1) + [3])
    writer.add_token_merges(["Ġ t", "h e", "Ġt he", "Ġ p", "Ġ n"])
    writer.add_bos_token_id(len(tokens) - 1)
    writer.add_eos_token_id(len(tokens) - 1)
    head = d // heads
    shapes = {"token_embd.weight": (len(tokens), d), "output_norm.weight": (d,)}
    for i in range(layers):
        shapes |= {f"blk.{i}.attn_norm.weight": (d,), f"blk.{i}.attn_q.weight": (heads * head, d),
                   f"blk.{i}.attn_k.weight": (kv_heads * head, d), f"blk.{i}.attn_v.weight": (kv_heads * head, d),
                   f"blk.{i}.attn_output.weight": (d, heads * head), f"blk.{i}.ffn_norm.weight": (d,),
                   f"blk.{i}.ffn_gate.weight": (ffn, d), f"blk.{i}.ffn_up.weight": (ffn, d),
                   f"blk.{i}.ffn_down.weight": (d, ffn)}
    for name, shape in shapes.items():
        values = 1 + 0.1 * rng.standard_normal(shape) if len(shape) == 1 else 0.1 * rng.standard_normal(shape)
        writer.add_tensor(name, values.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_gguf_file_is_converted_once_into_the_cache_and_loads(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HEADLAB_HOME", str(tmp_path / "home"))
    source = write_tiny_gguf(tmp_path / "tiny.gguf")
    with pytest.raises(ModelNotPrepared, match=re.escape(f"tiny.gguf is converted once into a plain fp32 folder under "
                                                         f"HEADLAB_HOME (1-2 min for a 100 MB file on 2 cores): run "
                                                         f"`python -m core prepare {source}`")):
        load_model(str(source))
    assert core_main(["prepare", str(source)]) == 0
    assert lines_of(capsys)[0].startswith(f"{source}: LlamaForCausalLM, 0.0 M parameters")
    folder = gguf_cache_dir(source)
    assert folder.parent == models_dir() / "gguf" and folder.name.startswith("tiny-")
    assert conversion_record(folder).source == str(source) and conversion_record(folder).tied_embeddings
    loaded = load_model(str(source))
    assert loaded.is_decoder and loaded.path == folder and loaded.architecture().kv_heads == 2
    written = (folder / "model.safetensors").stat().st_mtime_ns
    options = ["--data", "lm", "--limit", "1", "--window", "64", "--stride", "32", "--json"]
    assert core_main(["evaluate", "--model", str(source), *options]) == 0
    assert json.loads(lines_of(capsys)[0])["perplexity"] > 1
    assert (folder / "model.safetensors").stat().st_mtime_ns == written  # converted once
    # a file changed in place is another model: converted again, on load, by the command that needs it
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))
    assert gguf_cache_dir(source) != folder
    assert core_main(["evaluate", "--model", str(source), *options]) == 0
    assert conversion_record(gguf_cache_dir(source)) is not None


def test_a_file_that_is_not_gguf_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HEADLAB_HOME", str(tmp_path / "home"))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 a zip, not a model")
    for command in (["prepare", str(fake)], ["evaluate", "--model", str(fake)],
                    ["evaluate", "--model", str(tmp_path / "missing.gguf")]):
        assert core_main(command) == 2
        err = lines_of(capsys)[1].splitlines()[-1]
        assert err.startswith("error: ") and ("is not a GGUF file" in err or "is not a file" in err), err
