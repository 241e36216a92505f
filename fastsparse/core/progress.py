"""Sparsity schedules over training progress (the fasterai set).

A schedule maps the fraction of training done, p ∈ [0, 1], to the fraction of the final
sparsity in force. Between ``start`` and ``end`` the position is x = (p − start)/(end − start);
before ``start`` the value is 0, from ``end`` on it is f(1):

| name | f(x) |
|---|---|
| ``one_shot`` | 1 (from ``start`` on) |
| ``iterative`` | ⌈x · n⌉ / n (n steps, default 3) |
| ``agp`` | 1 − (1 − x)³ (Zhu & Gupta's cubic on progress) |
| ``lin`` | x |
| ``cos`` | (1 − cos(π x)) / 2 |
| ``one_cycle`` | (1 + e^(−α+β)) / (1 + e^(−α x + β)), α = 14, β = 6 |
| ``dsd`` | (1 − cos(2π x)) / 2: dense, sparse at x = ½, dense again |

Default starts follow fasterai: ``one_shot`` 0.5, ``iterative`` and ``agp`` 0.2, others 0.
fasterai's function names (``sched_oneshot``, ``sched_iterative``, ``sched_agp``,
``sched_onecycle``, ``sched_cos``, ``sched_lin``, ``sched_dsd``) and ``one_cycle``'s are
accepted as names. ``start_val``/``end_val`` (fasterai's ``Schedule``) rescale the value:
start_val + (end_val − start_val) · f(x), and start_val before ``start``.
For example ``agp`` with start 0.2 at p = 0.5: x = 0.375, 1 − 0.625³ ≈ 0.756.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Union

__all__ = [
    "one_shot", "iterative", "agp", "lin", "cos", "one_cycle", "dsd",
    "PROGRESS_SCHEDULES", "DEFAULT_STARTS", "SCHEDULE_ALIASES", "ProgressSchedule", "as_progress_schedule",
]


def one_shot(x: float) -> float:
    return 1.0


def iterative(x: float, n_steps: int = 3) -> float:
    return math.ceil(x * n_steps - 1e-12) / n_steps


def agp(x: float) -> float:
    return 1.0 - (1.0 - x) ** 3


def lin(x: float) -> float:
    return x


def cos(x: float) -> float:
    return (1.0 - math.cos(math.pi * x)) / 2


def one_cycle(x: float, alpha: float = 14.0, beta: float = 6.0) -> float:
    return (1 + math.exp(-alpha + beta)) / (1 + math.exp(-alpha * x + beta))


def dsd(x: float) -> float:
    return (1.0 - math.cos(2 * math.pi * x)) / 2


PROGRESS_SCHEDULES: dict[str, Callable[[float], float]] = {
    "one_shot": one_shot, "iterative": iterative, "agp": agp, "lin": lin, "cos": cos,
    "one_cycle": one_cycle, "dsd": dsd,
}
DEFAULT_STARTS = {"one_shot": 0.5, "iterative": 0.2, "agp": 0.2}
SCHEDULE_ALIASES = {"sched_oneshot": "one_shot", "sched_iterative": "iterative", "sched_agp": "agp",
                    "sched_onecycle": "one_cycle", "sched_cos": "cos", "sched_lin": "lin", "sched_dsd": "dsd"}


@dataclass(frozen=True)
class ProgressSchedule:
    """``schedule(p)`` = fraction of the final sparsity at training progress ``p``.

    kind: a name from :data:`PROGRESS_SCHEDULES`; start/end: fractions of training
    (start None = the kind's default); n_steps: the number of steps of ``iterative``.
    """

    kind: str = "agp"
    start: float | None = None
    end: float = 1.0
    n_steps: int = 3
    start_val: float = 0.0
    end_val: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "kind", SCHEDULE_ALIASES.get(self.kind, self.kind))
        if self.kind not in PROGRESS_SCHEDULES:
            raise ValueError(f"unknown schedule {self.kind!r}; valid names: {list(PROGRESS_SCHEDULES)} "
                             f"(or fasterai's {list(SCHEDULE_ALIASES)})")
        for what, v in (("start_val", self.start_val), ("end_val", self.end_val)):
            if not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"{what} is a fraction of the final sparsity in [0, 1], got {v}")
        start = DEFAULT_STARTS.get(self.kind, 0.0) if self.start is None else float(self.start)
        object.__setattr__(self, "start", start)
        if not (0.0 <= start <= 1.0 and 0.0 <= float(self.end) <= 1.0):
            raise ValueError(f"schedule start and end are fractions of training in [0, 1], got {start} and {self.end}")
        if start > float(self.end):
            raise ValueError(f"the schedule starts after it ends (start {start} > end {self.end})")
        if isinstance(self.n_steps, bool) or not isinstance(self.n_steps, int) or self.n_steps < 1:
            raise ValueError(f"n_steps must be an integer ≥ 1, got {self.n_steps!r}")

    def position(self, progress: float) -> float:
        """x in [0, 1]: 0 before start, 1 from end on."""
        p, a, b = float(progress), float(self.start), float(self.end)
        if p < a:
            return 0.0
        if p >= b:
            return 1.0
        return (p - a) / (b - a)

    def __call__(self, progress: float) -> float:
        a, b = float(self.start_val), float(self.end_val)
        if float(progress) < float(self.start):
            return a
        x = self.position(progress)
        f = iterative(x, self.n_steps) if self.kind == "iterative" else PROGRESS_SCHEDULES[self.kind](x)
        return a + (b - a) * f


ScheduleLike = Union[str, ProgressSchedule, Callable[[float], float]]


def as_progress_schedule(schedule: ScheduleLike, start: float | None = None, end: float | None = None,
                         n_steps: int = 3) -> Callable[[float], float]:
    """A name becomes a :class:`ProgressSchedule`; a schedule object or a function of progress is used as is."""
    if isinstance(schedule, str):
        return ProgressSchedule(schedule, start, 1.0 if end is None else end, n_steps)
    if callable(schedule):
        if start is not None or end is not None:
            raise ValueError("start and end go with a schedule name; a schedule object carries its own")
        return schedule
    raise TypeError(f"schedule must be a name, a ProgressSchedule or a function of progress, got {schedule!r}")
