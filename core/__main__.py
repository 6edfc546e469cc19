"""Command line: `python -m core evaluate ...` and `python -m core prepare ...`.

Bad input exits with status 2 and one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from core.cli import add_data_options, data_spec, load_or_prepare, run_command, run_with_bar
from core.cpu_queue import BACKGROUND
from core.data import load_data, load_splits
from core.finetune import FinetuneConfig, finetune, save_classifier
from core.folders import write_text_atomically
from core.gguf import GGUFConversion
from core.models import BUILTIN_MODELS, PREPARED_BY_ALL, load_model
from core.prepare import prepare
from core.summary import summarise, summary_record


def cmd_evaluate(args: argparse.Namespace) -> int:
    loaded = load_or_prepare(args.model)
    data = load_data(data_spec(args), args.split, loaded.label_names)
    if args.limit:
        data = data.subset(args.limit, seed=0)
    for note in loaded.notes + data.warnings:
        print(f"warning: {note}", file=sys.stderr)
    summary = run_with_bar(args.job, lambda bar: summarise(loaded, data, progress=bar))
    row = {"model": args.model, "data": args.data if args.data != "default" else f"default:{args.split}"}
    row.update(summary.as_row())
    if args.out:
        write_text_atomically(args.out, json.dumps(summary_record(summary, loaded, data), indent=1))
    if args.json:
        print(json.dumps(row, indent=2))
    else:
        width = max(map(len, row))
        print("\n".join(f"{k:<{width}}  {v}" for k, v in row.items()))
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    names = list(PREPARED_BY_ALL) if args.name == "all" else [args.name]
    for name in names:
        result = run_with_bar(f"prepare-{name}", lambda bar, name=name: prepare(name, progress=bar, force=args.force),
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
    ev = sub.add_parser("evaluate", help="accuracy, latency and size of a model on a dataset")
    ev.add_argument("--model", default="default", help="default | minilm-l3 | path to a HF model folder")
    add_data_options(ev)
    ev.add_argument("--split", default="dev", choices=["train", "dev", "test"], help="which of the seeded splits")
    ev.add_argument("--limit", type=int, default=0, help="evaluate a seeded subset of this many examples")
    ev.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ev.add_argument("--out", type=Path, help="also write a JSON record (figures, sample predictions) here")
    ev.add_argument("--job", help=argparse.SUPPRESS)  # name of the app's job row to report progress to
    ev.set_defaults(func=cmd_evaluate)
    pr = sub.add_parser("prepare", help="fine-tune the built-in models once (cached in HEADLAB_HOME)")
    pr.add_argument("name", choices=[*BUILTIN_MODELS, "all"], help=f"all = {', '.join(PREPARED_BY_ALL)}")
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
