"""fasterai-style sparsification on a progress schedule, with in-fit lottery tickets.

:class:`Sparsify` is the algorithm: at training progress p the target is
schedule(p) · sparsity (per layer: schedule(p) · s_l from the distribution), groups of the
chosen granularity are scored by the criterion (mean over the group) and selected per layer
(``local``) or over all layers (``global``). While the target rises, pruning is nested (only
active groups compete); when it falls (``dsd``), active groups stay and the best-scored
inactive ones return, at 0. With an ``"N:M"`` granularity the schedule moves from M:M to N:M,
keeping M − round(f · (M − N)) of every M.

With ``lth=True`` every pruning event rewinds all weights and buffers to their values at
``rewind_at``: the algorithm decides the masks, its recipe
(:class:`fastsparse.recipes.sparsify.SparsifyRecipe`) snapshots and rewinds.
:class:`fastsparse.SparsifyScheduler` is fasterai's callback for a plain loop, counted in epochs.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ..core.scores import UPDATING, criterion_scores, needs_init, resolve_criterion
from ..core.distributions import resolve_sparsities
from ..core.masks import SparseParam, n_keep
from ..core.schedules import ProgressSchedule, ScheduleLike, as_progress_schedule
from ..core.schedules import Clock
from ..core.structured import (
    check_nm, check_scope, input_dim, nm_keep_for, nm_mask, parse_nm, resolve_dims, select_masks,
)
from .base import Setup, SparsityAlgorithm, generator_for, register

__all__ = ["Sparsify"]


@register
class Sparsify(SparsityAlgorithm):
    """Prune to ``sparsity`` along a progress schedule (fasterai's arguments).

    granularity: ``weight``, a structured granularity (``row``, ``column``, ``filter``,
      ``kernel``, ``channel``) or ``"N:M"`` (then ``sparsity`` must be 1 − N/M).
    context: ``local`` or ``global``. criteria: a name from :mod:`fastsparse.core.scores` or
    ``f(w, w0) -> scores``. schedule: a name from :mod:`fastsparse.core.schedules` (with ``start``,
    ``end`` as fractions of training, ``n_steps`` for ``iterative``), a
    :class:`~fastsparse.core.schedules.ProgressSchedule` or a function of progress.
    round_to: ``local`` only: each layer keeps a multiple of ``round_to`` groups (rounded up,
      at least ``round_to``; fasterai's ``round_to``).
    lth / rewind_at: in-fit lottery tickets: after every pruning event all weights and buffers
      of the model go back to their values at ``rewind_at`` (a step, or a fraction of training;
      0 = initialisation; None = when the driver says, as :class:`SparsifyScheduler` does with
      epochs), then the new masks apply; ``reset_optimizer`` also clears the optimizer's state.
    """

    name = "sparsify"
    keeps_count = False
    recipe = "fastsparse.recipes.sparsify:SparsifyRecipe"

    def __init__(
        self,
        sparsity: float = 0.5,
        granularity: str = "weight",
        context: str = "local",
        criteria: str | Callable = "large_final",
        schedule: ScheduleLike = "agp",
        start: float | None = None,
        end: float | None = None,
        n_steps: int = 3,
        distribution: str | Callable = "uniform",
        round_to: int | None = None,
        lth: bool = False,
        rewind_at: int | float | None = 0,
        reset_optimizer: bool = False,
        **kwargs,
    ):
        if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
            raise ValueError(f"round_to must be an integer ≥ 1 or None, got {round_to!r}")
        if round_to is not None and context != "local":
            raise ValueError(f"round_to rounds each layer's kept groups, so it needs context 'local', got {context!r}")
        if rewind_at is not None and (isinstance(rewind_at, bool) or not isinstance(rewind_at, (int, float))
                                      or rewind_at < 0):
            raise ValueError(f"rewind_at must be a step (integer ≥ 0) or a fraction of training in [0, 1], "
                             f"got {rewind_at!r}")
        super().__init__(sparsity, distribution, **kwargs)
        self.nm = parse_nm(granularity)
        if self.nm is not None and abs(self.sparsity - (1 - self.nm[0] / self.nm[1])) > 1e-9:
            n, m = self.nm
            raise ValueError(f"granularity {granularity!r} means sparsity {1 - n / m}; got sparsity {sparsity}")
        self.granularity = granularity
        self.context = check_scope(context)
        resolve_criterion(criteria)
        self.criteria = criteria
        self.schedule = as_progress_schedule(schedule, start, end, n_steps)
        if lth and isinstance(rewind_at, float) and isinstance(self.schedule, ProgressSchedule) \
                and rewind_at > float(self.schedule.start):
            raise ValueError(f"rewind_at {rewind_at} is after pruning starts ({self.schedule.start} of training): "
                             "rewind to a point before the first pruning event")
        self.round_to, self.lth, self.rewind_at = round_to, bool(lth), rewind_at
        self.reset_optimizer = bool(reset_optimizer)
        self.init_weights: dict[str, Tensor] = {}
        self.applied = 0.0

    # --- set-up -------------------------------------------------------------------------------
    def _check_granularity(self, params: Sequence[SparseParam]) -> None:
        if self.nm is None:
            resolve_dims(params, self.granularity)
            return
        for sp in params:
            d = input_dim(sp.module, tuple(sp.param.shape))
            check_nm(*self.nm, size=sp.param.shape[d], where=f"the input dimension of {sp.name}")

    def initial_sparsities(self, params: Sequence[SparseParam]) -> list[float]:
        self._check_granularity(params)
        return [0.0] * len(params)

    def initial_masks(self, params, sparsities, setup: Setup) -> list[Tensor]:
        return [torch.ones_like(sp.param, dtype=torch.bool) for sp in params]

    @torch.no_grad()
    def save_init_weights(self, params: Sequence[SparseParam]) -> None:
        """Remember the weights the init-based criteria compare against (done at set-up)."""
        self.init_weights = {sp.name: sp.param.detach().clone() for sp in params}

    @torch.no_grad()
    def commit(self, params: Sequence[SparseParam], clock: Clock) -> None:
        """At attach, the weights the init-based criteria compare against; after a pruning event,
        the fraction applied (and, for the ``updating_*`` criteria, the weights as pruned now)."""
        if clock.step == 0 and not self.applied:
            if {sp.name for sp in params} - set(self.init_weights):
                self.save_init_weights(params)
            return
        self.applied = self.fraction(clock)
        if isinstance(self.criteria, str) and self.criteria in UPDATING:
            self.init_weights = {sp.name: sp.param.detach().clone() for sp in params}

    # --- the schedule -------------------------------------------------------------------------
    def fraction(self, clock: Clock) -> float:
        return float(self.schedule(clock.fraction))

    def is_update(self, clock: Clock) -> bool:
        return self.fraction(clock) != self.applied

    def _rounded(self, dims: Sequence[tuple[int, ...]], params: Sequence[SparseParam],
                 sparsities: Sequence[float]) -> list[float]:
        """Per-layer sparsities whose kept group count is a multiple of ``round_to`` (rounded up)."""
        out = []
        for d, sp, s in zip(dims, params, sparsities):
            groups = sp.param.numel() // max(1, math.prod(sp.param.shape[i] for i in d))
            k = n_keep(groups, s)
            k = min(groups, max(self.round_to, self.round_to * math.ceil(k / self.round_to)))
            out.append(1.0 - k / groups)
        return out

    def _layer_sparsities(self, params: Sequence[SparseParam]) -> list[float]:
        return resolve_sparsities(self.distribution, [tuple(p.param.shape) for p in params], self.sparsity)

    def target_sparsities(self, params: Sequence[SparseParam], clock: Clock) -> list[float]:
        f = self.fraction(clock)
        if self.nm is not None:
            return [1 - nm_keep_for(f, *self.nm) / self.nm[1]] * len(params)
        if self.context == "global":
            return [f * self.sparsity] * len(params)
        return [f * s for s in self._layer_sparsities(params)]

    # --- the decision -------------------------------------------------------------------------
    @torch.no_grad()
    def update_masks(self, params, optimizer, clock: Clock, seed: int) -> list[Tensor] | None:
        self._check_granularity(params)
        if needs_init(self.criteria):
            missing = [sp.name for sp in params if sp.name not in self.init_weights]
            if missing:
                raise ValueError(f"criterion {self.criteria!r} compares with the weights saved at set-up, but none "
                                 f"were saved for {missing}: call save_init_weights(params) first")
        f = self.fraction(clock)
        masks = [sp.mask for sp in params]
        scores = [criterion_scores(self.criteria, sp.param, self.init_weights.get(sp.name),
                                   generator_for(seed, clock.step, sp.name), sp.param.grad) for sp in params]
        if self.nm is not None:
            n, m = self.nm
            keep, before = nm_keep_for(f, n, m), nm_keep_for(self.applied, n, m)
            if keep == m:
                new = [torch.ones_like(mk) for mk in masks]
            else:
                new = [nm_mask(s, keep, m, input_dim(sp.module, tuple(sp.param.shape)), mk if keep <= before else None)
                       for s, sp, mk in zip(scores, params, masks)]
        else:
            dims = resolve_dims(params, self.granularity)
            if self.context == "global":
                new = select_masks(scores, dims, f * self.sparsity, "global", masks)
            else:
                layer = [f * s for s in self._layer_sparsities(params)]
                if self.round_to is not None and f > 0:
                    layer = self._rounded(dims, params, layer)
                new = select_masks(scores, dims, layer, "local", masks)
        return new

    def state_dict(self) -> dict[str, Any]:
        return {"applied": self.applied, "init_weights": {k: v.clone() for k, v in self.init_weights.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.applied = float(state.get("applied", 0.0))
        self.init_weights = {k: v.clone() for k, v in state.get("init_weights", {}).items()}

    def __repr__(self) -> str:
        return (f"Sparsify(sparsity={self.sparsity}, granularity={self.granularity!r}, context={self.context!r}, "
                f"criteria={getattr(self.criteria, '__name__', self.criteria)!r}, schedule={self.schedule!r})")
