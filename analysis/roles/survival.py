"""Role survival: which role-bearing heads a gate state keeps, and role-aware pruning orders.

A role table is the dense model's one-row-per-head table (`analysis.roles.score_heads`, a Heads report's
`table`): its `roles` column holds "+"-joined labels such as "positional(-1)+syntactic(amod:dep2head)",
"rare-word" or, for a decoder, "previous-token", "duplicate-token", "induction" (Olsson et al. 2022). A
role's *kind* is the label before its parenthesis. A head is kept when its head gate and its layer's
attention gate are both > 0 (what `pruning.surgery.prune` keeps).

Voita et al. (2019) found that the heads with a role are the last to go when heads are pruned;
`survival_frame` over a run's gate states shows whether that holds here (each kind's kept share against
the role-free heads' kept share, step by step).

Role-aware ordering (`protect_scores`): every head with a role gets its score raised above every
role-free head's, the order inside each group unchanged, so a method keeping its top heads closes
role-free heads first and role heads only once no role-free head is left.
"""

from __future__ import annotations

from typing import Protocol

import pandas as pd
import torch


class GateState(Protocol):
    """What is read of a gate state (`pruning.gate_state.GateState`; analysis does not import pruning)."""

    head: torch.Tensor  # (L, H)
    mha: torch.Tensor  # (L,)

KINDS = ("positional", "syntactic", "rare-word", "previous-token", "duplicate-token", "induction")
NONE = "none"  # the row of role-free heads in `survival`


def kinds(roles: str) -> set[str]:
    """The role kinds of one `roles` cell, e.g. "positional(-1)+rare-word" -> {"positional", "rare-word"}."""
    return {label.split("(")[0] for label in (roles or "").split("+") if label}


def role_heads(table: pd.DataFrame) -> dict[str, set[tuple[int, int]]]:
    """{kind: the (layer, head) pairs carrying it} for every kind of `KINDS` (empty sets included), plus
    NONE: the heads without any role."""
    out: dict[str, set[tuple[int, int]]] = {kind: set() for kind in (*KINDS, NONE)}
    for layer, head, roles in zip(table["layer"], table["head"], table["roles"].fillna("")):
        found = kinds(roles)
        for kind in found or {NONE}:
            out.setdefault(kind, set()).add((int(layer), int(head)))
    return out


def role_mask(table: pd.DataFrame, shape: tuple[int, int]) -> torch.Tensor:
    """(L, H) bool: the heads of `table` with at least one role (heads missing from the table: False)."""
    mask = torch.zeros(shape, dtype=torch.bool)
    for layer, head, roles in zip(table["layer"], table["head"], table["roles"].fillna("")):
        if roles:
            mask[int(layer), int(head)] = True
    return mask


def kept_heads(state: GateState) -> set[tuple[int, int]]:
    """The heads `state` keeps: head gate > 0 and the layer's attention gate > 0."""
    s = state.detach()
    return {tuple(x) for x in torch.nonzero((s.head > 0) & (s.mha[:, None] > 0)).tolist()}


def survival(state: GateState, table: pd.DataFrame) -> pd.DataFrame:
    """Per role kind (and NONE: role-free heads), how many of its heads `state` keeps.

    Returns columns kind, kept, total, share (kept / total; NaN for a kind no head carries), one row per
    kind of `KINDS` then NONE. A head with two kinds counts in both."""
    kept = kept_heads(state)
    rows = [{"kind": kind, "kept": len(heads & kept), "total": len(heads)}
            for kind, heads in role_heads(table).items()]
    frame = pd.DataFrame(rows)
    frame["share"] = frame["kept"] / frame["total"].where(frame["total"] > 0)
    return frame


def survival_frame(states: dict[int, GateState], table: pd.DataFrame) -> pd.DataFrame:
    """`survival` of each of `states` ({step: state}, e.g. a run's gate snapshots), with a `step` column."""
    frames = [survival(state, table).assign(step=step) for step, state in sorted(states.items())]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["kind", "kept", "total", "share", "step"])


def protect_scores(scores: torch.Tensor, protected: torch.Tensor) -> torch.Tensor:
    """`scores` (L, H) with every `protected` head (an (L, H) bool mask) raised above every other head:
    protected heads get score + (max - min + 1) over all heads, so the order inside each group stays and
    any protected head outranks any unprotected one."""
    if scores.shape != protected.shape:
        raise ValueError(f"protect_scores() needs one protection flag per head: scores {tuple(scores.shape)}, "
                         f"mask {tuple(protected.shape)}.")
    lift = scores.max() - scores.min() + 1
    return torch.where(protected.to(torch.bool), scores + lift, scores)


def least_relevant_role_free(table: pd.DataFrame, k: int, column: str = "relevance") -> frozenset[tuple[int, int]]:
    """The `k` heads to close first when role-bearing heads are protected: role-free heads by rising
    `column`, then (only if k exceeds them) role heads by rising `column` (the Gates page's preset)."""
    ordered = table.assign(_role=table["roles"].fillna("") != "").sort_values(["_role", column], kind="stable")
    return frozenset((int(r.layer), int(r.head)) for r in ordered.head(k).itertuples())


def role_vs_free(state: GateState, table: pd.DataFrame) -> tuple[float, float]:
    """(share of the heads with any role that `state` keeps, share of the role-free heads it keeps); NaN
    for an empty group. Voita's finding, in these terms: the first stays above the second as heads go."""
    kept = kept_heads(state)
    with_role = {(int(r.layer), int(r.head)) for r in table.assign(roles=table["roles"].fillna("")).itertuples()
                 if r.roles}
    free = {(int(r.layer), int(r.head)) for r in table.itertuples()} - with_role
    return tuple(len(group & kept) / len(group) if group else float("nan") for group in (with_role, free))
