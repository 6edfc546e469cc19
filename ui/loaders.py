"""Cached loaders. Models are shared singletons (`st.cache_resource`): never mutate them."""

from __future__ import annotations

import hashlib
from pathlib import Path

import streamlit as st

from core.data import DataError, DataSpec, TextDataset, load_data, source_labels
from core.models import LoadedModel, ModelError, ModelNotPrepared, load_model, resolve
from core.paths import headlab_home


def _folder_key(spec: str) -> str:
    """Changes when the folder's weights change, so an edited folder is reloaded."""
    path = resolve(spec)
    weights = path / "model.safetensors"
    return f"{path}:{weights.stat().st_mtime_ns if weights.exists() else 0}"


@st.cache_resource(max_entries=4, show_spinner="Loading model...")
def _cached_model(spec: str, key: str) -> LoadedModel:
    return load_model(spec)


def get_model(spec: str) -> LoadedModel | None:
    """The loaded model, or None after showing why it cannot be loaded (not prepared is left to the caller)."""
    try:
        return _cached_model(spec, _folder_key(spec))
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


def session_model_and_dev() -> tuple[str, DataSpec, LoadedModel, TextDataset]:
    """(model spec, data spec, model, dev rows) chosen on the Model page; stops the page with a message
    when the model is not prepared or either cannot be loaded."""
    spec, data_spec = st.session_state.get("model_spec", "default"), session_data_spec()
    try:
        loaded = get_model(spec)
    except ModelNotPrepared as exc:
        st.info(f"{exc} Open the Model page to prepare it.")
        st.stop()
    data = get_data(data_spec, "dev", loaded.label_names) if loaded is not None else None
    if data is None:
        st.stop()
    return spec, data_spec, loaded, data
