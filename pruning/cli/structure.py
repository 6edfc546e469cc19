"""`python -m pruning structure`: ZipLM's "target speed-up -> structure" (`pruning.methods.ziplm`) as a gates file,
what the Gates page's preset runs in the background:

    python -m pruning structure --model default --speedup 1.5 --out gates.json

The latency table is measured on this machine the first time (cached per machine, model and batch shape),
then OBS saliencies on calibration texts of the training split and the search pick the structure. The file
is a gate state (`GateState.to_json`, what `pruning apply --gates` and the Gates page read); the gated model
lacks ZipLM's weight update (a `ziplm` run applies it and distils). The table's predicted speed-up is printed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from core.cli import add_data_options, data_spec, load_or_prepare, run_with_bar
from core.data import load_data
from core.folders import write_text_atomically


def _speedup(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 1.0:
        raise argparse.ArgumentTypeError(f"--speedup must be a number above 1 (got {text!r})")
    return value


def cmd_structure(args: argparse.Namespace) -> int:
    from pruning.methods.ziplm import structure_for_speedup

    loaded = load_or_prepare(args.model)
    if loaded.is_decoder:
        raise ValueError("The speed-up preset works on encoders; on a decoder run `python -m pruning train --method "
                         "ziplm` (it calibrates on the run's texts).")
    train = load_data(data_spec(args), "train", loaded.label_names)
    plan = run_with_bar(args.job, lambda bar: structure_for_speedup(
        loaded, args.speedup, train, calibration_examples=args.calibration_examples, progress=bar))
    write_text_atomically(args.out, plan.result.state.to_json())
    print(f"{args.out}: predicted {plan.predicted_speedup:.2f}x for a target of {args.speedup:.2f}x")
    return 0


def add_commands(sub) -> None:
    st = sub.add_parser("structure", help="ZipLM: the structure that meets a speed-up target (a gates file)")
    st.add_argument("--model", default="default", help="default | minilm-l3 | path to a HF model folder")
    st.add_argument("--speedup", type=_speedup, required=True, help="target speed-up over the dense model (> 1)")
    add_data_options(st)
    st.add_argument("--calibration-examples", type=int, default=64, help="training texts for the OBS saliencies")
    st.add_argument("--out", type=Path, required=True, help="the gates file (JSON) to write")
    st.add_argument("--job", help=argparse.SUPPRESS)
    st.set_defaults(func=cmd_structure)
