"""Widgets for settings declared as dataclass fields (`pruning.options.option`): one input per field,
chosen by its type and limits, labelled by its name and helped by its help text. The Prune page builds
its method form from the chosen method's `Options` with these, so a new method needs no page code."""

from __future__ import annotations

import dataclasses

import streamlit as st


def label(name: str) -> str:
    """`target_sparsity` -> "Target sparsity"."""
    return name.replace("_", " ").capitalize()


def setting_input(container, f: dataclasses.Field, key: str, value=None):
    """One widget for field `f` in `container` (a column or the page), starting at `value` (default: the
    field's default); returns what the user set, of the field's type."""
    meta, start = f.metadata, f.default if value is None else value
    helptext = meta.get("help", "")
    if "choices" in meta:
        choices = list(meta["choices"])
        return container.selectbox(label(f.name), choices, index=choices.index(start), help=helptext, key=key)
    if isinstance(f.default, bool):
        return container.checkbox(label(f.name), value=start, help=helptext, key=key)
    if isinstance(f.default, float) and meta.get("low") is not None and meta.get("high") is not None:
        low, high = float(meta["low"]), float(meta["high"])
        step = (high - low) / 100
        low, high = low + step * bool(meta.get("open_low")), high - step * bool(meta.get("open_high"))
        return container.slider(label(f.name), low, high, float(min(max(start, low), high)), step=step,
                                help=helptext, key=key)
    if isinstance(f.default, int):
        low = int(meta["low"]) if meta.get("low") is not None else None
        high = int(meta["high"]) if meta.get("high") is not None else None
        return int(container.number_input(label(f.name), min_value=low, max_value=high, value=int(start), step=1,
                                          help=helptext, key=key))
    if isinstance(f.default, float):
        return float(container.number_input(label(f.name), value=float(start), format="%g", help=helptext,
                                            key=key))
    return container.text_input(label(f.name), value=str(start), help=helptext, key=key)


def own_fields_first(options: type) -> list[dataclasses.Field]:
    """The fields of dataclass `options`, those it declares itself before those it inherits (e.g. a method's
    own settings before the shared CAP settings)."""
    own = set(vars(options).get("__annotations__", {}))
    every = dataclasses.fields(options)
    return [f for f in every if f.name in own] + [f for f in every if f.name not in own]


def settings_inputs(fields: list[dataclasses.Field], key: str, per_row: int = 3) -> dict:
    """Widgets for `fields` in rows of `per_row` columns; name -> value set."""
    values = {}
    for start in range(0, len(fields), per_row):
        row = fields[start:start + per_row]
        for column, f in zip(st.columns(per_row), row):
            values[f.name] = setting_input(column, f, key=f"{key}_{f.name}")
    return values
