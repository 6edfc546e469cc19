"""The Pareto chart's frontier: each method's runs that no other run of it beats on speed and accuracy."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd

from ui.charts import frontier, pareto_chart, size_points, sparse_vs_dense_chart


def test_the_frontier_keeps_exactly_the_non_dominated_runs():
    runs = pd.DataFrame({"label": list("abcde"), "method": ["m"] * 5, "model": ["x"] * 5, "teacher": ["t"] * 5,
                         "sparsity": [0.1] * 5, "dense_accuracy": [0.9] * 5,
                         "speedup_b32": [1.5, 2.0, 2.5, 3.0, 1.8], "accuracy": [0.88, 0.86, 0.87, 0.80, 0.85]})
    # b (2.0, 0.86) is beaten by c (2.5, 0.87); e (1.8, 0.85) by c as well
    assert list(frontier(runs)["label"]) == ["a", "c", "d"]
    fig = pareto_chart(runs)
    line = [t for t in fig.data if t.name == "m frontier"]
    assert len(line) == 1 and list(line[0].x) == [1.5, 2.5, 3.0]


def test_the_size_chart_sorts_runs_into_sparse_structured_and_small_dense():
    def run(method, model, teacher=""):
        return SimpleNamespace(config={"method": method, "model": model, "teacher": teacher})

    def final(accuracy, parameters, nonzero, sparsity, speedup):
        return SimpleNamespace(accuracy=accuracy, parameters=parameters, nonzero_parameters=nonzero,
                               sparsity=sparsity, speedup_b1=speedup, dense_accuracy=0.86, dense_parameters=100)

    finished = [(run("gradual", "default"), final(0.85, 100, 40, 0.6, 1.0)),
                (run("gradual", "default"), final(0.84, 60, 60, 0.5, 1.7)),
                (run("dense", "minilm-l3", "default"), final(0.80, 45, 45, 0.0, 2.0)),
                (run("cofi", "mpnet"), final(0.9, 10, 10, 0.5, 3.0))]  # another teacher: left out
    points = size_points(finished, lambda r: r.config["method"])
    assert list(points["kind"]) == ["sparse", "structured", "small-dense"]
    assert list(points["nonzero_parameters"]) == [40, 60, 45]
    fig = sparse_vs_dense_chart(points)
    sparse = [t for t in fig.data if t.name == "large-sparse (weight masks)"]
    assert len(sparse) == 2 and list(sparse[0].x) == [40 / 1e6] and list(sparse[1].x) == [1.0]
    assert size_points(finished[:1], str) is None
