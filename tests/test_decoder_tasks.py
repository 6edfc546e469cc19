"""Tasks for decoders: text without labels (built-in Lee / Wikipedia, a user's .txt / .jsonl) through the one
DataSpec, `python -m core evaluate` on text (perplexity) and on labeled data (zero-shot by prompting), and
decoding (KV cache vs none, generation of a reply).

Invariants run on the tiny random decoders; the real SmolLM2 runs the CLI's JSON (perplexity band, zero-shot
above the majority class) and a few greedy checks, on one thread (2 threads on 2 shared cores are slower).
"""

from __future__ import annotations

import io
import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from core.__main__ import main as core_main
from core.cli import torch_threads
from core.data import DataError, DataSpec, load_data, load_text, read_documents
from core.generation import MAX_NEW_TOKENS, generate_reply, greedy_decode
from core.latency import measure_prefill, text_batch
from core.lm_text import lee_splits, wiki_splits
from core.models import load_model
from core.perplexity import perplexity
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
