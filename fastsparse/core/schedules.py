"""Schedules: frozen dataclasses whose value is a pure function of the training clock.

One module for every schedule of the library: the sparsity and drop-fraction schedules of the
algorithms, the update schedule (when masks change), the learning-rate schedules of the runner
and of the methods that own their learning rate (Sup-tickets' cycles, score-search fine-tuning),
and fasterai's schedules over training progress. Each class checks its own arguments, so the
config schema is built from these classes and validates exactly what they accept.

A point in time (a start, a stop, a half period) is either a step (an ``int``, or a float
above 1) or a fraction of training (a float in [0, 1]). A :class:`Clock` carries the
optimizer step and, when known, the total number of steps or the fraction of training
done, so both kinds can be compared. No schedule keeps a hidden counter.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Callable, Sequence, Union

__all__ = [
    "Clock", "Schedule", "Constant", "Linear", "Exponential", "Power", "Cosine", "Cubic",
    "Cyclic", "StepDecay", "Warmup", "UpdateSchedule", "as_schedule", "SCHEDULES", "SCHEDULE_TYPE_ALIASES",
    "check_when", "check_levels",
    "one_shot", "iterative", "agp", "lin", "cos", "one_cycle", "dsd",
    "PROGRESS_SCHEDULES", "DEFAULT_STARTS", "SCHEDULE_ALIASES", "ProgressSchedule", "as_progress_schedule",
    "ScheduleLike",
]

When = Union[int, float]


def _is_fraction(x: When) -> bool:
    return isinstance(x, float) and 0.0 <= x <= 1.0


def check_when(value: When, what: str = "a point in time") -> When:
    """A step (integer ≥ 0) or a fraction of training (a number in [0, 1]); raises otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and math.isnan(value)):
        raise ValueError(f"{what} must be a step (an integer) or a fraction of training (a number in [0, 1]), "
                         f"got {value!r}")
    if value < 0:
        raise ValueError(f"{what} must be ≥ 0, got {value!r}")
    return value


def _same_kind_order(start: When | None, stop: When | None, what: str) -> None:
    """Two points of the same kind (steps, or fractions) in the wrong order are an error."""
    if start is None or stop is None or start == 0:
        return
    if _is_fraction(start) == _is_fraction(stop) and float(start) >= float(stop):
        raise ValueError(f"{what} starts at {start} and stops at {stop}: the window is empty; "
                         f"the start must come before the stop")


@dataclass(frozen=True)
class Clock:
    """Where training is: ``step`` optimizer steps done; ``total_steps`` or ``progress`` if known;
    ``epoch_steps``, optimizer steps per epoch, where the driver knows it."""

    step: int
    total_steps: int | None = None
    progress: float | None = None
    epoch_steps: int | None = None

    @property
    def fraction(self) -> float:
        if self.progress is not None:
            return float(self.progress)
        if self.total_steps:
            return self.step / self.total_steps
        raise ValueError(
            "a schedule point is given as a fraction of training, but the total number of steps "
            "is unknown: pass total_steps (or progress) to the sparsifier, or give steps as integers")

    def at(self, step: int) -> "Clock":
        """The same clock at another step (progress recomputed from the total)."""
        return replace(self, step=int(step), progress=None)

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


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(float(value)):
        raise ValueError(f"{what} must be a number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Constant(Schedule):
    """value."""

    value: float

    def __post_init__(self):
        _number(self.value, "value")

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

    def __post_init__(self):
        check_when(self.start, "start")
        if self.end is not None:
            check_when(self.end, "end")
            _same_kind_order(self.start, self.end, "the linear schedule")

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

    def __post_init__(self):
        if not _number(self.gamma, "gamma") > 0:
            raise ValueError(f"gamma must be > 0, got {self.gamma}")

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
    ``minimum`` after. ``half_period`` is a step or a fraction of training (1.0: the whole of it,
    the learning-rate cosine)."""

    init: float
    half_period: When = 1.0
    minimum: float = 0.0

    def __post_init__(self):
        check_when(self.half_period, "half_period")

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

    def __post_init__(self):
        check_when(self.start, "start")
        check_when(self.end, "end")
        _same_kind_order(self.start, self.end, "the cubic schedule")

    def __call__(self, clock: Clock) -> float:
        r = clock.span(self.start, self.end)
        return self.final + (self.init - self.final) * (1 - r) ** 3


@dataclass(frozen=True)
class Cyclic(Schedule):
    """A triangle between ``low`` and ``high`` with a period of ``period`` steps, starting at low:
    at t = (step mod period) / period, low · (1 − 2t) + high · 2t for t < ½ and
    low · (2t − 1) + high · (2 − 2t) after (Sup-tickets' cyclic learning rate, lr_1 = low,
    lr_2 = high)."""

    low: float
    high: float
    period: int

    def __post_init__(self):
        if isinstance(self.period, bool) or not isinstance(self.period, int) or self.period < 1:
            raise ValueError(f"period must be an integer number of steps ≥ 1, got {self.period!r}")

    def __call__(self, clock: Clock) -> float:
        t = (clock.step % self.period) / self.period
        tri = 1 - abs(2 * t - 1)
        return self.low + (self.high - self.low) * tri


@dataclass(frozen=True)
class StepDecay(Schedule):
    """init · gamma^k, k the number of ``milestones`` reached (steps or fractions of training), or,
    with ``every`` (steps), k = ⌊step / every⌋."""

    init: float = 1.0
    gamma: float = 0.1
    milestones: tuple = ()
    every: int | None = None

    def __post_init__(self):
        if not _number(self.gamma, "gamma") > 0:
            raise ValueError(f"gamma must be > 0, got {self.gamma}")
        object.__setattr__(self, "milestones", tuple(check_when(m, "a milestone") for m in self.milestones))
        if self.every is not None and (isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1):
            raise ValueError(f"every must be an integer number of steps ≥ 1, got {self.every!r}")

    def __call__(self, clock: Clock) -> float:
        k = clock.step // self.every if self.every else sum(clock.reached(m) for m in self.milestones)
        return self.init * self.gamma ** k


@dataclass(frozen=True)
class Warmup(Schedule):
    """A linear warm-up over the first ``steps`` steps, (step + 1) / steps · inner(0), then
    ``inner`` on the clock of the steps after the warm-up (its fractions are fractions of them)."""

    inner: Schedule
    steps: int = 0

    def __post_init__(self):
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"warm-up steps must be an integer ≥ 0, got {self.steps!r}")

    def __call__(self, clock: Clock) -> float:
        if clock.step < self.steps:
            return (clock.step + 1) / self.steps * self.inner(Clock(0, clock.total_steps))
        total = None if clock.total_steps is None else max(1, clock.total_steps - self.steps)
        return self.inner(Clock(clock.step - self.steps, total))


_LEVEL_FIELDS = ("value", "init", "final", "minimum", "low", "high")


def check_levels(value: float | Schedule, low: float, high: float, what: str) -> float | Schedule:
    """A number, or every level of a schedule (its value, init, final, minimum, low, high), in [low, high]."""
    items = [("value", value)] if not isinstance(value, Schedule) else \
        [(n, getattr(value, n)) for n in _LEVEL_FIELDS if getattr(value, n, None) is not None]
    for name, x in items:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or math.isnan(float(x)) or not low <= x <= high:
            where = what if not isinstance(value, Schedule) else f"{what}: the schedule's {name}"
            raise ValueError(f"{where} must be in [{low:g}, {high:g}], got {x!r}")
    return value


def as_schedule(value: float | Schedule) -> Schedule:
    return value if isinstance(value, Schedule) else Constant(float(value))


# the config's names of the value schedules (``{type: cosine, ...}``)
SCHEDULES: dict[str, type[Schedule]] = {"constant": Constant, "linear": Linear, "exp": Exponential, "power": Power,
                                        "cosine": Cosine, "cubic": Cubic, "cycling": Cyclic}
SCHEDULE_TYPE_ALIASES = {"exponential": "exp", "cyclic": "cycling", "gmp": "cubic"}


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
            check_when(self.start, "update start")
            if self.stop is not None:
                check_when(self.stop, "update stop")
            _same_kind_order(self.start, self.stop, "the update schedule")
        else:
            if isinstance(self.steps, (str, bytes)) or not all(
                    isinstance(s, int) and not isinstance(s, bool) for s in self.steps):
                raise ValueError(f"update steps must be a list of integers ≥ 1, got {self.steps!r}")
            if not self.steps:
                raise ValueError("update steps is an empty list: masks would never change; leave update out "
                                 "for a static mask")
            if any(int(s) < 1 for s in self.steps):
                raise ValueError(f"update steps must be integers ≥ 1, got {list(self.steps)}")
            object.__setattr__(self, "steps", tuple(sorted(set(int(s) for s in self.steps))))

    def is_update(self, clock: Clock) -> bool:
        if self.steps is not None:
            return clock.step in self.steps
        if clock.step <= 0 or clock.step % self.freq:
            return False
        return clock.reached(self.start) and clock.before(self.stop)

    def first_update(self, clock: Clock) -> int | None:
        """The first update step of a run of ``clock.total_steps`` steps (None: none falls in it)."""
        total = clock.total_steps
        if self.steps is not None:
            return next((s for s in self.steps if total is None or s <= total), None)
        first = int(math.ceil(max(1.0, clock.to_steps(self.start)) / self.freq) * self.freq)
        if (total is not None and first > total) or not clock.at(first).before(self.stop):
            return None
        return first


# --- fasterai's schedules over training progress --------------------------------------------------
# A schedule maps the fraction of training done, p ∈ [0, 1], to the fraction of the final sparsity
# in force. Between ``start`` and ``end`` the position is x = (p − start)/(end − start); before
# ``start`` the value is 0, from ``end`` on it is f(1):
#
# | name | f(x) |
# |---|---|
# | one_shot | 1 (from start on) |
# | iterative | ⌈x · n⌉ / n (n steps, default 3) |
# | agp | 1 − (1 − x)³ (Zhu & Gupta's cubic on progress) |
# | lin | x |
# | cos | (1 − cos(π x)) / 2 |
# | one_cycle | (1 + e^(−α+β)) / (1 + e^(−α x + β)), α = 14, β = 6 |
# | dsd | (1 − cos(2π x)) / 2: dense, sparse at x = ½, dense again |
#
# Default starts follow fasterai: one_shot 0.5, iterative and agp 0.2, others 0. fasterai's
# function names (sched_oneshot, ...) are accepted. For example agp with start 0.2 at p = 0.5:
# x = 0.375, 1 − 0.625³ ≈ 0.756.

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
    """``schedule(p)`` = fraction of the final sparsity at training progress ``p``:
    start_val + (end_val − start_val) · f(x), start_val before ``start``.

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
