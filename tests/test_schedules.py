"""schedules.py: values worked out by hand at chosen points; update schedules in steps and fractions."""
from __future__ import annotations

import dataclasses

import pytest

from fastsparse.core.schedules import (
    Clock, Constant, Cosine, Cubic, Cyclic, Exponential, Linear, Power, UpdateSchedule, as_schedule,
)


def _updates(schedule, steps, total=None, progress=False):
    out = []
    for t in steps:
        clock = Clock(t, progress=t / total) if progress else Clock(t, total)
        if schedule.is_update(clock):
            out.append(t)
    return out


# --- Cosine ---------------------------------------------------------------------------------

def test_cosine_in_steps():
    c = Cosine(0.3, half_period=100)
    assert c(Clock(0)) == pytest.approx(0.3, abs=1e-15)
    assert c(Clock(25)) == pytest.approx(0.256066017178, abs=1e-12)  # 0.15 * (1 + 0.707106781187)
    assert c(Clock(50)) == pytest.approx(0.15, abs=1e-15)            # 0.15 * (1 + cos(pi/2))
    assert c(Clock(100)) == pytest.approx(0.0, abs=1e-15)            # 0.15 * (1 + cos(pi))
    assert c(Clock(250)) == pytest.approx(0.0, abs=1e-15)            # stays at the minimum


def test_cosine_with_minimum():
    c = Cosine(0.5, half_period=100, minimum=0.005)
    assert c(Clock(0)) == pytest.approx(0.5, abs=1e-15)
    assert c(Clock(50)) == pytest.approx(0.2525, abs=1e-15)   # 0.005 + 0.495 / 2
    assert c(Clock(100)) == pytest.approx(0.005, abs=1e-15)
    assert c(Clock(1000)) == pytest.approx(0.005, abs=1e-15)


def test_cosine_half_period_as_fraction():
    c = Cosine(0.3, half_period=0.75)
    assert c(Clock(7, progress=0.375)) == pytest.approx(0.15, abs=1e-15)    # halfway to 0.75
    assert c(Clock(10, total_steps=40)) == pytest.approx(0.225, abs=1e-12)  # 0.25/0.75: 0.15 * (1 + 0.5)
    assert c(Clock(30, total_steps=40)) == pytest.approx(0.0, abs=1e-15)
    assert c(Clock(0, progress=0.0)) == pytest.approx(0.3, abs=1e-15)
    with pytest.raises(ValueError, match="total"):
        c(Clock(5))


# --- Cubic (GMP) --------------------------------------------------------------------------

def test_cubic_in_steps():
    c = Cubic(init=0.0, final=0.9, start=10, end=110)
    assert c(Clock(0)) == 0.0                                  # before start: s_i
    assert c(Clock(10)) == 0.0
    assert c(Clock(35)) == pytest.approx(0.5203125, abs=1e-12)  # r = 0.25: 0.9 - 0.9 * 0.75^3 = 0.9 - 0.3796875
    assert c(Clock(60)) == pytest.approx(0.7875, abs=1e-12)     # r = 0.5: 0.9 - 0.9 * 0.125
    assert c(Clock(110)) == pytest.approx(0.9, abs=1e-15)
    assert c(Clock(500)) == pytest.approx(0.9, abs=1e-15)


def test_cubic_with_fractions_and_mixed_points():
    c = Cubic(init=0.5, final=0.9, start=0.0, end=1.0)
    assert c(Clock(3, progress=0.5)) == pytest.approx(0.85, abs=1e-12)   # 0.9 - 0.4 * 0.125
    assert c(Clock(0, progress=0.0)) == pytest.approx(0.5, abs=1e-15)
    # start a step, end a fraction: end = 0.5 * 220 = 110 steps
    mixed = Cubic(init=0.0, final=0.9, start=10, end=0.5)
    assert mixed(Clock(60, total_steps=220)) == pytest.approx(0.7875, abs=1e-12)
    # start a fraction, end a fraction
    frac = Cubic(init=0.0, final=0.8, start=0.2, end=0.6)
    assert frac(Clock(40, total_steps=100)) == pytest.approx(0.7, abs=1e-12)  # r = 0.5: 0.8 - 0.8/8


# --- the other schedules ---------------------------------------------------------------------

def test_linear_exponential_power_constant_cyclic():
    assert Linear(1.0, slope=0.5)(Clock(4)) == 3.0
    assert Linear(0.1, final=0.9, start=0, end=100)(Clock(25)) == pytest.approx(0.3, abs=1e-12)
    assert Linear(0.1, final=0.9, start=0, end=100)(Clock(300)) == pytest.approx(0.9, abs=1e-12)
    assert Linear(0.0, final=1.0, end=0.5)(Clock(1, progress=0.25)) == pytest.approx(0.5, abs=1e-12)
    assert Exponential(1.0, gamma=0.5, final=0.2)(Clock(2)) == pytest.approx(0.4, abs=1e-12)  # 0.2 + 0.8/4
    assert Power(2.0, beta=-1.0)(Clock(3)) == pytest.approx(0.5, abs=1e-12)                    # 2 / 4
    assert Constant(0.3)(Clock(12345)) == 0.3
    cyc = Cyclic(low=0.0, high=1.0, period=10)
    assert [cyc(Clock(t)) for t in (0, 2, 5, 7, 10)] == pytest.approx([0.0, 0.4, 1.0, 0.6, 0.0], abs=1e-12)
    assert as_schedule(0.4) == Constant(0.4)
    assert as_schedule(cyc) is cyc


def test_schedules_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Cosine(0.3).init = 0.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        UpdateSchedule(freq=3).freq = 4


# --- Clock ----------------------------------------------------------------------------------

def test_clock_fraction_sources():
    assert Clock(10, total_steps=40).fraction == 0.25
    assert Clock(10, total_steps=40, progress=0.9).fraction == 0.9  # progress wins
    with pytest.raises(ValueError, match="total"):
        Clock(10).fraction


# --- UpdateSchedule ---------------------------------------------------------------------------

def test_update_schedule_every_freq_steps_never_step_zero():
    assert _updates(UpdateSchedule(freq=10), range(0, 41)) == [10, 20, 30, 40]
    assert _updates(UpdateSchedule(freq=1), range(0, 4)) == [1, 2, 3]


def test_update_schedule_start_stop_in_steps():
    # start inclusive, stop exclusive
    assert _updates(UpdateSchedule(freq=10, start=20, stop=50), range(0, 71)) == [20, 30, 40]
    assert _updates(UpdateSchedule(freq=10, start=15, stop=51), range(0, 71)) == [20, 30, 40, 50]


def test_update_schedule_start_stop_as_fractions():
    sched = UpdateSchedule(freq=10, start=0.2, stop=0.5)
    assert _updates(sched, range(0, 101), total=100) == [20, 30, 40]
    assert _updates(sched, range(0, 101), total=100, progress=True) == [20, 30, 40]
    # stop 1.0 is the end of training, not step 1
    assert _updates(UpdateSchedule(freq=3, stop=1.0), range(0, 10), total=9) == [3, 6]
    # an int 1 is a step
    assert _updates(UpdateSchedule(freq=1, stop=1), range(0, 5)) == []
    assert _updates(UpdateSchedule(freq=1, stop=2), range(0, 5)) == [1]
    with pytest.raises(ValueError, match="total"):
        sched.is_update(Clock(20))


def test_update_schedule_explicit_steps():
    assert _updates(UpdateSchedule(steps=[3, 7]), range(0, 20)) == [3, 7]


@pytest.mark.parametrize("freq", [0, -1, 1.5, True, "3", None])
def test_update_schedule_rejects_bad_frequency(freq):
    with pytest.raises(ValueError, match="frequency"):
        UpdateSchedule(freq=freq)


def test_update_schedule_rejects_step_zero():
    with pytest.raises(ValueError, match="≥ 1"):
        UpdateSchedule(steps=[0, 5])
