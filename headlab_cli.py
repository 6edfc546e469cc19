"""`headlab`: the one command of an installed HeadLab (`pip install -e .`, pyproject.toml's [project.scripts]).

    headlab evaluate --model default            # = python -m core evaluate --model default
    headlab relevance | roles | heads ...       # = python -m analysis ...
    headlab apply | train | runs | sweep ...    # = python -m pruning ...
    headlab pruning evaluate --gates g.json     # a name two CLIs share: say whose
    headlab app                                 # the Streamlit app (as `make run`)

Each subcommand runs the `main` of `python -m core`, `analysis` or `pruning` with the rest of the command
line, so options, output and exit codes are theirs. Which CLI owns a subcommand is read from its own parser
(the first of core, analysis, pruning that has it), so a subcommand added there works here at once. The CLIs
are imported only when called: `headlab --help` stays fast and nothing here is imported by the libraries.
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from pathlib import Path

CLIS = ("core", "analysis", "pruning")  # in this order a shared subcommand name goes to the first
ROOT = Path(__file__).resolve().parent


class _Parsed(Exception):
    """Raised instead of parsing, carrying the parser a CLI's `main` built."""

    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__()
        self.parser = parser


def commands(cli: str) -> list[str]:
    """The subcommands of `python -m <cli>`, read from the parser its `main` builds (not run)."""
    main = importlib.import_module(f"{cli}.__main__").main
    original = argparse.ArgumentParser.parse_args

    def capture(self, *args, **kwargs):
        raise _Parsed(self)

    argparse.ArgumentParser.parse_args = capture
    try:
        main([])
    except _Parsed as parsed:
        actions = [a for a in parsed.parser._actions if isinstance(a, argparse._SubParsersAction)]
        return list(actions[0].choices) if actions else []
    finally:
        argparse.ArgumentParser.parse_args = original
    return []


def owner(command: str) -> str | None:
    """The first CLI of `CLIS` that has `command`, or None."""
    return next((cli for cli in CLIS if command in commands(cli)), None)


def app(argv: list[str]) -> int:
    """The Streamlit app on 127.0.0.1 (port 8501 unless `--server.port` is given), like `make run`."""
    args = [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.address", "127.0.0.1",
            "--server.headless", "true", "--browser.gatherUsageStats", "false", *argv]
    return subprocess.call(args, cwd=ROOT)


def usage() -> str:
    lines = [__doc__.split("\n\n")[0], "", "commands:"]
    for cli in CLIS:
        lines.append(f"  {', '.join(commands(cli))}  (python -m {cli})")
    lines.append("  app  (the Streamlit app)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run `headlab <command> ...`; returns the exit code of the CLI that ran it (2 for an unknown command)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "app":
        return app(rest)
    if command in CLIS:  # `headlab pruning evaluate ...`: the named CLI
        cli, command, rest = command, (rest[0] if rest else "--help"), rest[1:]
    else:
        cli = owner(command)
    if cli is None:
        print(f"headlab: unknown command '{command}'\n\n{usage()}", file=sys.stderr)
        return 2
    main_of = importlib.import_module(f"{cli}.__main__").main
    try:
        return main_of([command, *rest])
    except SystemExit as done:  # argparse's --help and usage errors exit; give their code back
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)


if __name__ == "__main__":
    sys.exit(main())
