"""Schedules: frozen dataclasses whose value is a pure function of the training clock.

A point in time (a start, a stop, a half period) is either a step (an ``int``, or a float
above 1) or a fraction of training (a float in [0, 1]). A :class:`Clock` carries the
optimizer step and, when known, the total number of steps or the fraction of training
done, so both kinds can be compared. No schedule keeps a hidden counter.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence, Union

__all__ = [
    "Clock", "Schedule", "Constant", "Linear", "Exponential", "Power", "Cosine", "Cubic",
    "Cyclic", "UpdateSchedule", "as_schedule",
]

When = Union[int, float]


def _is_fraction(x: When) -> bool:
    return isinstance(x, float) and 0.0 <= x <= 1.0


@dataclass(frozen=True)
class Clock:
    """Where training is: ``step`` optimizer steps done; ``total_steps`` or ``progress`` if known."""

    step: int
    total_steps: int | None = None
    progress: float | None = None

    @property
    def fraction(self) -> float:
        if self.progress is not None:
            return float(self.progress)
        if self.total_steps:
            return self.step / self.total_steps
        raise ValueError(
            "a schedule point is given as a fraction of training, but the total number of steps "
            "is unknown: pass total_steps (or progress) to the sparsifier, or give steps as integers")

    def position(self, when: When) -> float:
        """The clock in the unit of ``when``: a fraction if ``when`` is one, else a step."""
        return self.fraction if _is_fraction(when) else float(self.step)

    def to_steps(self, when: When) -> float:
        if not _is_fraction(when):
            return float(when)
        if self.total_steps:
            return when * self.total_steps
        raise ValueError(f"cannot turn the fraction {when} into steps without total_steps")

    def span(self, start: When, end: When) -> float:
        """Position between ``start`` and ``end`` as a number in [0, 1] (0 counts as either kind)."""
        if start == 0:
            t, a, b = self.position(end), 0.0, float(end)
        elif _is_fraction(start) == _is_fraction(end):
            t, a, b = self.position(end), float(start), float(end)
        else:
            t, a, b = float(self.step), self.to_steps(start), self.to_steps(end)
        if b <= a:
            return 1.0 if t >= b else 0.0
        return min(1.0, max(0.0, (t - a) / (b - a)))

    def before(self, when: When | None) -> bool:
        return when is None or self.position(when) < float(when)

    def reached(self, when: When) -> bool:
        return self.position(when) >= float(when)


class Schedule(ABC):
    """Base: ``schedule(clock) -> float``."""

    @abstractmethod
    def __call__(self, clock: Clock) -> float:
        """The value at ``clock``."""


@dataclass(frozen=True)
class Constant(Schedule):
    value: float

    def __call__(self, clock: Clock) -> float:
        return float(self.value)


@dataclass(frozen=True)
class Linear(Schedule):
    """init + slope · step; or, with ``end``, a straight line from init at ``start`` to ``final`` at ``end``."""

    init: float
    slope: float = 0.0
    final: float | None = None
    start: When = 0
    end: When | None = None

    def __call__(self, clock: Clock) -> float:
        if self.end is None or self.final is None:
            return self.init + self.slope * clock.step
        return self.init + (self.final - self.init) * clock.span(self.start, self.end)


@dataclass(frozen=True)
class Exponential(Schedule):
    """final + (init − final) · gamma^step: a fraction 1 − gamma of what is left each step."""

    init: float
    gamma: float
    final: float = 0.0

    def __call__(self, clock: Clock) -> float:
        return self.final + (self.init - self.final) * self.gamma ** clock.step


@dataclass(frozen=True)
class Power(Schedule):
    """init · (step + 1)^beta."""

    init: float
    beta: float

    def __call__(self, clock: Clock) -> float:
        return self.init * (clock.step + 1) ** self.beta


@dataclass(frozen=True)
class Cosine(Schedule):
    """RigL's decay: minimum + (init − minimum)/2 · (1 + cos(π · t / half_period)) for t < half_period,
    ``minimum`` after. ``half_period`` is a step or a fraction of training."""

    init: float
    half_period: When = 1.0
    minimum: float = 0.0

    def __call__(self, clock: Clock) -> float:
        r = clock.span(0, self.half_period)
        return self.minimum + (self.init - self.minimum) / 2 * (1 + math.cos(math.pi * r))


@dataclass(frozen=True)
class Cubic(Schedule):
    """Zhu & Gupta's gradual pruning: s_t = s_f + (s_i − s_f) · (1 − (t − t_0)/(t_end − t_0))³,
    s_i before ``start``, s_f after ``end``."""

    init: float
    final: float
    start: When = 0
    end: When = 1.0

    def __call__(self, clock: Clock) -> float:
        r = clock.span(self.start, self.end)
        return self.final + (self.init - self.final) * (1 - r) ** 3


@dataclass(frozen=True)
class Cyclic(Schedule):
    """A triangle between ``low`` and ``high`` with a period of ``period`` steps, starting at low."""

    low: float
    high: float
    period: int

    def __call__(self, clock: Clock) -> float:
        t = (clock.step % self.period) / self.period
        tri = 1 - abs(2 * t - 1)
        return self.low + (self.high - self.low) * tri


def as_schedule(value: float | Schedule) -> Schedule:
    return value if isinstance(value, Schedule) else Constant(float(value))


@dataclass(frozen=True)
class UpdateSchedule:
    """When masks change: every ``freq`` steps from ``start`` while before ``stop``, or at ``steps``.

    Steps count optimizer steps done (the first step is 1), so with ``freq=100`` the first
    update follows the 100th step.
    """

    freq: int | None = 100
    start: When = 0
    stop: When | None = None
    steps: Sequence[int] | None = None

    def __post_init__(self):
        if self.steps is None:
            if not isinstance(self.freq, int) or isinstance(self.freq, bool) or self.freq < 1:
                raise ValueError(f"update frequency must be an integer ≥ 1 (steps between mask updates), got {self.freq!r}")
        elif any(int(s) < 1 for s in self.steps):
            raise ValueError(f"update steps must be integers ≥ 1, got {list(self.steps)}")

    def is_update(self, clock: Clock) -> bool:
        if self.steps is not None:
            return clock.step in set(int(s) for s in self.steps)
        if clock.step <= 0 or clock.step % self.freq:
            return False
        return clock.reached(self.start) and clock.before(self.stop)
