"""The Model page on the real SmolLM2, driven headless with Streamlit's AppTest: architecture, perplexity and
speed on the Lee dev articles (a background job), zero-shot accuracy on a seeded subset with the editable
prompt (a background job started by a button), and a generated reply."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core.data import DataSpec
from core.prompting import PromptSpec
from tests.conftest import link_prepared, stop_background_work
from tests.test_app import ROOT, metrics, run_until

SMOLLM2 = "SmolLM2-135M-Instruct (decoder: perplexity, zero-shot by prompting, generation)"


@pytest.fixture
def fresh_home(tmp_path, monkeypatch, smollm2_dir) -> Iterator[Path]:
    """A HEADLAB_HOME with the prepared models (SmolLM2 converted) but no cached results or jobs."""
    link_prepared(tmp_path)
    monkeypatch.setenv("HEADLAB_HOME", str(tmp_path))
    yield tmp_path
    stop_background_work(tmp_path)


def button(at: AppTest, label: str):
    return next(b for b in at.button if b.label == label)


def test_model_page_on_smollm2(fresh_home):
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=180)
    at.session_state["model_choice"] = SMOLLM2  # not the default encoder first: its evaluation would start
    at.run()
    assert not at.exception, at.exception
    shown = metrics(at)
    assert {k: shown[k] for k in ("Type", "Layers", "Query heads", "KV heads", "Hidden", "FFN", "Parameters")} == {
        "Type": "llama", "Layers": "30", "Query heads": "9", "KV heads": "3", "Hidden": "576", "FFN": "1536",
        "Parameters": "134.5 M"}
    assert at.session_state["model_spec"] == "smollm2"
    assert any("29 of 293 Lee news articles" in c.value for c in at.caption)

    run_until(at, lambda a: "Perplexity" in metrics(a), timeout=600)
    shown = metrics(at)
    assert 15 < float(shown["Perplexity"]) < 60, shown  # measured 29.8 on the 29 Lee dev articles
    assert shown["Prefill, batch 1"].endswith(" ms") and shown["Prefill, batch 8"].endswith(" ms")
    assert float(shown["Decode"].split()[0]) > 0
    assert any("Sliding window of 512 tokens, stride 256" in c.value for c in at.caption)

    # zero-shot on a seeded subset, with the default prompt of the default task's labels
    assert at.text_input(key="label_words").value == "positive, negative"
    at.number_input(key="zero_shot_limit").set_value(20).run()
    assert "Zero-shot accuracy" not in metrics(at)  # a decoder's evaluation waits for the button
    button(at, "Evaluate zero-shot").click().run()
    run_until(at, lambda a: "Zero-shot accuracy" in metrics(a), timeout=600)
    accuracy = next(m for m in at.metric if m.label == "Zero-shot accuracy")
    assert accuracy.help == "on 20 examples" and 0.5 <= float(accuracy.value.rstrip("%")) / 100 <= 1
    assert at.session_state["data_spec"] == DataSpec()
    assert at.session_state["prompt_spec"] == PromptSpec.for_labels(["fresh", "rotten"])
    at.text_input(key="label_words").input("negative, positive").run()  # another prompt: not measured yet
    assert at.session_state["prompt_spec"].label_words == ("negative", "positive")
    assert "Zero-shot accuracy" not in metrics(at) and button(at, "Evaluate zero-shot")
    at.text_input(key="label_words").input("negative").run()
    assert any("1 word(s) for 2 labels (fresh, rotten)" in e.value for e in at.error)

    # a reply to the default question, greedy
    at.text_input(key="label_words").input("positive, negative").run()
    button(at, "Generate").click().run()
    assert not at.exception, at.exception
    assert "Paris" in at.text[0].value
    assert any("tokens/s" in c.value and "greedy; the model ended its turn" in c.value for c in at.caption)


def test_model_page_converts_a_gguf_file_in_the_background(fresh_home, tmp_path):
    from tests.test_decoder_tasks import write_tiny_gguf

    source = write_tiny_gguf(tmp_path / "tiny.gguf")
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.session_state["model_choice"] = "Local Hugging Face folder"
    at.run()
    at.text_input(key="model_path").input(str(source)).run()
    assert any("tiny.gguf is converted once into a plain fp32 folder" in i.value for i in at.info)
    run_until(at, lambda a: "KV heads" in metrics(a), timeout=300)
    shown = metrics(at)
    assert (shown["Layers"], shown["Query heads"], shown["KV heads"], shown["Hidden"]) == ("2", "4", "2", "32")
    assert at.session_state["model_spec"] == str(source)
    assert list((fresh_home / "models" / "gguf").iterdir())[0].name.startswith("tiny-")
    run_until(at, lambda a: "Perplexity" in metrics(a), timeout=300)  # its 128 positions set the window
    assert any("Sliding window of 128 tokens, stride 64" in c.value for c in at.caption)


def session_script():
    """What another page sees of the session: the prompted model and the dev rows."""
    import streamlit as st

    from ui.loaders import session_model_and_dev

    _, _, loaded, data = session_model_and_dev()
    st.write(f"{loaded.label_names} {loaded.prompt.label_words} {len(data)}")


def test_other_pages_get_the_decoder_prompted_as_on_the_model_page(tiny_decoders, tmp_path):
    data = tmp_path / "pos_neg.csv"
    data.write_text("text,label\n" + "".join(f"a great film {i},pos\nan awful film {i},neg\n" for i in range(20)))
    at = AppTest.from_function(session_script, default_timeout=60)
    at.session_state["model_spec"] = str(tiny_decoders["qwen2"])
    at.session_state["data_spec"] = DataSpec(str(data))
    at.run()
    assert not at.exception, at.exception
    assert at.markdown[0].value == "['neg', 'pos'] ('negative', 'positive') 4"  # the data's own labels, default words
    at.session_state["prompt_spec"] = PromptSpec(("bad", "good"), "Is this review good or bad? {text}")
    at.run()
    assert at.markdown[0].value == "['neg', 'pos'] ('bad', 'good') 4"
    at.session_state["prompt_spec"] = PromptSpec(("no", "maybe", "yes"))  # words for other labels: not used
    at.run()
    assert at.markdown[0].value == "['neg', 'pos'] ('negative', 'positive') 4"
