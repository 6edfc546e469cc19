"""Datasets for text classification: one `DataSpec`, the built-in Rotten Tomatoes task, user tables
(CSV/TSV/JSONL), label maps and the seeded 80/10/10 split every page, CLI and run uses.

Plain Python (never imports streamlit). Modules: `dataset` (TextDataset, TaskSplits, DataError),
`tables` (reading files, finding columns), `labels` (label maps, label ids), `tasks` (the default task,
the split), `spec` (DataSpec and `load_data` / `load_splits`, the one way from a spec to rows).
"""

from core.data.dataset import DataError, TaskSplits, TextDataset
from core.data.labels import format_label_map, parse_label_map
from core.data.spec import DEFAULT, DataSpec, load_data, load_splits, source_labels
from core.data.tables import read_table
from core.data.tasks import DEFAULT_LABELS, SPLIT_SEED, load_default_task, split_dataset

__all__ = [
    "DEFAULT", "DEFAULT_LABELS", "SPLIT_SEED", "DataError", "DataSpec", "TaskSplits", "TextDataset",
    "format_label_map", "load_data", "load_default_task", "load_splits", "parse_label_map", "read_table",
    "source_labels", "split_dataset",
]
