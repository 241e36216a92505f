"""Sup-tickets (Yin et al. 2022): superpose many cheap tickets into one sparse network.

The budget of E epochs is split: the first E − n·C epochs train with a normal DST or GraNet
algorithm (the *base*), the last n·C epochs are n cycles of C epochs (n = ⌊⌊E · cycle_rate⌋ / C⌋).
Within a cycle, at t ∈ [0, 1) (iterations done in the cycle / iterations per cycle) the
learning rate is the triangle

    lr(t) = lr_1 · (1 − 2t) + lr_2 · 2t          for t < 0.5
    lr(t) = lr_1 · (2t − 1) + lr_2 · (2 − 2t)    for t ≥ 0.5

At the start of each cycle one large prune-and-regrow (``re_explore``, drop rate 0.5: the
smallest |w| out, the base's grow score in) gives every ticket its own mask; masks are fixed
otherwise. The state at the end of each cycle is a ticket. The tickets are superposed over
the whole state (BN buffers included) by CAA, the running mean
θ ← (1 − 1/(k+1)) · θ + θ_k / (k+1), or CIMA, θ ← λ · θ_k + (1 − λ) · θ; the union of the
tickets' masks is denser than the target, so the result is pruned back to the target count by
global magnitude, and BN statistics are re-estimated over the training data.

:class:`SupTickets` is the registered algorithm (the masks: base phase, re-explorations); its
recipe (:class:`fastsparse.recipes.suptickets.SupTicketsRecipe`) owns the learning rate in the
cyclic phase, saves the tickets and superposes them, in every entry point that drives the engine.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from ..core.masks import SparseParam
from ..core.errors import ParameterError
from ..core.schedules import Clock, Cyclic
from .base import SparsityAlgorithm, create, generator_for, register
from .dst import DST, drop_and_grow

__all__ = ["SupTickets", "CyclePlan", "cyclic_plan", "SUPERPOSITIONS", "check_superposition"]

SUPERPOSITIONS = ("caa", "cima")
PRUNE_SCOPES = ("global", "local")


@dataclass(frozen=True)
class CyclePlan:
    """Where the cycles lie, in optimizer steps: ``pretrain_steps`` of the base algorithm, then
    ``n_cycles`` cycles of ``cycle_steps`` each."""

    pretrain_steps: int
    cycle_steps: int
    n_cycles: int
    lr_1: float
    lr_2: float

    @property
    def total_steps(self) -> int:
        return self.pretrain_steps + self.n_cycles * self.cycle_steps

    def lr(self, step: int) -> float | None:
        """Learning rate of the step that follows ``step`` steps done; None in the base phase."""
        i = step - self.pretrain_steps
        if i < 0 or step >= self.total_steps:
            return None
        return Cyclic(self.lr_1, self.lr_2, self.cycle_steps)(Clock(i))

    def is_cycle_start(self, step: int) -> bool:
        i = step - self.pretrain_steps
        return 0 <= i < self.n_cycles * self.cycle_steps and i % self.cycle_steps == 0

    def is_cycle_end(self, step: int) -> bool:
        i = step - self.pretrain_steps
        return 0 < i <= self.n_cycles * self.cycle_steps and i % self.cycle_steps == 0


def cyclic_plan(epochs: int, cycle: int, cycle_rate: float, steps_per_epoch: int = 1,
                lr_1: float = 0.001, lr_2: float = 0.005) -> CyclePlan:
    """Split ``epochs``: the last n·C epochs are cycles, n = ⌊⌊E · cycle_rate⌋ / C⌋ ≥ 1."""
    _check_cycle(cycle, cycle_rate)
    budget = int(math.floor(epochs * cycle_rate))
    n = budget // cycle
    if n < 1:
        raise ParameterError("cycle", f"a cycle of {cycle} epochs is longer than the cyclic budget ⌊E · cycle_rate⌋ = "
                         f"⌊{epochs} · {cycle_rate}⌋ = {budget} epochs: shorten the cycle or raise cycle_rate")
    return CyclePlan((epochs - n * cycle) * steps_per_epoch, cycle * steps_per_epoch, n, lr_1, lr_2)


def _check_cycle(cycle: int, cycle_rate: float) -> None:
    if isinstance(cycle, bool) or not isinstance(cycle, int) or cycle < 1:
        raise ValueError(f"cycle must be a whole number of epochs ≥ 1, got {cycle!r}")
    if not 0.0 < float(cycle_rate) < 1.0:
        raise ValueError(f"cycle_rate is the share of training spent in cycles and must be in (0, 1), got {cycle_rate}")


def check_superposition(method: str, cima_factor: float) -> str:
    key = str(method).lower()
    if key not in SUPERPOSITIONS:
        raise ValueError(f"unknown superposition method {method!r}; valid: {list(SUPERPOSITIONS)}")
    if not 0.0 < float(cima_factor) <= 1.0:
        raise ValueError(f"cima_factor λ must be in (0, 1], got {cima_factor}")
    return key


@register
class SupTickets(SparsityAlgorithm):
    """The masks of Sup-tickets: the base algorithm, then a re-exploration at each cycle start.

    base: a registered name (``"rigl"``, ``"set"``, ``"granet"``, any DST method) or an
      algorithm instance; ``base_kwargs`` go to its constructor with ``sparsity``,
      ``distribution`` and the filters. The base sees the pre-cyclic phase as its whole
      training (its fractions of training are fractions of that phase); it makes no update in
      the cyclic phase.
    cycle: epochs per cycle; cycle_rate: the share of training in cycles, in (0, 1);
    steps_per_epoch: optimizer steps per epoch (the driver sets it from the data; left None,
      an epoch is one step).
    lr_1, lr_2: the cyclic learning rate (lr_1 at both ends of a cycle, where tickets are
      saved; lr_2 in the middle).
    re_explore, explore_rate: the prune-and-regrow at each cycle start and its drop rate.
    superposition: ``"caa"`` or ``"cima"`` (with ``cima_factor`` λ); prune_scope: how the
      superposed network is pruned back, ``"global"`` magnitude (the paper) or ``"local"``
      (each layer keeps its count).
    """

    name = "suptickets"
    recipe = "fastsparse.recipes.suptickets:SupTicketsRecipe"

    def __init__(
        self,
        sparsity: float = 0.9,
        distribution: str | Callable = "uniform",
        base: str | SparsityAlgorithm = "rigl",
        cycle: int = 2,
        cycle_rate: float = 0.1,
        lr_1: float = 0.001,
        lr_2: float = 0.005,
        re_explore: bool = True,
        explore_rate: float = 0.5,
        superposition: str = "caa",
        cima_factor: float = 0.5,
        prune_scope: str = "global",
        include_base: bool = True,
        steps_per_epoch: int | None = None,
        base_kwargs: dict[str, Any] | None = None,
        init_method: str = "random",
        include: str | Iterable[str] | None = None,
        exclude: str | Iterable[str] | None = None,
        param_filter: Callable | None = None,
    ):
        super().__init__(sparsity, distribution, init_method, include, exclude, param_filter)
        _check_cycle(cycle, cycle_rate)
        self.superposition = check_superposition(superposition, cima_factor)
        if not 0.0 <= float(explore_rate) <= 1.0:
            raise ValueError(f"explore_rate must be in [0, 1], got {explore_rate}")
        if prune_scope not in PRUNE_SCOPES:
            raise ValueError(f"unknown prune_scope {prune_scope!r}; valid: {list(PRUNE_SCOPES)}")
        if min(float(lr_1), float(lr_2)) < 0:
            raise ValueError(f"the cyclic learning rates must be ≥ 0, got lr_1={lr_1}, lr_2={lr_2}")
        if steps_per_epoch is not None and (isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int)
                                            or steps_per_epoch < 1):
            raise ValueError(f"steps_per_epoch must be an integer ≥ 1, got {steps_per_epoch!r}")
        if isinstance(base, str):
            if base.lower() == self.name:
                raise ValueError("the base of Sup-tickets must be a DST or GraNet method, not suptickets")
            kw = {"distribution": distribution, "init_method": init_method, "include": include,
                  "exclude": exclude, "param_filter": param_filter, **(base_kwargs or {})}
            base = create(base, sparsity=sparsity, **kw)
        elif not isinstance(base, SparsityAlgorithm) or isinstance(base, SupTickets):
            raise TypeError(f"base must be a registered name or a SparsityAlgorithm, got {base!r}")
        elif base_kwargs:
            raise ValueError("base_kwargs only apply when base is given by name")
        self.base = base
        self.sparsity = base.sparsity
        self.cycle, self.cycle_rate = cycle, float(cycle_rate)
        self.lr_1, self.lr_2 = float(lr_1), float(lr_2)
        self.re_explore, self.explore_rate = bool(re_explore), float(explore_rate)
        self.cima_factor, self.prune_scope = float(cima_factor), prune_scope
        if not isinstance(include_base, bool):
            raise ValueError(f"include_base must be true or false, got {include_base!r}")
        self.include_base = include_base
        self.steps_per_epoch = steps_per_epoch

    # --- the plan -------------------------------------------------------------------------
    def plan(self, total_steps: int | None, steps_per_epoch: int | None = None) -> CyclePlan:
        """The cycles of a run of ``total_steps`` steps of ``steps_per_epoch`` (this algorithm's own
        ``steps_per_epoch`` when given)."""
        if not total_steps:
            raise ValueError("Sup-tickets plans its cycles over the training length: pass total_steps to the "
                             "sparsifier")
        spe = self.steps_per_epoch or steps_per_epoch
        if not spe:
            raise ValueError("Sup-tickets counts its cycles in epochs: pass steps_per_epoch to the sparsifier "
                             "(or to SupTickets)")
        return cyclic_plan(int(total_steps) // spe, self.cycle, self.cycle_rate, spe, self.lr_1, self.lr_2)

    def _plan(self, clock: Clock) -> CyclePlan:
        return self.plan(clock.total_steps, clock.epoch_steps)

    @staticmethod
    def _base_clock(clock: Clock, plan: CyclePlan) -> Clock:
        return Clock(min(clock.step, plan.pretrain_steps), plan.pretrain_steps)

    # --- delegated to the base --------------------------------------------------------------
    @property
    def selects_explicitly(self) -> bool:  # type: ignore[override]
        return self.base.selects_explicitly

    def select(self, model: nn.Module) -> list[SparseParam]:
        return self.base.select(model)

    def initial_sparsities(self, params: Sequence[SparseParam]) -> list[float]:
        return self.base.initial_sparsities(params)

    def initial_masks(self, params, sparsities, setup) -> list[Tensor]:
        return self.base.initial_masks(params, sparsities, setup)

    @property
    def needs(self) -> frozenset:  # type: ignore[override]
        return getattr(self.base, "needs", frozenset())

    @property
    def keeps_count(self) -> bool:  # type: ignore[override]
        return self.base.keeps_count

    def target_sparsities(self, params: Sequence[SparseParam], clock: Clock) -> list[float] | None:
        return self.base.target_sparsities(params, self._base_clock(clock, self._plan(clock)))

    # --- updates ----------------------------------------------------------------------------
    def is_update(self, clock: Clock) -> bool:
        plan = self._plan(clock)
        if clock.step < plan.pretrain_steps:
            return self.base.is_update(self._base_clock(clock, plan))
        return self.re_explore and self.explore_rate > 0 and plan.is_cycle_start(clock.step)

    @torch.no_grad()
    def update_masks(self, params, optimizer, clock: Clock, seed: int) -> list[Tensor] | None:
        plan = self._plan(clock)
        if clock.step < plan.pretrain_steps:
            return self.base.update_masks(params, optimizer, self._base_clock(clock, plan), seed)
        out = []
        for sp in params:
            n_drop = int(math.floor(self.explore_rate * int(sp.mask.sum())))
            grow = self._grow_score(sp, optimizer, seed, clock.step)
            out.append(drop_and_grow(sp.mask, sp.param.detach().abs(), grow, n_drop, n_drop))
        return out

    def commit(self, params, clock: Clock) -> None:
        plan = self._plan(clock) if clock.total_steps else None
        if plan is None or clock.step < plan.pretrain_steps:
            self.base.commit(params, self._base_clock(clock, plan) if plan is not None else clock)

    def compact_reason(self) -> str | None:
        return self.base.compact_reason()

    def _grow_score(self, sp: SparseParam, optimizer, seed: int, step: int) -> Tensor:
        if isinstance(self.base, DST):
            return self.base._score(self.base.grow_score, sp, optimizer, seed, step, "grow score")
        if sp.param.grad is None:   # GraNet and other gradient-regrowing bases
            return torch.rand(sp.param.shape, generator=generator_for(seed, step, sp.name)).to(sp.param.device)
        return sp.param.grad.detach().abs()

    def state_dict(self) -> dict[str, Any]:
        return {"base": self.base.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base.load_state_dict(state.get("base", {}))

    def __repr__(self) -> str:
        return (f"SupTickets(base={self.base!r}, cycle={self.cycle}, cycle_rate={self.cycle_rate}, "
                f"lr_1={self.lr_1}, lr_2={self.lr_2}, superposition={self.superposition!r})")


