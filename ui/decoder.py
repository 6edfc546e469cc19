"""The Model page on a decoder: language modelling on a text (perplexity, next-token accuracy, prefill
latency, decoding speed), zero-shot classification with an editable prompt, and a reply to a prompt.

The two evaluations run as background jobs (`python -m core evaluate`, cached by model, data and prompt);
the reply is generated in the page (at most `core.generation.MAX_NEW_TOKENS` tokens). Session state:
"text_spec" (the text's `DataSpec`), "data_spec" and "prompt_spec" (read by the other pages through
`ui.loaders.session_model_and_dev`), "generation" (the last reply, with the model's fingerprint).
"""

from __future__ import annotations

import json

import pandas as pd
import streamlit as st

from core.cpu_queue import paused_for_timing
from core.errors import ModelError
from core.generation import MAX_NEW_TOKENS, MAX_TEMPERATURE, generate_reply
from core.jobs import job_state
from core.loaded import LoadedModel
from core.prompt_options import parse_label_words, prompt_args
from core.prompting import DEFAULT_TEMPLATE, PromptSpec, PromptTokenizer
from core.summary import prompt_key, summary_path
from ui.data import data_choice, text_choice
from ui.jobs import ensure_job, wait_for
from ui.loaders import get_data, get_text
from ui.model_view import timing_notes

DEFAULT_REQUEST = "What is the capital of France?"


def language_modelling(spec: str, loaded: LoadedModel) -> None:
    """Perplexity and speed of the decoder on the chosen text's dev documents (a background job)."""
    st.subheader("Language modelling")
    text_spec = text_choice()
    text = get_text(text_spec) if text_spec else None
    if text is None:
        return
    st.session_state["text_spec"] = text_spec
    st.caption(text_spec.caption(text))
    out = summary_path(loaded.fingerprint, f"text-{text.fingerprint()}")
    job = f"perplexity-{loaded.fingerprint}-{text.fingerprint()}"
    if not out.exists():
        ensure_job(job, ["core", "evaluate", "--model", spec, *text_spec.cli_args(), "--json", "--out", str(out),
                         "--job", job])
        wait_for(job, "Perplexity", out.exists)
        return
    fig = json.loads(out.read_text())["figures"]
    cols = st.columns(5)
    cols[0].metric("Perplexity", f"{fig['perplexity']:.2f}",
                   help=f"exp(mean negative log-likelihood) over {fig['tokens']:,} tokens of {fig['documents']} "
                        "documents")
    cols[1].metric("Next-token accuracy", f"{fig['next_token_accuracy']:.1%}", help="argmax = the next token")
    for col, b in zip(cols[2:4], (1, 8)):
        col.metric(f"Prefill, batch {b}", f"{fig[f'prefill_b{b}_ms']:.0f} ms",
                   help=f"p90 {fig[f'prefill_b{b}_p90_ms']} ms")
    cols[4].metric("Decode", f"{fig['decode_tokens_per_s']:.1f} tokens/s", help="batch 1, greedy, with the KV cache")
    st.caption(f"Sliding window of {fig['window']} tokens, stride {fig['stride']}: each document scored on its own, "
               f"every token after its first once. Prefill: one forward pass over {fig['prefill_tokens']} tokens a "
               f"row that fills the KV cache. Decode: {fig['decode_tokens']} greedy tokens one at a time against "
               f"the cache, the prefill not timed. Medians after warm-up on {fig['threads']} CPU thread(s), "
               "measured in a separate process.")
    timing_notes(fig["load_average"], out, job, key="remeasure_text")


def prompt_editor(loaded: LoadedModel, label_names: list[str]) -> PromptSpec | None:
    """The prompt template, the label words (reset to `PromptSpec.for_labels` when the labels change) and
    the chat-template switch as a `PromptSpec`, or None after an error box."""
    if st.session_state.get("label_words_for") != label_names:
        st.session_state["label_words"] = ", ".join(PromptSpec.for_labels(label_names).label_words)
        st.session_state["label_words_for"] = list(label_names)
    template = st.text_area("Prompt template ({text} is replaced by each example)", value=DEFAULT_TEMPLATE,
                            key="prompt_template")
    words = st.text_input(f"Label words, one per label ({', '.join(label_names)}), separated by commas",
                          key="label_words")
    chat = st.checkbox("Wrap the prompt in the model's chat template", value=True, key="prompt_chat")
    try:
        prompt = PromptSpec(parse_label_words(words, label_names), template, chat)
        PromptTokenizer(loaded.text_tokenizer, prompt).label_token_ids()  # words must differ in their first token
    except (ValueError, ModelError) as exc:
        st.error(str(exc))
        return None
    return prompt


def zero_shot(spec: str, loaded: LoadedModel) -> None:
    """Accuracy of the decoder prompted as a classifier of the chosen data's own labels (a background job
    started by a button: a decoder takes about 0.1-0.2 s a snippet on 2 cores)."""
    st.subheader("Zero-shot classification")
    data_spec = data_choice(None)
    data = get_data(data_spec, "dev") if data_spec else None
    if data is None:
        return
    st.session_state["data_spec"] = data_spec
    prompt = prompt_editor(loaded, data.label_names)
    if prompt is None:
        return
    st.session_state["prompt_spec"] = prompt
    limit = int(st.number_input("Examples (0 = every dev row)", min_value=0, max_value=len(data), value=0, step=50,
                                key="zero_shot_limit"))
    rows = data.subset(limit) if limit else data
    st.caption(f"{data_spec.caption(data)} Evaluated: {len(rows):,} rows" + (", a seeded subset." if limit else "."))
    out = summary_path(loaded.fingerprint, rows.fingerprint(), prompt)
    job = f"zeroshot-{loaded.fingerprint}-{prompt_key(prompt)}-{rows.fingerprint()}"
    if not out.exists():
        if job_state(job) is not None or st.button("Evaluate zero-shot", key="zero_shot_run"):
            ensure_job(job, ["core", "evaluate", "--model", spec, *data_spec.cli_args(), *prompt_args(prompt),
                             *(["--limit", str(limit)] if limit else []), "--json", "--out", str(out), "--job", job])
            wait_for(job, "Zero-shot evaluation", out.exists)
        return
    record = json.loads(out.read_text())
    fig, counts = record["figures"], record["label_counts"]
    majority = max(counts.values()) / max(sum(counts.values()), 1)
    cols = st.columns(4)
    cols[0].metric("Zero-shot accuracy", f"{fig['accuracy']:.1%}", help=f"on {fig['examples']} examples")
    cols[1].metric("Macro-F1", f"{fig['macro_f1']:.3f}")
    for col, b in zip(cols[2:], (1, 8)):
        col.metric(f"Latency, batch {b}", f"{fig[f'latency_b{b}_ms']:.0f} ms",
                   help=f"p90 {fig[f'latency_b{b}_p90_ms']} ms")
    st.caption(f"Majority class: {majority:.1%}. The label words' next-token logits after each prompt "
               f"({fig['median_tokens']} tokens at the median) are the class logits; latency is that pass, a "
               f"prefill, on {fig['threads']} CPU thread(s) in a separate process.")
    timing_notes(fig["load_average"], out, job, key="remeasure_zero_shot")
    st.dataframe(pd.DataFrame(record["predictions"]), hide_index=True, width="stretch")


def generation(loaded: LoadedModel) -> None:
    """A reply to the user's prompt through the chat template, greedy or sampled with a seed."""
    st.subheader("Generate")
    with st.form("generate"):
        request = st.text_area("Prompt", value=DEFAULT_REQUEST, key="gen_prompt")
        cols = st.columns(3)
        max_new = cols[0].number_input("Max new tokens", 1, MAX_NEW_TOKENS, 48, key="gen_max_tokens")
        temperature = cols[1].slider("Temperature (0 = greedy)", 0.0, MAX_TEMPERATURE, 0.0, 0.1, key="gen_temperature")
        seed = cols[2].number_input("Seed (when sampling)", 0, 2**31 - 1, 0, key="gen_seed")
        asked = st.form_submit_button("Generate")
    if asked:
        try:
            with st.spinner("Generating..."), paused_for_timing():
                reply = generate_reply(loaded.lm, loaded.text_tokenizer, request, max_new_tokens=int(max_new),
                                       temperature=float(temperature), seed=int(seed))
        except ValueError as exc:
            st.error(str(exc))
            return
        st.session_state["generation"] = (loaded.fingerprint, reply)
    fingerprint, reply = st.session_state.get("generation", (None, None))
    if reply is None or fingerprint != loaded.fingerprint:
        return
    st.text(reply.text)
    how = "greedy" if reply.greedy else f"sampled at temperature {reply.temperature:g}, seed {reply.seed}"
    end = "the model ended its turn" if reply.stopped else "stopped at the limit"
    st.caption(f"{reply.new_tokens} tokens after a {reply.prompt_tokens}-token prompt in {reply.seconds:.1f} s "
               f"({reply.tokens_per_s:.1f} tokens/s, prefill included), {how}; {end}.")
