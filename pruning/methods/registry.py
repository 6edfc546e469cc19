"""The method registry the CLI, the Prune page and bench read: the built-in methods (every module of
this package, imported here; each registers its methods) plus any module named in the environment
variable `HEADLAB_METHODS` (comma-separated import paths), imported when the registry is first read, so
a method defined outside HeadLab is available to the CLI, the app and its background jobs alike."""

from __future__ import annotations

import importlib
import os
import pkgutil
from pathlib import Path

from pruning.methods import base

for _module in pkgutil.iter_modules([str(Path(__file__).parent)]):
    importlib.import_module(f"pruning.methods.{_module.name}")

PLUGINS_ENV = "HEADLAB_METHODS"
_plugins_loaded = False


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for module in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ValueError(f"{PLUGINS_ENV} names {module!r}, which cannot be imported ({exc}).") from exc


def methods() -> dict[str, type[base.PruningMethod]]:
    """Name -> class of every registered method, built-ins first."""
    _load_plugins()
    return dict(sorted(base.REGISTERED.items(), key=lambda item: item[1].order))


def get(name: str) -> type[base.PruningMethod]:
    """The method class called `name`; ValueError listing the known ones otherwise."""
    known = methods()
    if name not in known:
        raise ValueError(f"The 'method' parameter must be one of {', '.join(known)}. Got {name!r} instead.")
    return known[name]


