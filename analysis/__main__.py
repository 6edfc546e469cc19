"""Command line: `python -m analysis relevance|roles|heads --model ... --data ... --limit N --out ...`.

Bad input exits with status 2 and one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from analysis.heads import WRITER, build_report
from analysis.lrp_pass import METHODS
from analysis.relevance import relevance_table
from analysis.roles import head_roles
from core.cli import add_data_options, data_spec, load_or_prepare, run_command, run_with_bar
from core.data import DataError, load_data
from core.folders import check_target, write_text_atomically


def _inputs(args: argparse.Namespace):
    loaded = load_or_prepare(args.model)
    data = load_data(data_spec(args), "dev", loaded.label_names)
    if len(data) == 0:
        raise DataError(f"{args.data} has no rows: nothing to analyse.")
    for note in loaded.notes + data.warnings:
        print(f"warning: {note}", file=sys.stderr)
    return loaded, data


def _write(frame, out: Path | None) -> None:
    if out is None:
        print(frame.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
        return
    write_text_atomically(out, frame.to_csv(index=False))
    print(f"wrote {len(frame)} rows to {out}")


def cmd_relevance(args: argparse.Namespace) -> int:
    loaded, data = _inputs(args)
    frame = run_with_bar(args.job, lambda bar: relevance_table(loaded, data, limit=args.limit, target=args.target,
                                                               progress=bar, method=args.relevance_method))
    _write(frame, args.out)
    return 0


def cmd_roles(args: argparse.Namespace) -> int:
    loaded, data = _inputs(args)
    texts = data.subset(args.limit, seed=0).texts
    frame = run_with_bar(args.job, lambda bar: head_roles(loaded, texts, limit=args.limit, progress=bar))
    _write(frame, args.out)
    return 0


def cmd_heads(args: argparse.Namespace) -> int:
    if args.out is None:
        raise ValueError("The 'heads' command needs --out FOLDER (it writes heads.csv and examples.json).")
    check_target(args.out, written_by=WRITER, overwrite=True)  # a foreign folder fails before the slow part
    loaded, data = _inputs(args)
    report = run_with_bar(args.job, lambda bar: build_report(loaded, data, limit=args.limit, target=args.target,
                                                             progress=bar, method=args.relevance_method))
    report.save(args.out)
    print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, help_ in [
        ("relevance", cmd_relevance, "per-head LRP relevance (conservative rules) and Michel importance as CSV"),
        ("roles", cmd_roles, "per-head Voita roles: positional, syntactic, rare-word (a decoder's also Olsson's "
                             "previous-token, duplicate-token, induction scores), as CSV"),
        ("heads", cmd_heads, "both, plus typical sentences per head, into a folder (what the Heads page reads)"),
    ]:
        p = sub.add_parser(name, help=help_)
        p.add_argument("--model", default="default",
                       help="default | minilm-l3 | smollm2 (a decoder) | path to a HF model folder")
        add_data_options(p)
        p.add_argument("--limit", type=int, default=500, help="seeded subset of this many sentences")
        p.add_argument("--out", type=Path, default=None, help="output CSV (folder for 'heads'); stdout if omitted")
        p.add_argument("--target", type=int, default=None, help="class whose logit is explained (default: predicted)")
        if name != "roles":
            p.add_argument("--relevance-method", choices=list(METHODS), default="conservative",
                           help="LRP rules: conservative (CP-LRP, attention constant) or attnlrp (AttnLRP)")
        p.add_argument("--job", help=argparse.SUPPRESS)
        p.set_defaults(func=func)
    args = parser.parse_args(argv)
    if args.limit < 1:
        parser.error(f"--limit must be >= 1, got {args.limit}")
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
