"""Settings as dataclass fields that carry their own help and limits, checked in one place.

`option(default, help, low=..., high=..., open_low=..., open_high=..., choices=...)` declares a field;
`check_fields(obj, owner)` validates every field of a dataclass instance against its metadata and
raises ValueError naming the field, the rule and the value, e.g. "The 'lr' parameter of TrainConfig
must be a number in (0.0, inf). Got -1 instead." Used by `TrainConfig` and by every method's `Options`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import field, fields


def option(default, help: str, **limits):
    """A dataclass field with its default, its help text (CLI, Prune page) and limits for `check_fields`."""
    return field(default=default, metadata={"help": help, **limits})


def rule(f: dataclasses.Field) -> str | None:
    """The rule a field's value must follow, in words ("an integer in [0, inf)"), from its metadata."""
    meta = f.metadata
    if "choices" in meta:
        return f"one of {', '.join(map(str, meta['choices']))}"
    if isinstance(f.default, bool):
        return "true or false"
    if isinstance(f.default, str):
        return "a non-empty string" if meta.get("required") else "a string"
    if isinstance(f.default, (int, float)):
        low, high = meta.get("low"), meta.get("high")
        left = "(" if meta.get("open_low") else "["
        right = ")" if meta.get("open_high") or high is None else "]"
        kind = "an integer" if isinstance(f.default, int) else "a number"
        return f"{kind} in {left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
    return None


def valid(f: dataclasses.Field, value) -> bool:
    """True if `value` follows the rule of field `f` (see `rule`)."""
    meta = f.metadata
    if "choices" in meta:
        return value in meta["choices"]
    if isinstance(f.default, bool):
        return isinstance(value, bool)
    if isinstance(f.default, str):
        return isinstance(value, str) and (bool(value.strip()) or not meta.get("required"))
    if isinstance(f.default, (int, float)):
        kinds = (int,) if isinstance(f.default, int) else (int, float)
        if not isinstance(value, kinds) or isinstance(value, bool) or not math.isfinite(value):
            return False
        low, high = meta.get("low"), meta.get("high")
        if low is not None and not (value > low if meta.get("open_low") else value >= low):
            return False
        return high is None or (value < high if meta.get("open_high") else value <= high)
    return True


def check_fields(obj, owner: str) -> None:
    """ValueError for the first field of dataclass instance `obj` whose value breaks its rule."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        if not valid(f, value):
            raise ValueError(f"The '{f.name}' parameter of {owner} must be {rule(f)}. Got {value!r} instead.")
