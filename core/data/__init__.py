"""Datasets: one `DataSpec`, the built-in tasks (Rotten Tomatoes for classification, Lee news and Wikipedia
text for language modelling), user tables (CSV/TSV/JSONL) and text files (TXT/JSONL), label maps and the
seeded 80/10/10 split every page, CLI and run uses.

Plain Python (never imports streamlit). Modules: `dataset` (TextDataset, TaskSplits, DataError),
`tables` (reading files, finding columns), `labels` (label maps, label ids), `tasks` (the default task,
the split), `text` (documents without labels: LMText, reading .txt/.jsonl), `spec` (DataSpec and
`load_data` / `load_splits` / `load_text`, the one way from a spec to rows or documents).
"""

from core.data.dataset import DataError, TaskSplits, TextDataset
from core.data.labels import format_label_map, parse_label_map
from core.data.spec import DEFAULT, LM, WIKI, DataSpec, load_data, load_splits, load_text, source_labels
from core.data.tables import read_table
from core.data.tasks import DEFAULT_LABELS, SPLIT_SEED, load_default_task, split_dataset
from core.data.text import LMSplits, LMText, read_documents

__all__ = [
    "DEFAULT", "DEFAULT_LABELS", "LM", "SPLIT_SEED", "WIKI", "DataError", "DataSpec", "LMSplits", "LMText",
    "TaskSplits", "TextDataset", "format_label_map", "load_data", "load_default_task", "load_splits", "load_text",
    "parse_label_map", "read_documents", "read_table", "source_labels", "split_dataset",
]
