"""Dynamic sparse training: prune and regrow at a fixed number of active weights.

Every update, per layer: n_active = mask.sum(); k = floor(f(t) · n_active); drop the k
active weights with the lowest keep score; grow k weights with the highest grow score
among the positions not kept (a weight dropped this update may grow straight back, and
then keeps its value and optimizer state). SET, SNFS and RigL differ only in the grow
score (random, momentum, gradient) and SNFS in moving growth between layers.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..masks import SparseParam, topk_mask
from ..schedules import Clock, Cosine, Schedule, UpdateSchedule, as_schedule
from ..scores import accepts_generator, resolve_score
from .base import SparsityAlgorithm, generator_for, register

__all__ = ["drop_and_grow", "redistribute", "DST", "SET", "SNFS", "RigL", "REDISTRIBUTIONS"]

REDISTRIBUTIONS = ("none", "momentum")


def drop_and_grow(mask: Tensor, keep_score: Tensor, grow_score: Tensor, n_drop: int, n_grow: int) -> Tensor:
    """The new mask: keep the n_active − n_drop active weights with the largest keep score,
    then add the n_grow positions with the largest grow score among those not kept."""
    n_active = int(mask.sum())
    minus_inf = torch.tensor(float("-inf"), device=mask.device)
    kept = topk_mask(torch.where(mask, keep_score.to(torch.float32), minus_inf), n_active - n_drop)
    grown = topk_mask(torch.where(kept, minus_inf, grow_score.to(torch.float32)), n_grow)
    return kept | grown


def redistribute(layer_scores: Sequence[float], removed: Sequence[int], free: Sequence[int],
                 cap_fraction: float = 0.99) -> list[int]:
    """SNFS momentum redistribution: how many weights each layer regrows.

    Layer l gets the share p_l = s_l / Σ s_k of all R = Σ removed (s_l its mean |momentum|
    over active weights), at most ``cap_fraction`` of its free slots; what a full layer cannot
    take goes to the others. Floors plus largest remainders make the total exactly R.
    """
    total = int(sum(removed))
    n = len(removed)
    if total == 0:
        return [0] * n
    s = [max(0.0, float(x)) if math.isfinite(float(x)) else 0.0 for x in layer_scores]
    ssum = sum(s)
    p = [x / ssum for x in s] if ssum > 0 else [r / total for r in removed]
    cap = [int(math.floor(cap_fraction * f)) for f in free]
    if sum(cap) < total:
        cap = [int(f) for f in free]
    if sum(cap) < total:
        raise ValueError(f"cannot regrow {total} weights into {sum(cap)} free slots")
    grow = [0] * n
    left = total
    while left > 0:
        open_ = [i for i in range(n) if grow[i] < cap[i]]
        wsum = sum(p[i] for i in open_)
        shares = {i: (p[i] / wsum if wsum > 0 else 1 / len(open_)) * left for i in open_}
        add = {i: min(cap[i] - grow[i], int(math.floor(shares[i]))) for i in open_}
        if sum(add.values()) == 0:
            # fewer weights left than open layers: one each, largest remaining share first
            for i in sorted(open_, key=lambda i: (-shares[i], i))[:left]:
                add[i] = 1
        for i, a in add.items():
            grow[i] += a
            left -= a
    return grow


class DST(SparsityAlgorithm):
    """Prune and regrow with any keep and grow score.

    drop_fraction: a float α (cosine-decayed from α to 0 at ``update.stop``, RigL's
      f(t) = α/2 · (1 + cos(π t / T_end))) or any schedule.
    update: when masks change (default every 100 steps until 75% of training).
    keep_score / grow_score: a name (``magnitude``, ``random``, ``gradient``, ``momentum``) or
      a function ``f(param, opt) -> tensor``.
    redistribution: ``"none"`` (each layer regrows what it dropped) or ``"momentum"`` (SNFS).
    """

    name = "dst"
    default_grow = "gradient"
    default_redistribution = "none"

    def __init__(
        self,
        sparsity: float = 0.9,
        distribution: str | Callable = "uniform",
        drop_fraction: float | Schedule = 0.3,
        update: UpdateSchedule | None = None,
        keep_score: str | Callable = "magnitude",
        grow_score: str | Callable | None = None,
        redistribution: str | None = None,
        **kwargs,
    ):
        update = update if update is not None else UpdateSchedule(freq=100, stop=0.75)
        super().__init__(sparsity, distribution, update=update, **kwargs)
        if isinstance(drop_fraction, Schedule):
            self.drop_fraction = drop_fraction
        else:
            alpha = float(drop_fraction)
            if not 0.0 <= alpha <= 1.0:
                raise ValueError(f"drop_fraction must be in [0, 1], got {alpha}")
            stop = update.stop if update.stop is not None else 1.0
            self.drop_fraction = Cosine(alpha, half_period=stop)
        self.keep_score = resolve_score(keep_score, "keep score")
        self.grow_score = resolve_score(grow_score or self.default_grow, "grow score")
        self.redistribution = (redistribution or self.default_redistribution).lower()
        if self.redistribution not in REDISTRIBUTIONS:
            raise ValueError(f"unknown redistribution {redistribution!r}; valid: {list(REDISTRIBUTIONS)}")

    def _score(self, fn, sp: SparseParam, optimizer, seed: int, step: int, what: str) -> Tensor:
        kwargs = {"generator": generator_for(seed, step, sp.name)} if accepts_generator(fn) else {}
        score = fn(sp.param, optimizer, **kwargs)
        if not isinstance(score, Tensor) or tuple(score.shape) != tuple(sp.param.shape):
            got = tuple(score.shape) if isinstance(score, Tensor) else type(score).__name__
            raise ValueError(
                f"{what} function {getattr(fn, '__name__', fn)} returned {got} for {sp.name}; "
                f"it must return a tensor of the parameter's shape {tuple(sp.param.shape)}")
        if torch.isnan(score).any():
            raise ValueError(f"{what} function {getattr(fn, '__name__', fn)} returned NaN for {sp.name}")
        return score.detach()

    @torch.no_grad()
    def update_masks(self, params, optimizer, clock: Clock, seed: int) -> list[Tensor] | None:
        f = float(self.drop_fraction(clock))
        if f <= 0:
            return None
        masks = [sp.mask for sp in params]
        active = [int(m.sum()) for m in masks]
        n_drop = [int(math.floor(f * a)) for a in active]
        keep = [self._score(self.keep_score, sp, optimizer, seed, clock.step, "keep score") for sp in params]
        grow = [self._score(self.grow_score, sp, optimizer, seed, clock.step, "grow score") for sp in params]
        n_grow = list(n_drop)
        if self.redistribution == "momentum":
            layer_scores = [float(g[m].mean()) if a else 0.0 for g, m, a in zip(grow, masks, active)]
            free = [m.numel() - (a - d) for m, a, d in zip(masks, active, n_drop)]
            n_grow = redistribute(layer_scores, n_drop, free)
        return [drop_and_grow(m, k, g, d, n) for m, k, g, d, n in zip(masks, keep, grow, n_drop, n_grow)]

    @property
    def keeps_count(self) -> bool:  # type: ignore[override]
        return self.redistribution == "none"


@register
class SET(DST):
    """SET (Mocanu et al. 2018): drop the smallest |w|, grow at random."""

    name = "set"
    default_grow = "random"


@register
class RigL(DST):
    """RigL (Evci et al. 2020): drop the smallest |w|, grow the largest |gradient|."""

    name = "rigl"
    default_grow = "gradient"


@register
class SNFS(DST):
    """SNFS (Dettmers & Zettlemoyer 2019): grow the largest |momentum|, with momentum
    redistribution of growth across layers."""

    name = "snfs"
    default_grow = "momentum"
    default_redistribution = "momentum"


register(DST)
