"""Command line: `python -m core evaluate ...`, `python -m core prepare ...` and `python -m core finetune ...`.

`evaluate` on labeled data (`--data default` or a CSV / TSV / JSONL file) gives accuracy, macro-F1 and
latency; a decoder is read as a classifier by prompting (`--prompt`, `--label-words`). On text (`--data
lm` = Lee news, `--data wiki` = Wikipedia, or a .txt / .jsonl file with `--task lm`) a decoder gives
perplexity, next-token accuracy, prefill latency and decoding speed.

Bad input exits with status 2 and one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from core.cli import add_data_options, data_spec, load_or_prepare, run_command, run_with_bar
from core.cpu_queue import BACKGROUND
from core.data import DataSpec, load_data, load_splits, load_text
from core.finetune import FinetuneConfig, finetune, save_classifier
from core.folders import write_text_atomically
from core.gguf import GGUFConversion
from core.gguf_cache import is_gguf_spec
from core.loaded import LoadedModel
from core.models import BUILTIN_MODELS, PREPARED_BY_ALL, load_model
from core.perplexity import STRIDE, WINDOW, check_window, fit_window
from core.prepare import prepare, prepare_job
from core.prompt_options import add_prompt_options, prompt_from_args, prompt_given
from core.summary import require_decoder, summarise, summarise_text, summary_record, text_record


def evaluation_spec(args: argparse.Namespace) -> DataSpec:
    """The data options as one `DataSpec`, with `--task` when given."""
    spec = data_spec(args)
    return dataclasses.replace(spec, task=args.task) if args.task else spec


def prompted(args: argparse.Namespace, spec: DataSpec) -> LoadedModel:
    """The model to evaluate on labeled `spec`: an encoder as it is; a decoder prompted to classify the
    data's own labels with the prompt options (reloaded only when they differ from its default prompt)."""
    loaded = load_or_prepare(args.model)
    if not loaded.is_decoder:
        if prompt_given(args):
            raise ValueError(f"--prompt, --label-words and --no-chat read a decoder as a classifier; {args.model} "
                             "is an encoder with a classification head of its own.")
        return loaded
    names = load_data(spec, args.split).label_names
    prompt = prompt_from_args(args, names)
    if names == loaded.label_names and prompt == loaded.prompt:
        return loaded
    return load_model(args.model, label_names=names, prompt=prompt)


def print_row(row: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(row, indent=2))
    else:
        width = max(map(len, row))
        print("\n".join(f"{k:<{width}}  {v}" for k, v in row.items()))


def cmd_evaluate(args: argparse.Namespace) -> int:
    spec = evaluation_spec(args)
    if spec.is_text:
        return evaluate_text(args, spec)
    loaded = prompted(args, spec)
    data = load_data(spec, args.split, loaded.label_names)
    if args.limit:
        data = data.subset(args.limit, seed=0)
    for note in loaded.notes + data.warnings:
        print(f"warning: {note}", file=sys.stderr)
    summary = run_with_bar(args.job, lambda bar: summarise(loaded, data, progress=bar))
    row = {"model": args.model, "data": args.data if args.data != "default" else f"default:{args.split}"}
    row.update(summary.as_row())
    if args.out:
        write_text_atomically(args.out, json.dumps(summary_record(summary, loaded, data), indent=1))
    print_row(row, args.json)
    return 0


def evaluate_text(args: argparse.Namespace, spec: DataSpec) -> int:
    """Perplexity, next-token accuracy, prefill latency and decoding speed of a decoder on text `spec`."""
    if prompt_given(args):
        raise ValueError("--prompt, --label-words and --no-chat apply to labeled data; perplexity on text "
                         f"({spec.path}) reads no prompt.")
    loaded = load_or_prepare(args.model)
    require_decoder(loaded)
    window, stride = fit_window(loaded.lm, args.window, args.stride)
    check_window(window, stride, loaded.lm)
    text = load_text(spec, args.split)
    if args.limit:
        text = text.subset(args.limit, seed=0)
    summary = run_with_bar(args.job, lambda bar: summarise_text(loaded, text, window=window, stride=stride,
                                                                 progress=bar))
    row = {"model": args.model, "data": f"{spec.path}:{args.split}" if spec.is_builtin else spec.path}
    row.update(summary.as_row())
    if args.out:
        write_text_atomically(args.out, json.dumps(text_record(summary, loaded, text), indent=1))
    print_row(row, args.json)
    return 0


def preparable(name: str) -> str:
    """`name` if `prepare` takes it: a built-in model, "all" or a .gguf file (argparse error otherwise)."""
    if name in BUILTIN_MODELS or name == "all" or is_gguf_spec(name):
        return name
    raise argparse.ArgumentTypeError(f"choose one of {', '.join([*BUILTIN_MODELS, 'all'])} or a .gguf file "
                                     f"(got '{name}')")


def cmd_prepare(args: argparse.Namespace) -> int:
    names = list(PREPARED_BY_ALL) if args.name == "all" else [args.name]
    for name in names:
        result = run_with_bar(prepare_job(name), lambda bar, name=name: prepare(name, progress=bar, force=args.force),
                              BACKGROUND)
        if isinstance(result, GGUFConversion):  # a decoder is converted, not fine-tuned
            print(f"{name}: {result.describe()}")
        else:
            print(f"{name}: dev {result.dev_accuracy:.3f}, test {result.test_accuracy:.3f}, "
                  f"fine-tune {result.seconds:.0f} s on {result.threads} threads")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    if args.out.exists():
        raise ValueError(f"{args.out} already exists; choose another --out folder (nothing was overwritten).")
    splits = load_splits(data_spec(args))
    names = splits.train.label_names
    loaded = load_model(args.model, label_names=names)
    if loaded.label_names != names:
        raise ValueError(f"The model's labels {loaded.label_names} differ from the data's {names}.")
    config = FinetuneConfig(epochs=args.epochs)
    result = run_with_bar(args.job, lambda bar: finetune(loaded.model, loaded.tokenizer, splits, config, bar))
    save_classifier(loaded.model, loaded.tokenizer, args.out, result)
    print(f"saved {args.out}: dev {result.dev_accuracy:.3f}, test {result.test_accuracy:.3f}, {result.seconds:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("evaluate", help="accuracy, latency and size of a model on a dataset; a decoder's "
                        "perplexity on text (--data lm | wiki)")
    ev.add_argument("--model", default="default",
                    help="default | minilm-l3 | smollm2 | gemma3 | a HF folder | a .gguf file")
    add_data_options(ev)
    ev.add_argument("--task", choices=["classify", "lm"], default=None,
                    help="read a file as labeled rows (classify, the default) or as text for perplexity (lm: "
                         ".txt documents separated by blank lines, or .jsonl with a text field); --data lm "
                         "(Lee news) and wiki (Wikipedia) are text")
    ev.add_argument("--split", default="dev", choices=["train", "dev", "test"], help="which of the seeded splits")
    ev.add_argument("--limit", type=int, default=0, help="evaluate a seeded subset of this many examples "
                    "(documents, for text)")
    add_prompt_options(ev)
    ev.add_argument("--window", type=int, default=None, help=f"perplexity: tokens per forward pass (default {WINDOW}, "
                    "or the model's positions if fewer)")
    ev.add_argument("--stride", type=int, default=None, help=f"perplexity: tokens between window starts (default "
                    f"{STRIDE}, or half the window if less)")
    ev.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ev.add_argument("--out", type=Path, help="also write a JSON record (figures, sample predictions) here")
    ev.add_argument("--job", help=argparse.SUPPRESS)  # name of the app's job row to report progress to
    ev.set_defaults(func=cmd_evaluate)
    pr = sub.add_parser("prepare", help="fine-tune (or convert) the built-in models once, or convert a .gguf file "
                        "(cached in HEADLAB_HOME)")
    pr.add_argument("name", type=preparable, metavar="{" + ",".join([*BUILTIN_MODELS, "all"]) + "} | FILE.gguf",
                    help=f"all = {', '.join(PREPARED_BY_ALL)}")
    pr.add_argument("--force", action="store_true", help="fine-tune again even if cached")
    pr.set_defaults(func=cmd_prepare)
    ft = sub.add_parser("finetune", help="fine-tune a model (e.g. one without a classification head) on data")
    ft.add_argument("--model", required=True, help="path to a HF model folder")
    add_data_options(ft)
    ft.add_argument("--epochs", type=int, default=FinetuneConfig.epochs)
    ft.add_argument("--out", type=Path, required=True, help="new folder for the fine-tuned model")
    ft.add_argument("--job", help=argparse.SUPPRESS)
    ft.set_defaults(func=cmd_finetune)
    args = parser.parse_args(argv)
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
