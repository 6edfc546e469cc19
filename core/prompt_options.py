"""A decoder's prompt (template and label words, `core.prompting.PromptSpec`) as command-line options, both
ways: `add_prompt_options` / `prompt_from_args` read `--prompt`, `--label-words` and `--no-chat`;
`prompt_args` writes them for a background job (the Model page's zero-shot evaluation)."""

from __future__ import annotations

import argparse

from core.prompting import DEFAULT_TEMPLATE, PromptSpec


def add_prompt_options(parser: argparse.ArgumentParser) -> None:
    """--prompt, --label-words and --no-chat (read back by `prompt_from_args`)."""
    parser.add_argument("--prompt", default=None, metavar="TEMPLATE",
                        help="a decoder's prompt template, with {text} where the example goes (default: a "
                             "sentiment question)")
    parser.add_argument("--label-words", default=None, metavar="WORD,WORD",
                        help="a decoder's answer word for each label, in the data's label order, e.g. "
                             "positive,negative for fresh,rotten (default: the label names, fresh/rotten as "
                             "positive/negative)")
    parser.add_argument("--no-chat", action="store_true",
                        help="give a decoder the plain prompt + 'Answer:' instead of its chat template")


def prompt_given(args: argparse.Namespace) -> bool:
    """True if any prompt option was set."""
    return args.prompt is not None or args.label_words is not None or args.no_chat


def prompt_from_args(args: argparse.Namespace, label_names: list[str]) -> PromptSpec:
    """The `PromptSpec` the options give for a decoder classifying `label_names` (ValueError when the label
    words do not fit: one word per label, or a template without {text})."""
    template = DEFAULT_TEMPLATE if args.prompt is None else args.prompt
    if args.label_words is None:
        return PromptSpec.for_labels(label_names, template=template, chat=not args.no_chat)
    return PromptSpec(parse_label_words(args.label_words, label_names, "--label-words"), template,
                      chat=not args.no_chat)


def parse_label_words(text: str, label_names: list[str], where: str = "Label words") -> tuple[str, ...]:
    """"positive, negative" -> ("positive", "negative"): one answer word per label of `label_names`, in
    their order (ValueError, naming `where`, for another count)."""
    words = tuple(w.strip() for w in text.split(","))
    if len(words) != len(label_names):
        raise ValueError(f"{where}: {len(words)} word(s) for {len(label_names)} labels "
                         f"({', '.join(label_names)}); give one word per label, in that order, separated by commas.")
    return words


def prompt_args(prompt: PromptSpec) -> list[str]:
    """The options that give `prompt` to `python -m core evaluate`, e.g.
    ["--prompt", "Review: {text}", "--label-words", "positive,negative"] (+ "--no-chat")."""
    return ["--prompt", prompt.template, "--label-words", ",".join(prompt.label_words),
            *(["--no-chat"] if not prompt.chat else [])]
