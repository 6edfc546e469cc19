"""Label names: a user's label map (the file's names -> the model's) and the mapping of raw label
cells onto class ids.

A label map is written `pos=fresh,neg=rotten` on command lines (`parse_label_map` / `format_label_map`)
and kept as a dict {"pos": "fresh", "neg": "rotten"}: each file label on the left is read as the model
label on the right; labels it does not name are matched as they are. Label names may not contain
"," or "=" in the written form.
"""

from __future__ import annotations

import re

from core.data.dataset import DataError
from core.messages import quote

_INT = re.compile(r"[+-]?\d+")


def parse_label_map(text: str | None) -> dict[str, str]:
    """"pos=fresh,neg=rotten" -> {"pos": "fresh", "neg": "rotten"}; blank -> {}. DataError names the bad item."""
    if text is None or not text.strip():
        return {}
    pairs = []
    for item in text.split(","):
        file_label, eq, model_label = (part.strip() for part in item.partition("="))
        if not eq or not file_label or not model_label:
            raise DataError(f"A label map is comma-separated FILE=MODEL pairs, e.g. pos=fresh,neg=rotten. "
                            f"Got '{quote(item.strip())}' in '{quote(text)}'.")
        pairs.append((file_label, model_label))
    return _clean(pairs)


def format_label_map(mapping: dict[str, str]) -> str:
    """Inverse of `parse_label_map`: {"pos": "fresh", "neg": "rotten"} -> "pos=fresh,neg=rotten"."""
    return ",".join(f"{k}={v}" for k, v in mapping.items())


def check_label_map(mapping: object) -> dict[str, str]:
    """`mapping` as a clean {file label: model label} dict of stripped, non-empty strings (DataError otherwise)."""
    if not isinstance(mapping, dict):
        raise DataError(f"A label map must map file labels to model labels. Got a {type(mapping).__name__}.")
    return _clean(mapping.items())


def _clean(pairs) -> dict[str, str]:
    """{file label: model label} from (key, value) pairs: stripped non-empty strings without ',' or '=',
    each file label once (case-insensitive); DataError otherwise."""
    clean: dict[str, str] = {}
    for key, value in pairs:
        if not isinstance(key, str) or not isinstance(value, str) or not key.strip() or not value.strip():
            raise DataError(f"A label map takes non-empty label names. Got {key!r}: {value!r}.")
        if any(c in key + value for c in ",="):
            raise DataError(f"Label names in a label map may not contain ',' or '='. Got {key!r}: {value!r}.")
        if key.strip().lower() in {k.lower() for k in clean}:
            raise DataError(f"The label map names the file label '{quote(key.strip())}' twice.")
        clean[key.strip()] = value.strip()
    return clean


def map_labels(raw: list[str], label_names: list[str] | None, where: str,
               label_map: dict[str, str] | None = None) -> tuple[list[int], list[str]]:
    """(ids, names) for raw label strings, after renaming them by `label_map` (file label -> model label,
    case-insensitive).

    With `label_names`: match by name (case-insensitive), else read integers as ids in range(len(names));
    a label that matches neither is refused with one line that suggests a label map.
    Without: sorted unique labels (integers numerically, else strings alphabetically) get ids 0..k-1.
    """
    if label_map:
        _check_targets(label_map, label_names)
        renamed = {k.lower(): v for k, v in label_map.items()}
        raw = [renamed.get(v.lower(), v) for v in raw]
    ids, names = _ids_by_name(raw, label_names, where) if label_names is not None else _own_ids(raw)
    if len(set(ids)) < 2:
        raise DataError(f"{where} needs at least two labels, found only '{quote(names[ids[0]])}'.")
    return ids, names


def _check_targets(label_map: dict[str, str], label_names: list[str] | None) -> None:
    """DataError if the label map sends a file label to a name the model does not have."""
    known = {str(n).strip().lower() for n in label_names or []}
    for file_label, model_label in label_map.items():
        if label_names is not None and model_label.lower() not in known:
            raise DataError(f"The label map sends '{quote(file_label)}' to '{quote(model_label)}', which is not "
                            f"one of the model's labels: {quote(', '.join(map(str, label_names)))}.")


def _own_ids(raw: list[str]) -> tuple[list[int], list[str]]:
    """Sorted unique labels (integers numerically, else alphabetically) as ids 0..k-1."""
    distinct = list(dict.fromkeys(raw))
    if all(_INT.fullmatch(v) for v in distinct):
        values = sorted({int(v) for v in distinct})
        index = {v: i for i, v in enumerate(values)}
        return [index[int(v)] for v in raw], [str(v) for v in values]
    names = sorted(distinct)
    index = {v: i for i, v in enumerate(names)}
    return [index[v] for v in raw], names


def _ids_by_name(raw: list[str], label_names: list[str], where: str) -> tuple[list[int], list[str]]:
    """Ids into the model's `label_names`, by name (case-insensitive) or by integer id."""
    names = [str(n) for n in label_names]
    by_name: dict[str, int] = {}
    for i, n in enumerate(names):
        by_name.setdefault(n.strip().lower(), i)
    distinct = list(dict.fromkeys(raw))
    if all(v.lower() in by_name for v in distinct):
        return [by_name[v.lower()] for v in raw], names
    if all(_INT.fullmatch(v) for v in distinct):
        unexpected = [v for v in distinct if not 0 <= int(v) < len(names)]
        if not unexpected:
            return [int(v) for v in raw], names
    else:
        unexpected = [v for v in distinct if v.lower() not in by_name]
    raise DataError(
        f"{where} has labels the model does not know: {_preview(unexpected)}; the model's labels are: "
        f"{quote(', '.join(names))} (or ids 0..{len(names) - 1}); map them onto these with a label map "
        "(FILE=MODEL pairs, e.g. pos=fresh)."
    )


def _preview(values: list[str], limit: int = 5) -> str:
    """'a', 'b', 'c' (and N more): at most `limit` values, cut by `quote` as a whole."""
    shown = quote(", ".join(f"'{v}'" for v in values[:limit]))
    return shown + (f" (and {len(values) - limit} more)" if len(values) > limit else "")
