"""ITOP, in-time over-parameterisation (Liu et al. 2021): dynamic sparse training that keeps
exploring until the end, measured by the exploration rate.

The exploration rate R_s = |∪_t M_t| / Σ N_l is the fraction of the sparse weights that have
been active at some point of training. The engine tracks it for every method
(:meth:`fastsparse.Sparsifier.exploration_rate`, and ``"exploration_rate"`` in each
``history`` record); this module adds the ITOP recipe: SET or RigL updates every ΔT steps
with no stop step, the drop fraction decayed by a cosine from 0.5 to 0.005 over all of
training::

    alg = fastsparse.create("itop", sparsity=0.98, grow_score="gradient")   # RigL-ITOP
    alg = fastsparse.create("set", sparsity=0.98, **fastsparse.ITOP_presets) # SET-ITOP
"""
from __future__ import annotations

from typing import Callable

from .base import register
from .dst import DST
from ..core.schedules import Cosine, Schedule, UpdateSchedule

__all__ = ["ITOP", "ITOP_presets", "itop_drop_fraction"]


def itop_drop_fraction(init: float = 0.5, minimum: float = 0.005) -> Cosine:
    """f(t) = minimum + (init − minimum)/2 · (1 + cos(π · t / T)), T the whole of training."""
    return Cosine(init, half_period=1.0, minimum=minimum)


# Keyword arguments for ``create("set" | "rigl" | "dst", ...)``: the ITOP schedule on any DST method.
ITOP_presets = {"drop_fraction": itop_drop_fraction(), "update": UpdateSchedule(freq=100, stop=None)}


@register
class ITOP(DST):
    """SET (default, ``grow_score="random"``) or RigL (``grow_score="gradient"``) with ITOP's
    schedule: a mask update every ``freq`` steps until the end of training, drop fraction
    cosine-decayed from ``drop_fraction`` to ``drop_min``."""

    name = "itop"
    default_grow = "random"
    comparison_note = None

    def __init__(
        self,
        sparsity: float = 0.9,
        distribution: str | Callable = "uniform",
        drop_fraction: float | Schedule = 0.5,
        drop_min: float = 0.005,
        freq: int = 100,
        update: UpdateSchedule | None = None,
        **kwargs,
    ):
        if not isinstance(drop_fraction, Schedule):
            if not 0.0 <= float(drop_min) <= float(drop_fraction) <= 1.0:
                raise ValueError(f"ITOP needs 0 ≤ drop_min ≤ drop_fraction ≤ 1, got drop_fraction={drop_fraction} "
                                 f"and drop_min={drop_min}")
            drop_fraction = itop_drop_fraction(float(drop_fraction), float(drop_min))
        update = update if update is not None else UpdateSchedule(freq=freq, stop=None)
        super().__init__(sparsity, distribution, drop_fraction=drop_fraction, update=update, **kwargs)
