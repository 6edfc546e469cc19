"""What the three command lines (`python -m core`, `python -m analysis`, `python -m pruning`) share.

- `Parser`: argparse whose usage errors are one `error:` line and exit status 2.
- `run_command`: runs a parsed command; bad input becomes one `error:` line and exit 2 (never a
  traceback), a closed stdout pipe ends quietly with 141, Ctrl-C with 130.
- `Bar` / `run_with_bar`: a tqdm bar as the `(done, total, message)` progress callback every long step
  takes, also reporting to the app's job row (`core.jobs`) when the command was started as a job.
- `load_or_prepare`: load a model, fine-tuning a built-in one first if needed.
- `add_data_options` / `data_spec`: the options every command that reads data takes, as one `DataSpec`.
- `torch_threads`: set torch's thread count for one command and restore it afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator

import torch
from tqdm import tqdm

from core.cpu_queue import BACKGROUND, INTERACTIVE, cpu_turn, watch_pauses
from core.data import DataError, DataSpec, parse_label_map
from core.jobs import BACKGROUND_ENV, BACKGROUND_NICE, JobReporter
from core.latency import threads_leaving_a_core
from core.messages import one_line
from core.models import BUILTIN_MODELS, LoadedModel, ModelError, ModelNotPrepared, load_model
from core.prepare import prepare, prepare_job
from core.prompting import PromptSpec


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line and exit status 2 (like every other bad input)."""

    def error(self, message: str):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


class Bar:
    """A tqdm progress bar as a `(done, total, message)` callback; also reports to a job row if named."""

    def __init__(self, job: str | None = None):
        # Jobs started by the app report to the store; their log files need no bar.
        self.bar = tqdm(total=0, file=sys.stderr, dynamic_ncols=True, mininterval=1.0,
                        disable=bool(os.environ.get(BACKGROUND_ENV)))
        self.job = JobReporter(job) if job else None

    def __call__(self, done: int, total: int, message: str) -> None:
        if self.bar.total != total:
            self.bar.reset(total=total)
        self.bar.set_description(message.split(",")[0], refresh=False)
        self.bar.update(done - self.bar.n)
        if self.job:
            self.job(done, total, message)

    def close(self, error: str | None = None) -> None:
        self.bar.close()
        if self.job:
            self.job.finish(error)


def run_with_bar(job: str | None, work, priority: int | None = INTERACTIVE):
    """Run `work(bar)` with a progress bar, recording success or the error in the job store.

    A background process (started by the app or a run launcher) first waits for its turn on the CPU
    (`core.cpu_queue.cpu_turn` at `priority`: `INTERACTIVE` for what a page waits for, `BACKGROUND`
    for training and preparation; None: no turn, e.g. for data-parallel ranks), showing the wait on its bar."""
    bar = Bar(job)
    queued = priority is not None and os.environ.get(BACKGROUND_ENV)
    turn = cpu_turn(job or "command", priority, progress=bar) if queued else contextlib.nullcontext()
    try:
        with turn:
            result = work(bar)
    except BaseException as exc:
        bar.close(error=f"{type(exc).__name__}: {exc}")
        raise
    bar.close()
    return result


def load_or_prepare(spec: str, label_names: list[str] | None = None, prompt: PromptSpec | None = None) -> LoadedModel:
    """Load a model; a built-in one that is not prepared yet (fine-tuned, or converted from its GGUF) or a
    .gguf file not converted yet (or changed since) is prepared first, with a bar."""
    try:
        return load_model(spec, label_names=label_names, prompt=prompt)
    except ModelNotPrepared:
        what = f"built-in model '{spec}' ({BUILTIN_MODELS[spec]})" if spec in BUILTIN_MODELS else f"{spec} (GGUF)"
        print(f"Preparing {what} once...", file=sys.stderr)
        run_with_bar(prepare_job(spec), lambda bar: prepare(spec, progress=bar), BACKGROUND)
        return load_model(spec, label_names=label_names, prompt=prompt)


def add_data_options(parser: argparse.ArgumentParser) -> None:
    """--data, --text-column, --label-column, --label-map and --whole-file (read back by `data_spec`)."""
    parser.add_argument("--data", default="default", help="default (the Rotten Tomatoes task) | CSV/TSV/JSONL file; "
                        "a file is split 80/10/10 (seeded) like the default task")
    parser.add_argument("--text-column", default=None, metavar="NAME",
                        help="the file's column of texts (default: auto-detected, 'text' first)")
    parser.add_argument("--label-column", default=None, metavar="NAME",
                        help="the file's column of labels (default: auto-detected, 'label' first)")
    parser.add_argument("--label-map", default=None, metavar="FILE=MODEL,...",
                        help="read the file's labels as the model's, e.g. pos=fresh,neg=rotten")
    parser.add_argument("--whole-file", action="store_true",
                        help="evaluate every row of the file, not its seeded dev split (10%%); not for training")


def data_spec(args: argparse.Namespace) -> DataSpec:
    """The `DataSpec` of the options `add_data_options` added (DataError for a bad --label-map)."""
    return DataSpec(args.data, args.text_column, args.label_column, parse_label_map(args.label_map), args.whole_file)


def run_command(args: argparse.Namespace) -> int:
    """Run `args.func(args)`: bad input becomes one `error:` line and exit 2, never a traceback.

    A reader that closes stdout early (`... | head`) ends the command quietly with status 141 (as if
    killed by SIGPIPE), following the recipe in the Python docs' `signal` module notes. A background
    process runs niced (`BACKGROUND_NICE`) with one thread fewer than the machine's cores, so the app
    stays responsive, and counts its pauses (`core.cpu_queue.watch_pauses`).
    """
    if os.environ.get(BACKGROUND_ENV):
        os.nice(max(0, BACKGROUND_NICE - os.nice(0)))  # started by `start_process`: niced already
        torch.set_num_threads(threads_leaving_a_core())
        watch_pauses()
    try:
        code = args.func(args)
        sys.stdout.flush()  # inside the try: a closed pipe shows here, not at interpreter exit
        return code
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the final flush then finds no pipe
        return 141
    except (ModelError, DataError, ValueError) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Use `threads` torch threads inside the block (0 or less: leave torch's setting alone), then restore
    the previous count: a command's `main()` may run inside another process (tests, the app)."""
    before = torch.get_num_threads()
    try:
        if threads > 0:
            torch.set_num_threads(threads)
        yield
    finally:
        torch.set_num_threads(before)
