"""The peers table: one row per comparison with HeadLab's figure, the peer's and their ratio; the machine line."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch


@dataclass
class Row:
    """One comparison. `ours` / `theirs` None: that side could not be measured (`note` says why)."""

    comparison: str
    ours: float | None
    theirs: float | None
    unit: str = ""  # printed after both figures
    note: str = ""
    digits: int = 4

    def ratio(self) -> str:
        if self.ours is None or self.theirs is None or self.theirs == 0:
            return "-"
        return f"{self.ours / self.theirs:.2f}"

    def _fmt(self, value: float | None) -> str:
        return "-" if value is None else f"{value:.{self.digits}g}{self.unit}"

    def cells(self) -> list[str]:
        return [self.comparison, self._fmt(self.ours), self._fmt(self.theirs), self.ratio(), self.note]


def markdown(rows: list[Row]) -> str:
    """The rows as a Markdown table (ratio = HeadLab / peer)."""
    lines = ["| comparison | HeadLab | peer | HeadLab / peer | note |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row.cells()) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    """One line: CPU, cores, torch threads, torch build, load average now."""
    cpu = platform.processor() or platform.machine()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"machine: {platform.node()} {cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"(cuda {torch.version.cuda}), {torch.get_num_threads()} threads; load average {load}")


def spearman(a, b) -> float:
    """Spearman rank correlation of two equally long vectors (ties get their mean rank); NaN entries dropped."""
    a, b = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    keep = ~(np.isnan(a) | np.isnan(b))
    return float(pd.Series(a[keep]).rank().corr(pd.Series(b[keep]).rank()))
