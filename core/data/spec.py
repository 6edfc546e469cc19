"""One data spec: which data, which columns, which file labels mean which model labels, which rows.

`DataSpec` is the one value the Model page keeps in the session, every job gets as CLI options
(`cli_args`), `TrainConfig` stores field by field, and URLs / job records can carry as JSON
(`to_json` / `from_json`). `load_data(spec, split, label_names)` is the one way from a spec to labeled
rows, `load_text(spec, split)` the one way from a spec of text (task "lm") to documents.

Two tasks: "classify" (labeled rows: the built-in `default` Rotten Tomatoes task, or a CSV / TSV / JSONL /
Parquet / Arrow file or a `datasets` save_to_disk folder, `core.data.hf`) and "lm" (documents without
labels, for perplexity: the built-in `lm` = Lee news articles, `wiki` = Wikipedia articles, or a `.txt` /
`.jsonl` file, `core.data.text`, or the text column of the `datasets` formats). The built-in names imply their task;
a file is classification data unless the spec says task "lm".

The rule for "dev": a file's rows (or documents) are shuffled with seed 13 and split 80/10/10 into
train/dev/test, like the built-in tasks, so the Model page's evaluation, the Heads analysis, the Gates
measurement and a training run's eval steps all see the same dev rows. Only a spec with `whole_file`
reads every row, and only for evaluation: training and fine-tuning need a train split and refuse it
(`load_splits`). A save_to_disk folder of a DatasetDict with a train split keeps its own splits instead
(validation as dev; a missing one cut from train, `core.data.hf`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from core.data import hf, hf_files
from core.data.dataset import DataError, TaskSplits, TextDataset
from core.data.labels import check_label_map, format_label_map, map_labels
from core.data.tables import read_table
from core.data.tasks import DEFAULT_LABELS, load_default_task, split_dataset
from core.data.text import LMText, read_documents, split_documents
from core.lm_text import lee_splits, wiki_splits
from core.messages import quote

DEFAULT = "default"  # the built-in Rotten Tomatoes task
LM = "lm"  # the built-in language-modelling text: Lee news articles
WIKI = "wiki"  # the out-of-domain text: Wikipedia articles
CLASSIFY = "classify"  # the task of labeled rows
TEXT_TASKS = {LM: lee_splits, WIKI: wiki_splits}  # built-in text -> its seeded splits
BUILTIN_DATA = (DEFAULT, *TEXT_TASKS)
TASKS = (CLASSIFY, LM)


@dataclass(frozen=True)
class DataSpec:
    """Which data and how to read it. Built once (validated and normalised here), then passed along."""

    path: str = DEFAULT  # "default", "lm", "wiki" (built-in data) or a CSV / TSV / JSONL / TXT file
    text_column: str | None = None  # a file's column of texts (None: auto-detected, "text" first)
    label_column: str | None = None  # a file's column of labels (None: auto-detected, "label" first)
    label_map: dict[str, str] = field(default_factory=dict)  # file label -> model label, e.g. {"pos": "fresh"}
    whole_file: bool = False  # evaluate every row of a file instead of its seeded dev split
    task: str | None = None  # "classify" or "lm" (None: "lm" for the built-in text, else "classify")

    def __post_init__(self) -> None:
        if not isinstance(self.path, (str, Path)) or not str(self.path).strip():
            raise DataError(f"No data given: name a CSV / TSV / JSONL file or 'default'. Got {self.path!r}.")
        path = str(self.path).strip()
        self._set("path", path.lower() if path.lower() in BUILTIN_DATA else path)
        for name in ("text_column", "label_column"):
            self._set(name, self._column(name))
        self._set("label_map", check_label_map(self.label_map))
        if not isinstance(self.whole_file, bool):
            raise DataError(f"'whole_file' must be true or false. Got {self.whole_file!r}.")
        if self.whole_file and self.is_builtin:
            raise DataError(f"'Whole file' applies to a data file; {self.title} is always split "
                            "train/dev/test.")
        self._set("task", self._task())
        if self.is_text and (self.label_column or self.label_map):
            what = f"the label column '{quote(self.label_column)}'" if self.label_column else "the label map"
            raise DataError(f"Language-modelling text has no labels: drop {what}.")

    @property
    def title(self) -> str:
        """The data's name in a sentence: "the default task", "the built-in text 'lm'" or "reviews.csv"."""
        if self.is_builtin:
            return "the default task" if self.is_default else f"the built-in text '{self.path}'"
        return quote(Path(self.path).name)

    def _task(self) -> str:
        """The task: as given (checked against the built-in data's own), else the built-in data's or "classify"."""
        implied = LM if self.path in TEXT_TASKS else CLASSIFY
        task = self.task.strip().lower() if isinstance(self.task, str) else self.task
        if task is None:
            return implied
        if task not in TASKS:
            raise DataError(f"The task must be one of {', '.join(TASKS)}. Got {self.task!r}.")
        if self.is_builtin and task != implied:
            what = "language-modelling text" if implied == LM else "labeled data for classification"
            raise DataError(f"{_capital(self.title)} is {what} (task {implied}), not task {task}.")
        return task

    def _set(self, name: str, value) -> None:
        object.__setattr__(self, name, value)  # normalising a frozen instance, only in __post_init__

    def _column(self, name: str) -> str | None:
        """The stripped column name of field `name` (None when blank); DataError if it makes no sense here."""
        value = getattr(self, name)
        if value is not None and not isinstance(value, str):
            raise DataError(f"The {name.replace('_', ' ')} must be a column name. Got {value!r}.")
        value = (value or "").strip() or None
        if value and self.is_builtin:
            owner = "default task's" if self.is_default else f"built-in text {self.path}'s"
            raise DataError(f"The {owner} columns are fixed: drop the "
                            f"{name.replace('_', ' ')} '{quote(value)}' (it names a column of a data file).")
        return value

    @classmethod
    def of(cls, value: DataSpec | str | Path) -> DataSpec:
        """`value` itself, or a spec of path `value` with everything else auto-detected."""
        return value if isinstance(value, DataSpec) else cls(path=str(value))

    @property
    def is_default(self) -> bool:
        return self.path == DEFAULT

    @property
    def is_builtin(self) -> bool:
        """The built-in data (default, lm, wiki), not a file."""
        return self.path in BUILTIN_DATA

    @property
    def is_text(self) -> bool:
        """Language-modelling text (task "lm"): documents without labels, read by `load_text`."""
        return self.task == LM

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
        args += ["--task", LM] if self.is_text and not self.is_builtin else []  # `core evaluate` reads it
        return args + (["--whole-file"] if self.whole_file else [])

    def caption(self, data: TextDataset | LMText) -> str:
        """The rule and the row counts of `data` (read by this spec) in one line, as every page shows them."""
        if self.is_text:
            rule = "every document, as asked" if self.whole_file else "the same documents on every page"
        else:
            rule = ("every row, as asked (training still splits the file 80/10/10)" if self.whole_file
                    else "the same rows on every page and in training")
        return f"{data.name}: {data.selection} — {rule}."


def load_data(spec: DataSpec | str, split: str = "dev", label_names: list[str] | None = None) -> TextDataset:
    """The rows `split` ("train", "dev", "test") of `spec` means, with labels renamed by its label map and
    numbered as the model's `label_names` (None: the data's own names, sorted).

    A whole-file spec gives every row of the file (as "dev"; other splits are refused). DataError for bad
    data, a column or label that does not fit, or an unknown split.
    """
    spec = _labeled(spec)
    if not spec.whole_file:
        return load_splits(spec, label_names).split(split)
    if split != "dev":
        raise DataError(f"'Whole file' reads every row of {spec.path} as dev rows; there is no '{quote(split)}' "
                        "split (drop the whole-file option).")
    return _read_file(spec, label_names)


def load_splits(spec: DataSpec | str, label_names: list[str] | None = None) -> TaskSplits:
    """Train/dev/test of `spec` (labels as in `load_data`): the default task's, or the file's rows shuffled
    with seed 13 and split 80/10/10. A whole-file spec is refused: training needs its train split."""
    spec = _labeled(spec)
    if spec.whole_file:
        raise DataError(f"Training and fine-tuning use the seeded 80/10/10 split of {spec.path}; 'whole file' "
                        "applies to evaluation only.")
    if spec.is_default:
        splits = load_default_task()
        return TaskSplits(*(_relabel(s, label_names, spec.label_map) for s in (splits.train, splits.dev, splits.test)))
    if hf_files.is_hf_source(spec.path):  # a DatasetDict folder keeps its own train / validation / test splits
        own = hf.task_splits(spec.path, text_column=spec.text_column, label_column=spec.label_column,
                             label_names=label_names, label_map=spec.label_map)
        if own is not None:
            return own
    return split_dataset(_read_file(spec, label_names))


def source_labels(spec: DataSpec | str) -> list[str]:
    """The data's own label names (before any label map), sorted as `load_data` numbers them without a model."""
    spec = _labeled(spec)
    if spec.is_default:
        return list(DEFAULT_LABELS)
    return read_table(spec.path, text_column=spec.text_column, label_column=spec.label_column).label_names


def load_text(spec: DataSpec | str, split: str = "dev") -> LMText:
    """The documents `split` ("train", "dev", "test") of text spec `spec` (task "lm") means: the built-in
    text's seeded split, or a `.txt` / `.jsonl` file's documents split 80/10/10 by document (seed 13) unless
    the whole file is asked for (then only "dev", every document). DataError for anything else."""
    spec = DataSpec.of(spec)
    if not spec.is_text:
        raise DataError(f"{_capital(spec.title)} is labeled data for classification; perplexity reads text: 'lm' (Lee "
                        "news), 'wiki' (Wikipedia) or a .txt / .jsonl file read as task 'lm'.")
    if spec.path in TEXT_TASKS:
        return TEXT_TASKS[spec.path]().split(split)
    if not spec.whole_file and hf_files.is_hf_source(spec.path):
        own = hf.text_splits(spec.path, spec.text_column)
        if own is not None:
            return own.split(split)
    text = read_documents(spec.path, spec.text_column)
    if not spec.whole_file:
        return split_documents(text).split(split)
    if split != "dev":
        raise DataError(f"'Whole file' reads every document of {spec.path} as dev documents; there is no "
                        f"'{quote(split)}' split (drop the whole-file option).")
    return text


def _labeled(spec: DataSpec | str) -> DataSpec:
    """`spec` as a DataSpec of labeled data; DataError for text (task "lm")."""
    spec = DataSpec.of(spec)
    if spec.is_text:
        raise DataError(f"{_capital(spec.title)} is language-modelling text without labels; classification needs "
                        "labeled data: the default task or a CSV / TSV / JSONL file with a label column.")
    return spec


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


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
