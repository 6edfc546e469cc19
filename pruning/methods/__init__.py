"""Pruning methods, one file each, behind one protocol (`pruning.methods.base.PruningMethod`) and a
registry (`methods()`, `get(name)`, `pruning.methods.registry`) that the CLI, the Prune page and bench read."""

from pruning.methods.base import PruningMethod, check_options, register
from pruning.methods.registry import PLUGINS_ENV, get, methods

__all__ = ["PLUGINS_ENV", "PruningMethod", "check_options", "get", "methods", "register"]
