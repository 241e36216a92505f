"""Gradual pruning: GMP (Zhu & Gupta), GraNet (GMP plus zero-cost regrowth), and the
pruning-based sparse initialisations of GraNet/Sup-tickets (``--sparse-init prune_*``).

GMP: every ΔT steps from t_0 until the first update step at or after t_end,
s_t = s_f + (s_i − s_f) · (1 − (t − t_0)/(t_end − t_0))³ (:class:`fastsparse.core.schedules.Cubic`),
and the masks keep the largest |w| among the weights still active (pruning is nested):
per layer n_keep(N_l, s_l(t)) (``scope="local"``, each layer on its own curve from the
distribution's initial to its final sparsity), or round((1 − s_t) · Σ N_l) over all layers
(``scope="global"``, one threshold, no layer emptied).

GraNet: the same, from an initial sparsity (0.5 by default, random masks), and right
after each pruning step, per layer, drop ceil(r_t · nnz) of the smallest |w| and regrow
as many by |gradient of the last batch|, r_t = 0.005 + (0.5 − 0.005)/2 · (1 + cos(π t / T))
over all of training. Grown weights start at 0 with zeroed optimizer state (the engine).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..core.distributions import check_sparsity, resolve_sparsities
from ..core.masks import SparseParam
from ..core.schedules import Clock, Cosine, Cubic, Schedule, UpdateSchedule, When
from ..core.structured import check_scope, group_active, group_scores, resolve_dims, select_masks
from .base import MaskUpdate, Setup, SparsityAlgorithm, register
from .dst import drop_and_grow

__all__ = ["GMP", "GraNet", "PruneInit", "PruneUniform", "PruneGlobal", "PruneAndGrowUniform",
           "PruneAndGrowGlobal"]


def _check_window(start: When, end: When) -> None:
    for name, v in (("start", start), ("end", end)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise ValueError(f"{name} must be a step (int) or a fraction of training (float in [0, 1]), got {v!r}")
    is_fraction = [isinstance(v, float) and v <= 1.0 for v in (start, end)]
    if is_fraction[0] == is_fraction[1] and float(start) > float(end):
        raise ValueError(f"the pruning schedule starts after it ends (start {start} > end {end})")


@register
class GMP(SparsityAlgorithm):
    """Gradual magnitude pruning from ``initial_sparsity`` to ``sparsity``.

    start / end: where the cubic runs, as steps (int) or fractions of training (float).
    freq: ΔT, steps between pruning steps. scope: ``"global"`` (one threshold; the default,
    as in GraNet's reference code) or ``"local"`` (per layer, with ``distribution``).
    granularity: ``"weight"`` or a structured granularity (see :mod:`fastsparse.core.structured`).
    """

    name = "gmp"
    keeps_count = False

    def __init__(
        self,
        sparsity: float = 0.9,
        initial_sparsity: float = 0.0,
        start: When = 0,
        end: When = 0.75,
        freq: int = 100,
        scope: str = "global",
        granularity: str = "weight",
        distribution: str | Callable = "uniform",
        **kwargs,
    ):
        if kwargs.get("update") is None:
            kwargs["update"] = UpdateSchedule(freq=freq, start=start)
        super().__init__(sparsity, distribution, **kwargs)
        self.initial_sparsity = check_sparsity(initial_sparsity, "initial_sparsity")
        if self.initial_sparsity > self.sparsity:
            raise ValueError(f"initial_sparsity {initial_sparsity} is above the final sparsity {sparsity}: "
                             "gradual pruning only removes weights")
        _check_window(start, end)
        self.start, self.end, self.freq = start, end, self.update.freq or freq
        self.scope = check_scope(scope)
        self.granularity = granularity

    # --- the schedule -------------------------------------------------------------------------
    def initial_sparsities(self, params: Sequence[SparseParam]) -> list[float]:
        resolve_dims(params, self.granularity)  # an unknown granularity fails before anything changes
        return resolve_sparsities(self.distribution, [tuple(p.param.shape) for p in params], self.initial_sparsity)

    def _final_sparsities(self, params: Sequence[SparseParam]) -> list[float]:
        return resolve_sparsities(self.distribution, [tuple(p.param.shape) for p in params], self.sparsity)

    def target_sparsities(self, params: Sequence[SparseParam], clock: Clock) -> list[float]:
        """s(t) per layer (local), or the model's s(t) repeated (global)."""
        if self.scope == "global":
            return [Cubic(self.initial_sparsity, self.sparsity, self.start, self.end)(clock)] * len(params)
        return [Cubic(i, f, self.start, self.end)(clock)
                for i, f in zip(self.initial_sparsities(params), self._final_sparsities(params))]

    def last_update_step(self, clock: Clock) -> int:
        """The first update step at or after ``end``: the one that reaches the final sparsity."""
        return int(math.ceil(clock.to_steps(self.end) / self.freq) * self.freq)

    def is_update(self, clock: Clock) -> bool:
        return super().is_update(clock) and clock.step <= self.last_update_step(clock)

    # --- the decision ---------------------------------------------------------------------------
    @torch.no_grad()
    def prune(self, params: Sequence[SparseParam], clock: Clock) -> list[Tensor]:
        """Masks at the scheduled sparsity, chosen by |w| among the active weights."""
        masks = [sp.mask for sp in params]
        scores = [sp.param.detach().abs() for sp in params]
        dims = resolve_dims(params, self.granularity)
        targets = self.target_sparsities(params, clock)
        if self.scope == "global":
            total = sum(m.numel() for m in masks)
            current = 1.0 - sum(int(m.sum()) for m in masks) / total
            return select_masks(scores, dims, max(targets[0], current), "global", masks)
        current = [1.0 - float(m.sum()) / m.numel() for m in masks]
        return select_masks(scores, dims, [max(t, c) for t, c in zip(targets, current)], "local", masks)

    def update_masks(self, params, optimizer, clock: Clock, seed: int) -> list[Tensor] | None:
        new = self.prune(params, clock)
        if all(int(n.sum()) == int(sp.mask.sum()) for n, sp in zip(new, params)):
            return None
        return new

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(sparsity={self.sparsity}, initial_sparsity={self.initial_sparsity}, "
                f"start={self.start}, end={self.end}, freq={self.freq}, scope={self.scope!r})")


@register
class GraNet(GMP):
    """GraNet (Liu et al. 2021): GMP from ``initial_sparsity`` (random masks) plus, after every
    pruning step, a zero-cost regrowth of ceil(r_t · nnz) weights per layer by |gradient|.

    regrow_fraction: r_t, a float α (cosine from α to ``regrow_min`` over all of training) or
    any schedule (``regrow_fraction = regrow_min`` gives a constant r_t, GraNet's
    ``--decay-schedule constant``).
    keep_regrowing: go on with the regrowth every ``freq`` steps after ``end``, at the final
    density, until training ends (GraNet's reference code does; the paper describes regrowth
    after each pruning step only, the default here).
    """

    name = "granet"

    def __init__(
        self,
        sparsity: float = 0.9,
        initial_sparsity: float = 0.5,
        regrow_fraction: float | Schedule = 0.5,
        regrow_min: float = 0.005,
        keep_regrowing: bool = False,
        **kwargs,
    ):
        if not isinstance(keep_regrowing, bool):
            raise ValueError(f"keep_regrowing must be true or false, got {keep_regrowing!r}")
        super().__init__(sparsity, initial_sparsity, **kwargs)
        self.keep_regrowing = keep_regrowing
        if isinstance(regrow_fraction, Schedule):
            self.regrow_fraction = regrow_fraction
        else:
            if not 0.0 <= float(regrow_fraction) <= 1.0 or not 0.0 <= float(regrow_min) <= float(regrow_fraction):
                raise ValueError(f"regrow_fraction must be in [0, 1] and regrow_min in [0, regrow_fraction], "
                                 f"got {regrow_fraction} and {regrow_min}")
            self.regrow_fraction = Cosine(float(regrow_fraction), half_period=1.0, minimum=float(regrow_min))

    def is_update(self, clock: Clock) -> bool:
        if self.keep_regrowing:
            return SparsityAlgorithm.is_update(self, clock)
        return super().is_update(clock)

    @torch.no_grad()
    def update_masks(self, params, optimizer, clock: Clock, seed: int) -> list[Tensor] | None:
        pruned = self.prune(params, clock)
        r = float(self.regrow_fraction(clock))
        if r <= 0:
            return pruned
        dims = resolve_dims(params, self.granularity)
        out = []
        for sp, mask, d in zip(params, pruned, dims):
            if sp.param.grad is None:
                raise RuntimeError(f"GraNet regrows by gradient, but {sp.name}.grad is None: the engine must "
                                   "update masks after loss.backward() and before zero_grad()")
            active = group_active(mask, d)
            n = int(math.ceil(r * int(active.sum())))
            keep = group_scores(sp.param.detach().abs(), d)
            grow = group_scores(sp.param.grad.detach().abs(), d)
            out.append(drop_and_grow(active, keep, grow, n, n).expand(mask.shape).clone())
        # every weight regrown after this update's pruning starts at 0 with zeroed state, also
        # one that the pruning step had just removed (it is not new to the old mask)
        return MaskUpdate(out, [new & ~p for new, p in zip(out, pruned)])


class PruneInit(SparsityAlgorithm):
    """Pruning-based sparse initialisation (GraNet/Sup-tickets ``--sparse-init``): at set-up,
    remove a fraction ``sparsity`` of the weights that are nonzero now, by |w|, per layer
    (``uniform``, with ``distribution``) or over all layers (``global``); the ``prune_and_grow``
    forms then regrow, per layer, as many as were removed by |gradient| (the reference's
    pruning-stability test: the density is unchanged, the topology is not). Structured forms:
    pass ``granularity`` (``"row"``, ``"filter"``, ...). The masks stay fixed afterwards.
    """

    name = "prune_uniform"
    scope = "local"
    regrow = False
    checks_held_masks = False   # its sparsity is a fraction of the weights nonzero when it attaches

    def __init__(self, sparsity: float = 0.5, granularity: str = "weight",
                 distribution: str | Callable = "uniform", **kwargs):
        super().__init__(sparsity, distribution, **kwargs)
        self.granularity = granularity

    def _layer_fractions(self, params: Sequence[SparseParam]) -> list[float]:
        return resolve_sparsities(self.distribution, [tuple(p.param.shape) for p in params], self.sparsity)

    def initial_sparsities(self, params: Sequence[SparseParam]) -> list[float]:
        resolve_dims(params, self.granularity)
        nnz = [int((sp.param.detach() != 0).sum()) for sp in params]
        numel = [sp.param.numel() for sp in params]
        if self.regrow:
            return [1.0 - z / n for z, n in zip(nnz, numel)]
        if self.scope == "global":
            return [1.0 - (1.0 - self.sparsity) * sum(nnz) / sum(numel)] * len(params)
        return [1.0 - (1.0 - s) * z / n for s, z, n in zip(self._layer_fractions(params), nnz, numel)]

    @torch.no_grad()
    def initial_masks(self, params: Sequence[SparseParam], sparsities: Sequence[float], setup: Setup) -> list[Tensor]:
        if self.regrow:
            missing = [sp.name for sp in params if sp.param.grad is None]
            if missing:
                raise ValueError(f"{self.name} regrows by gradient, but {missing} have no .grad: run "
                                 "loss.backward() on a batch before attaching")
        dims = resolve_dims(params, self.granularity)
        weights = [sp.param.detach() for sp in params]
        nonzero = [w != 0 for w in weights]
        active = [group_active(m, d) for m, d in zip(nonzero, dims)]
        n_groups = [int(a.numel()) for a in active]
        n_active = [int(a.sum()) for a in active]
        scores = [w.abs() for w in weights]
        if self.scope == "global":
            total = sum(w.numel() for w in weights)
            nnz = sum(int(m.sum()) for m in nonzero)
            pruned = select_masks(scores, dims, 1.0 - (1.0 - self.sparsity) * nnz / total, "global", nonzero)
        else:
            fractions = self._layer_fractions(params)
            pruned = select_masks(scores, dims, [1.0 - (1.0 - s) * a / g for s, a, g in
                                                 zip(fractions, n_active, n_groups)], "local", nonzero)
        if not self.regrow:
            return pruned
        grads = [sp.param.grad.detach().abs() for sp in params]
        return select_masks(grads, dims, [1.0 - a / g for a, g in zip(n_active, n_groups)], "local", pruned)


@register
class PruneUniform(PruneInit):
    name = "prune_uniform"


@register
class PruneGlobal(PruneInit):
    name = "prune_global"
    scope = "global"


@register
class PruneAndGrowUniform(PruneInit):
    name = "prune_and_grow_uniform"
    regrow = True
    needs = frozenset({"gradients"})
    comparison_note = "a pruning-stability test: it keeps the density it starts from (dense here)"


@register
class PruneAndGrowGlobal(PruneInit):
    name = "prune_and_grow_global"
    scope = "global"
    regrow = True
    needs = frozenset({"gradients"})
    comparison_note = "a pruning-stability test: it keeps the density it starts from (dense here)"
