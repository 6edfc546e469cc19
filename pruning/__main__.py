"""Command line: `python -m pruning apply ...` prunes a model by hand and saves the smaller one.

    python -m pruning apply --model default --prune-heads 0:1,0:5,3:2 --ffn-keep 0.5 --out pruned/

Prints parameters, encoder FLOPs per example (attention / FFN), accuracy and latency at batch 1 and
32 for the dense and the pruned model; both are timed interleaved in this process. Heads are
0-based LAYER:HEAD pairs. Bad input exits with status 2 and one line on stderr, never a traceback.

`python -m pruning train` learns the pruning (CoFi, L0 heads) or prunes one-shot (baselines), then
fine-tunes, reporting to the run store (`pruning.runs`); `python -m pruning runs list|stop|resume|delete|export`
manages the runs:

    python -m pruning train --model default --method cofi --target-sparsity 0.6 --steps 400
    python -m pruning runs resume 3 --background

`train` also runs in several processes under PyTorch's launcher (data-parallel, see `pruning.loop`);
`--run-id ID` (the spelling of `--run ID` that torchrun leaves alone) trains or resumes a run of the
store the same way:

    torchrun --standalone --nproc_per_node=2 -m pruning train --method cofi --device cpu
    torchrun --standalone --nproc_per_node=2 -m pruning train --run-id 3
"""

from __future__ import annotations

import argparse
import sys

from core.cli import Parser, run_command, torch_threads
from pruning.cli import apply, runs, structure, sweep, train


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m pruning", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    apply.add_commands(sub)  # apply, evaluate
    train.add_commands(sub)  # train, methods
    runs.add_commands(sub)  # runs list | stop | resume | delete | export
    sweep.add_commands(sub)  # sweep
    structure.add_commands(sub)  # structure (ZipLM's speed-up preset)
    args = parser.parse_args(argv)
    with torch_threads(getattr(args, "threads", 0)):
        return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
