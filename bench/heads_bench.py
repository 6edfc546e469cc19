"""Heads benchmark: role scoring speed (incl. spaCy parsing) and the Heads page re-render from cache.

(a) `analyse_roles` on N dev sentences of the default task: one warm-up (loads the parser), then timed
    repeats; prints the median and the per-stage split (attention capture, parse, align, score; a decoder
    also olsson), and for a decoder (`--model smollm2`) the heads past Olsson's thresholds with their
    previous-token / duplicate / induction scores and the Voita roles found.
(b) the Heads page driven by Streamlit's AppTest on a report already on disk: a new session opening
    the page (a second visit: model and report come from the process caches) and a rerun of an open
    session (what every widget change costs), median of repeats.

Run: .venv/bin/python -m bench.heads_bench [--model default] [--n 500] [--repeats 3] [--part all|a|b]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from analysis.heads import build_report, report_dir
from analysis.roles import analyse_roles, load_parser
from analysis.roles.olsson import ROLES, SCORES
from core.data import load_data
from core.models import load_model

ROOT = Path(__file__).resolve().parent.parent


def roles_speed(model: str, n: int, repeats: int) -> None:
    loaded = load_model(model)
    texts = load_data("default", split="dev").subset(n, seed=0).texts
    nlp = load_parser()
    analyse_roles(loaded, texts[:32], nlp=nlp)  # warm-up
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = analyse_roles(loaded, texts, limit=n, nlp=nlp)
        runs.append((time.perf_counter() - start, result.seconds, result.table))
    total = statistics.median(t for t, _, _ in runs)
    stages = {k: statistics.median(s[k] for _, s, _ in runs) for k in runs[0][1]}
    split = ", ".join(f"{k} {v:.2f} s" for k, v in stages.items())
    print(f"roles, {n} dev sentences incl. parsing: median {total:.2f} s of {repeats} ({split}); target <= 20 s")
    if loaded.is_decoder:
        decoder_roles(runs[-1][2])


def decoder_roles(table) -> None:
    """Heads past each Olsson threshold, best first, and the counts of Voita's roles."""
    for role in ROLES:
        column = SCORES[role]
        found = table[table["roles"].str.split("+").map(lambda r, role=role: role in r)]
        found = found.sort_values(column, ascending=False)
        heads = ", ".join(f"L{r.layer}H{r.head} {getattr(r, column):.2f}" for r in found.itertuples())
        print(f"{role} heads ({column} > {table.attrs['params']['olsson']['thresholds'][role]}): {heads or 'none'}")
    voita = table["roles"].str.split("+").explode().map(lambda r: r.split("(")[0] if r else "")
    counts = voita[~voita.isin(("", *ROLES))].value_counts().to_dict()
    print(f"Voita roles (causal): {counts or 'none'}")


def page_rerender(model: str, repeats: int) -> None:
    import logging

    from streamlit.testing.v1 import AppTest

    logging.getLogger("streamlit").setLevel(logging.ERROR)  # "missing ScriptRunContext" noise of bare imports
    loaded = load_model(model)
    data = load_data("default", split="dev")
    folder = report_dir(loaded.fingerprint, data.fingerprint(), 500, None)
    if not (folder / "heads.csv").exists():
        start = time.perf_counter()
        build_report(loaded, data, limit=500).save(folder)
        print(f"(built the 500-sentence report first: {time.perf_counter() - start:.1f} s)")

    def session() -> AppTest:
        at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
        at.session_state["model_spec"] = model
        at.switch_page("views/heads.py")
        return at

    at = session()
    at.run()  # first visit in this process: loads the model and reads the report
    assert not at.exception and len(at.get("plotly_chart")) >= 4, "the Heads page did not render its charts"
    opens, reruns = [], []
    for _ in range(repeats):
        fresh = session()
        start = time.perf_counter()
        fresh.run()
        opens.append(time.perf_counter() - start)
        start = time.perf_counter()
        fresh.run()
        reruns.append(time.perf_counter() - start)
    print(f"Heads page from cache: open in a new session median {statistics.median(opens):.2f} s, "
          f"rerun median {statistics.median(reruns):.2f} s ({repeats} repeats); target <= 1 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--part", default="all", choices=("all", "a", "b"))
    args = parser.parse_args()
    print(f"threads {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    if args.part in ("all", "a"):
        roles_speed(args.model, args.n, args.repeats)
    if args.part in ("all", "b"):
        page_rerender(args.model, args.repeats)


if __name__ == "__main__":
    main()
