"""Zhu & Gupta's (2017) cubic sparsity schedule, shared by gradual pruning and SMP.

    s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3      for t in {t0, t0 + dt, ..., t0 + n dt}

The mask is updated at those n + 1 steps (s_i at t0, s_f exactly at t0 + n dt) and holds its sparsity
in between; before t0 it is s_i, after t0 + n dt it stays s_f. s_t rises fast at first, while many
redundant weights are left, and slowly near the end.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CubicSchedule:
    """`final` s_f and `initial` s_i (fractions), `start` t0, `interval` dt and `updates` n (steps)."""

    final: float
    initial: float = 0.0
    start: int = 0
    interval: int = 100
    updates: int = 10

    def __post_init__(self):
        if not 0 <= self.initial <= self.final < 1:
            raise ValueError(f"The cubic schedule needs 0 <= initial <= final < 1. Got initial {self.initial}, "
                             f"final {self.final}.")
        if self.start < 0 or self.interval < 1 or self.updates < 1:
            raise ValueError(f"The cubic schedule needs start >= 0, interval >= 1 and updates >= 1. Got start "
                             f"{self.start}, interval {self.interval}, updates {self.updates}.")

    @classmethod
    def fitted(cls, final: float, initial: float, start: int, interval: int, updates: int,
               steps: int) -> CubicSchedule:
        """The schedule with `updates` n, or (n = 0) the most updates whose last step t0 + n dt is before
        `steps` (the gate phase's length); ValueError if not even one fits."""
        n = updates or (steps - 1 - start) // interval
        if n < 1 or start + n * interval > steps - 1:
            raise ValueError(f"The sparsity schedule's last update (start + updates * interval = {start} + "
                             f"{max(n, 1)} * {interval}) must come before the end of the {steps} steps: lower "
                             "start, interval or updates, or raise steps.")
        return cls(final=final, initial=initial, start=start, interval=interval, updates=n)

    @property
    def end(self) -> int:
        """t0 + n dt: the step of the last update, where s_t reaches s_f."""
        return self.start + self.updates * self.interval

    def updates_at(self, step: int) -> bool:
        """True at the n + 1 steps t0, t0 + dt, ..., t0 + n dt."""
        return self.start <= step <= self.end and (step - self.start) % self.interval == 0

    def at(self, step: int) -> float:
        """The sparsity held at `step`: s_t of the last update at or before it (s_i before t0)."""
        if step >= self.end:
            return self.final
        done = (step - self.start) // self.interval * self.interval
        if done <= 0:  # before t0, and at t0 exactly (the formula's float would be a hair below s_i)
            return self.initial
        return self.final + (self.initial - self.final) * (1 - done / (self.updates * self.interval)) ** 3
