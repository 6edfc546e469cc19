"""One data spec: which data, which columns, which file labels mean which model labels, which rows.

`DataSpec` is the one value the Model page keeps in the session, every job gets as CLI options
(`cli_args`), `TrainConfig` stores field by field, and URLs / job records can carry as JSON
(`to_json` / `from_json`). `load_data(spec, split, label_names)` is the one way from a spec to rows.

The rule for "dev": a file's rows are shuffled with seed 13 and split 80/10/10 into train/dev/test,
like the default task, so the Model page's evaluation, the Heads analysis, the Gates measurement and a
training run's eval steps all see the same dev rows. Only a spec with `whole_file` reads every row, and
only for evaluation: training and fine-tuning need a train split and refuse it (`load_splits`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from core.data.dataset import DataError, TaskSplits, TextDataset
from core.data.labels import check_label_map, format_label_map, map_labels
from core.data.tables import read_table
from core.data.tasks import DEFAULT_LABELS, load_default_task, split_dataset
from core.messages import quote

DEFAULT = "default"  # the built-in Rotten Tomatoes task


@dataclass(frozen=True)
class DataSpec:
    """Which data and how to read it. Built once (validated and normalised here), then passed along."""

    path: str = DEFAULT  # "default" (the Rotten Tomatoes task) or a CSV / TSV / JSONL file
    text_column: str | None = None  # a file's column of texts (None: auto-detected, "text" first)
    label_column: str | None = None  # a file's column of labels (None: auto-detected, "label" first)
    label_map: dict[str, str] = field(default_factory=dict)  # file label -> model label, e.g. {"pos": "fresh"}
    whole_file: bool = False  # evaluate every row of a file instead of its seeded dev split

    def __post_init__(self) -> None:
        if not isinstance(self.path, (str, Path)) or not str(self.path).strip():
            raise DataError(f"No data given: name a CSV / TSV / JSONL file or 'default'. Got {self.path!r}.")
        path = str(self.path).strip()
        self._set("path", DEFAULT if path.lower() == DEFAULT else path)
        for name in ("text_column", "label_column"):
            self._set(name, self._column(name))
        self._set("label_map", check_label_map(self.label_map))
        if not isinstance(self.whole_file, bool):
            raise DataError(f"'whole_file' must be true or false. Got {self.whole_file!r}.")
        if self.whole_file and self.is_default:
            raise DataError("'Whole file' applies to a data file; the default task is always split train/dev/test.")

    def _set(self, name: str, value) -> None:
        object.__setattr__(self, name, value)  # normalising a frozen instance, only in __post_init__

    def _column(self, name: str) -> str | None:
        """The stripped column name of field `name` (None when blank); DataError if it makes no sense here."""
        value = getattr(self, name)
        if value is not None and not isinstance(value, str):
            raise DataError(f"The {name.replace('_', ' ')} must be a column name. Got {value!r}.")
        value = (value or "").strip() or None
        if value and self.path == DEFAULT:
            raise DataError(f"The default task's columns are fixed: drop the {name.replace('_', ' ')} "
                            f"'{quote(value)}' (it names a column of a data file).")
        return value

    @classmethod
    def of(cls, value: DataSpec | str | Path) -> DataSpec:
        """`value` itself, or a spec of path `value` with everything else auto-detected."""
        return value if isinstance(value, DataSpec) else cls(path=str(value))

    @property
    def is_default(self) -> bool:
        return self.path == DEFAULT

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """Compact, key-sorted JSON (stable: fit for a job record or a URL query value)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> DataSpec:
        """Inverse of `to_json` (missing keys take their defaults); DataError for anything else."""
        try:
            data = json.loads(text)
        except (TypeError, json.JSONDecodeError) as e:
            raise DataError(f"A data spec must be JSON like {{\"path\": \"reviews.csv\"}} ({e}).") from e
        if not isinstance(data, dict):
            raise DataError(f"A data spec must be a JSON object. Got a {type(data).__name__}.")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in data if k not in names]
        if unknown:
            raise DataError(f"A data spec takes {', '.join(names)}; got unknown '{quote(str(unknown[0]))}'.")
        return cls(**data)

    def cli_args(self) -> list[str]:
        """The options that give this spec to any HeadLab command that reads data, e.g.
        ["--data", "r.csv", "--text-column", "review", "--label-map", "pos=fresh,neg=rotten", "--whole-file"]."""
        args = ["--data", self.path]
        args += ["--text-column", self.text_column] if self.text_column else []
        args += ["--label-column", self.label_column] if self.label_column else []
        args += ["--label-map", format_label_map(self.label_map)] if self.label_map else []
        return args + (["--whole-file"] if self.whole_file else [])

    def caption(self, data: TextDataset) -> str:
        """The rule and the row counts of `data` (read by this spec) in one line, as every page shows them."""
        rule = ("every row, as asked (training still splits the file 80/10/10)" if self.whole_file
                else "the same rows on every page and in training")
        return f"{data.name}: {data.selection} — {rule}."


def load_data(spec: DataSpec | str, split: str = "dev", label_names: list[str] | None = None) -> TextDataset:
    """The rows `split` ("train", "dev", "test") of `spec` means, with labels renamed by its label map and
    numbered as the model's `label_names` (None: the data's own names, sorted).

    A whole-file spec gives every row of the file (as "dev"; other splits are refused). DataError for bad
    data, a column or label that does not fit, or an unknown split.
    """
    spec = DataSpec.of(spec)
    if not spec.whole_file:
        return load_splits(spec, label_names).split(split)
    if split != "dev":
        raise DataError(f"'Whole file' reads every row of {spec.path} as dev rows; there is no '{quote(split)}' "
                        "split (drop the whole-file option).")
    return _read_file(spec, label_names)


def load_splits(spec: DataSpec | str, label_names: list[str] | None = None) -> TaskSplits:
    """Train/dev/test of `spec` (labels as in `load_data`): the default task's, or the file's rows shuffled
    with seed 13 and split 80/10/10. A whole-file spec is refused: training needs its train split."""
    spec = DataSpec.of(spec)
    if spec.whole_file:
        raise DataError(f"Training and fine-tuning use the seeded 80/10/10 split of {spec.path}; 'whole file' "
                        "applies to evaluation only.")
    if spec.is_default:
        splits = load_default_task()
        return TaskSplits(*(_relabel(s, label_names, spec.label_map) for s in (splits.train, splits.dev, splits.test)))
    return split_dataset(_read_file(spec, label_names))


def source_labels(spec: DataSpec | str) -> list[str]:
    """The data's own label names (before any label map), sorted as `load_data` numbers them without a model."""
    spec = DataSpec.of(spec)
    if spec.is_default:
        return list(DEFAULT_LABELS)
    return read_table(spec.path, text_column=spec.text_column, label_column=spec.label_column).label_names


def _read_file(spec: DataSpec, label_names: list[str] | None) -> TextDataset:
    return read_table(spec.path, text_column=spec.text_column, label_column=spec.label_column,
                      label_names=label_names, label_map=spec.label_map)


def _relabel(data: TextDataset, label_names: list[str] | None, label_map: dict[str, str]) -> TextDataset:
    """`data` (a split of the default task) renamed by `label_map` and numbered as `label_names`."""
    if label_names is None and not label_map:
        return data
    ids, names = map_labels([data.label_names[i] for i in data.labels], label_names, data.name, label_map)
    if ids == data.labels and names == data.label_names:
        return data
    return dataclasses.replace(data, labels=ids, label_names=names, warnings=list(data.warnings))
