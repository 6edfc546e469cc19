"""Cached loaders. Models are shared singletons (`st.cache_resource`): never mutate them.

Session state the Model page sets and the other pages read: "model_spec" (a built-in name, a folder or a
.gguf file), "data_spec" (a `DataSpec` of labeled data), and for a decoder "prompt_spec" (the
`core.prompting.PromptSpec` that reads it as a classifier of the data's labels; `session_prompt`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import streamlit as st

from core.data import DataError, DataSpec, LMText, TextDataset, load_data, load_text, source_labels
from core.models import LoadedModel, ModelError, ModelNotPrepared, load_model, resolve
from core.paths import headlab_home
from core.prompting import PromptSpec


def _folder_key(spec: str) -> str:
    """Changes when the folder's weights change, so an edited folder is reloaded."""
    path = resolve(spec)
    weights = path / "model.safetensors"
    return f"{path}:{weights.stat().st_mtime_ns if weights.exists() else 0}"


@st.cache_resource(max_entries=4, show_spinner="Loading model...")
def _cached_model(spec: str, key: str, prompt: str, label_names: tuple[str, ...] | None) -> LoadedModel:
    return load_model(spec, label_names=list(label_names) if label_names else None,
                      prompt=PromptSpec.from_dict(json.loads(prompt)) if prompt else None)


def get_model(spec: str, prompt: PromptSpec | None = None, label_names: list[str] | None = None) -> LoadedModel | None:
    """The loaded model, or None after showing why it cannot be loaded (not prepared is left to the caller).
    A decoder is read as a classifier of `label_names` with `prompt` (default: its built-in prompt of the
    default task's labels); each prompt is its own cached model."""
    try:
        key = json.dumps(prompt.to_dict(), sort_keys=True) if prompt else ""
        return _cached_model(spec, _folder_key(spec), key, tuple(label_names) if label_names else None)
    except ModelNotPrepared:
        raise
    except ModelError as exc:
        st.error(str(exc))
        return None


@st.cache_data(max_entries=16, show_spinner="Reading data...")
def _cached_data(spec: str, split: str, label_names: tuple[str, ...] | None) -> TextDataset:
    return load_data(DataSpec.from_json(spec), split, list(label_names) if label_names else None)


@st.cache_data(max_entries=16, show_spinner="Reading data...")
def _cached_labels(spec: str) -> list[str]:
    return source_labels(DataSpec.from_json(spec))


def _shown(read, *args):
    """`read(*args)`, or None after showing its DataError in an error box."""
    try:
        return read(*args)
    except DataError as exc:
        st.error(str(exc))
        return None


def get_data(spec: DataSpec, split: str = "dev", label_names: list[str] | None = None) -> TextDataset | None:
    """The rows `split` means for `spec` (`core.data.load_data`), or None after showing an error box."""
    return _shown(_cached_data, spec.to_json(), split, tuple(label_names) if label_names else None)


@st.cache_data(max_entries=8, show_spinner="Reading text...")
def _cached_text(spec: str, split: str) -> LMText:
    return load_text(DataSpec.from_json(spec), split)


def get_text(spec: DataSpec, split: str = "dev") -> LMText | None:
    """The documents `split` means for text spec `spec` (`core.data.load_text`), or None after an error box."""
    return _shown(_cached_text, spec.to_json(), split)


def get_labels(spec: DataSpec) -> list[str] | None:
    """The data's own label names (`core.data.source_labels`), or None after showing an error box."""
    return _shown(_cached_labels, spec.to_json())


def save_upload(upload) -> Path:
    """Keep an uploaded file under $HEADLAB_HOME/uploads (named by content hash) so jobs can read it."""
    data = upload.getvalue()
    folder = headlab_home() / "uploads"
    folder.mkdir(exist_ok=True)
    path = folder / f"{hashlib.sha1(data).hexdigest()[:10]}-{Path(upload.name).name}"
    if not path.exists():
        path.write_bytes(data)
    return path


def session_data_spec() -> DataSpec:
    """The data chosen on the Model page (the default task until one is chosen)."""
    return st.session_state.get("data_spec") or DataSpec()


def session_prompt(label_names: list[str]) -> PromptSpec:
    """The decoder prompt chosen on the Model page if it has one word per label of `label_names`, else the
    default prompt of those labels (`PromptSpec.for_labels`)."""
    prompt = st.session_state.get("prompt_spec")
    if isinstance(prompt, PromptSpec) and len(prompt.label_words) == len(label_names):
        return prompt
    return PromptSpec.for_labels(label_names)


def session_model_and_dev() -> tuple[str, DataSpec, LoadedModel, TextDataset]:
    """(model spec, data spec, model, dev rows) chosen on the Model page; stops the page with a message
    when the model is not prepared or either cannot be loaded. A decoder comes prompted (`session_prompt`)
    to classify the data's own labels."""
    spec, data_spec = st.session_state.get("model_spec", "default"), session_data_spec()
    try:
        loaded = get_model(spec)
    except ModelNotPrepared as exc:
        st.info(f"{exc} Open the Model page to prepare it.")
        st.stop()
    if loaded is None:
        st.stop()
    if loaded.is_decoder:
        loaded, data = _prompted(spec, loaded, data_spec)
    else:
        data = get_data(data_spec, "dev", loaded.label_names)
    if loaded is None or data is None:
        st.stop()
    return spec, data_spec, loaded, data


def _prompted(spec: str, loaded: LoadedModel, data_spec: DataSpec) -> tuple[LoadedModel | None, TextDataset | None]:
    """(decoder `loaded` prompted to classify the data's own labels with `session_prompt`, the dev rows)."""
    data = get_data(data_spec, "dev")
    if data is None:
        return loaded, None
    prompt = session_prompt(data.label_names)
    if (data.label_names, prompt) == (loaded.label_names, loaded.prompt):
        return loaded, data
    return get_model(spec, prompt, data.label_names), data
