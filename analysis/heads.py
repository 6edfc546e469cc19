"""Everything the Heads page shows about a (model, data) pair, computed once and cached on disk.

`build_report` runs relevance, Michel importance and role scoring on the same seeded subset; the
report is saved as CSV + JSON in a folder keyed by the model and data fingerprints, so a second
visit (or the CLI) reads it back instantly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from analysis.relevance import relevance_table
from analysis.roles import analyse_roles, top_attended_words, typical_sentences
from core.data import TextDataset
from core.evaluate import Progress
from core.folders import atomic_folder
from core.models import LoadedModel
from core.paths import headlab_home

WRITER = "analysis.heads"  # names the writer in the folder's marker


@dataclass
class HeadsReport:
    """`table`: one row per head (layer, head 0-based) with relevance, importance and role columns;
    `examples[f"{layer}:{head}"]`: {"role", "typical": [...], "words": [...]} for the head's strongest role."""

    table: pd.DataFrame
    examples: dict[str, dict] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def save(self, folder: Path) -> Path:
        """Write heads.csv and examples.json atomically (`core.folders.atomic_folder`), replacing an
        earlier report; `core.folders.FolderError` (nothing touched) if `folder` holds anything else."""
        with atomic_folder(folder, written_by=WRITER, overwrite=True) as tmp:
            self.table.to_csv(tmp / "heads.csv", index=False)
            (tmp / "examples.json").write_text(json.dumps({"examples": self.examples, "meta": self.meta}))
        return folder

    @classmethod
    def load(cls, folder: Path) -> HeadsReport:
        extra = json.loads((folder / "examples.json").read_text())
        # an empty roles column reads as all-NaN floats: read it as text
        table = pd.read_csv(folder / "heads.csv", keep_default_na=False, na_values=[""], dtype={"roles": str})
        table["roles"] = table["roles"].fillna("")
        return cls(table, extra["examples"], extra["meta"])


def report_dir(model_fingerprint: str, data_fingerprint: str, limit: int, target: int | None,
               method: str = "conservative") -> Path:
    """Cache folder of one report: keyed by model, data, subset size, explained class and relevance method
    (the default method's folders keep their earlier names)."""
    suffix = "" if method == "conservative" else f"-{method}"
    return headlab_home() / "cache" / "heads" / f"{model_fingerprint}-{data_fingerprint}-{limit}-{target}{suffix}"


def _shown_role(row: pd.Series) -> tuple[str, bool]:
    """The head's first role, or (for a head without one) its most frequent offset, flagged as no role."""
    if row["roles"]:
        return row["roles"].split("+")[0], True
    return f"positional({int(row['positional_offset'])})", False


def build_report(loaded: LoadedModel, data: TextDataset, *, limit: int = 500, target: int | None = None,
                 progress: Progress | None = None, examples_per_head: int = 5,
                 method: str = "conservative") -> HeadsReport:
    """Relevance (LRP `method`, see `analysis.relevance`) + importance + roles on a seeded subset of `limit`
    rows of `data`; a decoder's roles include Olsson's (`analysis.roles.olsson`).

    Progress is reported per stage ("relevance", "roles"); the subset is the same for all of them.
    """
    rows = data.subset(limit, seed=0)
    relevance = relevance_table(loaded, rows, limit=None, target=target, progress=progress, method=method)
    roles = analyse_roles(loaded, rows.texts, limit=len(rows), progress=progress)
    table = relevance.merge(roles.table, on=["layer", "head"], how="left")
    table["roles"] = table["roles"].fillna("")
    examples: dict[str, dict] = {}
    for _, row in table.iterrows():
        layer, head = int(row["layer"]), int(row["head"])
        role, has_role = _shown_role(row)
        typical = typical_sentences(roles.views, layer, head, role, k=examples_per_head)
        typical["text"] = [rows.texts[i] for i in typical["sentence"]]
        words = top_attended_words(roles.views, layer, head, k=15)
        examples[f"{layer}:{head}"] = {
            "role": role,
            "has_role": has_role,
            "typical": typical.to_dict("records"),
            "words": words.to_dict("records"),
        }
    meta = {"examples": len(rows), "data": data.name, "target": target, "truncated": roles.truncated,
            "seconds": roles.seconds, "method": method}
    return HeadsReport(table, examples, meta)
