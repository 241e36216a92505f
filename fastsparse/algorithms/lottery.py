"""Lottery tickets: iterative magnitude pruning with rewinding (Frankle & Carbin; open_lth).

Level 0 trains the network (dense, or with the masks it already carries). Level L prunes a
fraction p (default 0.2) of the weights that survive, by |w| over all layers (``global``,
the default) or per layer, rewinds every surviving weight, bias and BN buffer to its value
at step k of level 0 (k = 0 is the original LTH, k > 0 late rewinding), then trains again
from step k with a fresh optimizer state and the learning rates of level 0 from step k on.
After L levels each layer (local) or the model (global) keeps round((1 − p)^L · N) weights,
never fewer than the target sparsity allows, and every level's mask lies inside the previous
one. The levels needed to reach the target: L = ⌈log(1 − s) / log(1 − p)⌉.

Within one training run of T steps (an engine, a config, a callback) the levels share the
budget: level 0 trains T_0 steps and every later level T_0 − k, so T = T_0 + L · (T_0 − k) and
T_0 = ⌈(T + L · k) / (L + 1)⌉ (the last level takes what is left). The level boundaries are
the mask updates; the rewinding, the fresh optimizer state and the learning rates are the
recipe's (:class:`fastsparse.recipes.lottery.IMPRecipe`). :func:`fastsparse.find_ticket` runs
the same method as separate trainings, one per level.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor

from ..core.distributions import resolve_sparsities
from ..core.masks import SparseParam
from ..core.schedules import Clock
from ..core.structured import check_scope, resolve_dims, select_masks
from .base import SparsityAlgorithm, register

__all__ = ["IMP", "LevelPlan", "level_plan", "check_prune_fraction", "check_rewind_step"]


def check_prune_fraction(p: float) -> float:
    try:
        p = float(p)
    except (TypeError, ValueError):
        raise TypeError(f"prune_fraction must be a number in (0, 1), got {p!r}") from None
    if not 0.0 < p < 1.0:
        raise ValueError(f"prune_fraction is the fraction of the remaining weights pruned per level and must be "
                         f"in (0, 1), got {p}")
    return p


def check_rewind_step(k: int | float) -> int | float:
    """A step of level 0 (an integer ≥ 0) or a fraction of level 0 (a float in [0, 1))."""
    if isinstance(k, bool) or not isinstance(k, (int, float)) or k < 0 or (isinstance(k, float) and k >= 1):
        raise ValueError(f"rewind_step must be a step of level 0 (an integer ≥ 0) or a fraction of level 0 in "
                         f"[0, 1), got {k!r}")
    return k


@dataclass(frozen=True)
class LevelPlan:
    """Where the levels of one run lie: ``level0`` steps of level 0, rewinding to ``rewind`` steps,
    and ``boundaries``, the step after which each level l = 1..L starts (its masks installed)."""

    level0: int
    rewind: int
    boundaries: tuple[int, ...]

    def level_at(self, step: int) -> int:
        """The level in force once ``step`` steps are done."""
        return sum(step >= b for b in self.boundaries)

    def schedule_step(self, step: int) -> int:
        """The step of level 0 whose learning rate the step after ``step`` steps uses (level 0: itself;
        a later level replays level 0 from the rewind step)."""
        level = self.level_at(step)
        return step if level == 0 else self.rewind + step - self.boundaries[level - 1]


def level_plan(total_steps: int, levels: int, rewind: int | float) -> LevelPlan:
    """T_0 = ⌈(T + L · k) / (L + 1)⌉, boundaries T_0 + (l − 1) · (T_0 − k), l = 1..L."""
    T, L = int(total_steps), int(levels)
    if L == 0:
        return LevelPlan(T, 0, ())
    if isinstance(rewind, float):   # a fraction of level 0: solve with k = r · T_0
        level0 = int(math.ceil(T / (L + 1 - L * rewind)))
        k = int(math.floor(rewind * level0))
    else:
        k = int(rewind)
        level0 = int(math.ceil((T + L * k) / (L + 1)))
    boundaries = tuple(level0 + (l - 1) * (level0 - k) for l in range(1, L + 1))
    if level0 <= k or boundaries[-1] >= T:
        raise ValueError(f"IMP needs {L} levels after level 0 to reach its target, rewinding to step {k}: "
                         f"{T} training steps are too few (each level must train past the rewind step); "
                         f"train longer, rewind earlier or raise prune_fraction")
    return LevelPlan(level0, k, boundaries)


@register
class IMP(SparsityAlgorithm):
    """Iterative magnitude pruning by levels towards ``sparsity`` (the target; masks start dense).

    prune_fraction: p, the fraction of the surviving weights pruned per level; scope:
    ``"global"`` (one threshold, the default) or ``"local"`` (per layer, the ``distribution``'s
    targets); granularity: ``weight`` or a structured granularity; rewind_step: k, a step of
    level 0 (an integer) or a fraction of level 0 (a float in [0, 1)).
    :meth:`level_masks` is the pure decision; :func:`fastsparse.find_ticket` uses it level by level.
    """

    name = "imp"
    keeps_count = False
    recipe = "fastsparse.recipes.lottery:IMPRecipe"

    def __init__(self, sparsity: float = 0.9, prune_fraction: float = 0.2, scope: str = "global",
                 granularity: str = "weight", distribution: str | Callable = "uniform",
                 rewind_step: int | float = 0, init_method: str = "random",
                 include: str | Iterable[str] | None = None, exclude: str | Iterable[str] | None = None,
                 param_filter: Callable | None = None):
        # no ``update``: IMP places its levels itself, spread over the training budget
        super().__init__(sparsity, distribution, init_method, include, exclude, param_filter)
        self.prune_fraction = check_prune_fraction(prune_fraction)
        self.scope = check_scope(scope)
        self.granularity = granularity
        self.rewind_step = check_rewind_step(rewind_step)

    @property
    def levels(self) -> int:
        """Levels needed to reach the target: ⌈log(1 − s) / log(1 − p)⌉."""
        if self.sparsity == 0:
            return 0
        return int(math.ceil(math.log(1 - self.sparsity) / math.log(1 - self.prune_fraction) - 1e-9))

    def plan(self, clock: Clock) -> LevelPlan:
        if not clock.total_steps:
            raise ValueError("IMP spreads its levels over the training budget: pass total_steps to the sparsifier "
                             "(or use fastsparse.find_ticket, which trains each level separately)")
        return level_plan(clock.total_steps, self.levels, self.rewind_step)

    def initial_sparsities(self, params: Sequence[SparseParam]) -> list[float]:
        resolve_dims(params, self.granularity)
        return [0.0] * len(params)

    def level_sparsities(self, params: Sequence[SparseParam], level: int) -> list[float]:
        """1 − max((1 − p)^L, 1 − s_l) per layer (global: the model's, repeated)."""
        d = (1.0 - self.prune_fraction) ** int(level)
        if self.scope == "global":
            return [1.0 - max(d, 1.0 - self.sparsity)] * len(params)
        finals = resolve_sparsities(self.distribution, [tuple(p.param.shape) for p in params], self.sparsity)
        return [1.0 - max(d, 1.0 - s) for s in finals]

    @torch.no_grad()
    def level_masks(self, params: Sequence[SparseParam], level: int) -> list[Tensor]:
        """Masks of ``level``: the largest |w| among the weights the current masks keep."""
        masks = [sp.mask for sp in params]
        scores = [sp.param.detach().abs() for sp in params]
        dims = resolve_dims(params, self.granularity)
        sps = self.level_sparsities(params, level)
        if self.scope == "global":  # never grow: a level at or below the current sparsity keeps the masks
            current = 1.0 - sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)
            return select_masks(scores, dims, max(sps[0], current), "global", masks)
        current = [1.0 - float(m.sum()) / m.numel() for m in masks]
        return select_masks(scores, dims, [max(s, c) for s, c in zip(sps, current)], "local", masks)

    def target_sparsities(self, params: Sequence[SparseParam], clock: Clock) -> list[float]:
        level = self.plan(clock).level_at(clock.step) if clock.total_steps else 0
        return self.level_sparsities(params, level)

    def is_update(self, clock: Clock) -> bool:
        return clock.step in self.plan(clock).boundaries

    def update_masks(self, params, optimizer, clock: Clock, seed: int) -> list[Tensor] | None:
        return self.level_masks(params, self.plan(clock).level_at(clock.step))

    def __repr__(self) -> str:
        return (f"IMP(sparsity={self.sparsity}, prune_fraction={self.prune_fraction}, scope={self.scope!r}, "
                f"rewind_step={self.rewind_step})")
