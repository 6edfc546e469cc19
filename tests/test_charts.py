"""The Pareto chart's frontier: each method's runs that no other run of it beats on speed and accuracy."""

from __future__ import annotations

import pandas as pd

from ui.charts import frontier, pareto_chart


def test_the_frontier_keeps_exactly_the_non_dominated_runs():
    runs = pd.DataFrame({"label": list("abcde"), "method": ["m"] * 5, "model": ["x"] * 5, "teacher": ["t"] * 5,
                         "sparsity": [0.1] * 5, "dense_accuracy": [0.9] * 5,
                         "speedup_b32": [1.5, 2.0, 2.5, 3.0, 1.8], "accuracy": [0.88, 0.86, 0.87, 0.80, 0.85]})
    # b (2.0, 0.86) is beaten by c (2.5, 0.87); e (1.8, 0.85) by c as well
    assert list(frontier(runs)["label"]) == ["a", "c", "d"]
    fig = pareto_chart(runs)
    line = [t for t in fig.data if t.name == "m frontier"]
    assert len(line) == 1 and list(line[0].x) == [1.5, 2.5, 3.0]
