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

:class:`SupTickets` is the registered algorithm (the masks: base phase, re-explorations);
:class:`SupTicketsTrainer` is the plain-loop driver that also owns the learning rate in the
cyclic phase, saves the tickets and superposes them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from ..core.masks import SparseParam, global_topk_masks, topk_mask
from ..core.schedules import Clock
from .base import SparsityAlgorithm, create, generator_for, register
from .dst import DST, drop_and_grow

__all__ = [
    "SupTickets", "SupTicketsTrainer", "TicketCollector", "CyclePlan", "CheapTicket", "Superposer", "cyclic_lr", "cyclic_plan",
    "superpose", "SUPERPOSITIONS",
]

SUPERPOSITIONS = ("caa", "cima")
PRUNE_SCOPES = ("global", "local")


def cyclic_lr(t: float, lr_1: float, lr_2: float) -> float:
    """The triangular learning rate at t ∈ [0, 1) of a cycle: lr_1 at both ends, lr_2 at t = 0.5."""
    if not 0.0 <= t < 1.0:
        raise ValueError(f"t is the position within a cycle, in [0, 1); got {t}")
    if t < 0.5:
        return lr_1 * (1 - 2 * t) + lr_2 * 2 * t
    return lr_1 * (2 * t - 1) + lr_2 * (2 - 2 * t)


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
        return cyclic_lr((i % self.cycle_steps) / self.cycle_steps, self.lr_1, self.lr_2)

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
        raise ValueError(f"a cycle of {cycle} epochs is longer than the cyclic budget ⌊E · cycle_rate⌋ = "
                         f"⌊{epochs} · {cycle_rate}⌋ = {budget} epochs: shorten the cycle or raise cycle_rate")
    return CyclePlan((epochs - n * cycle) * steps_per_epoch, cycle * steps_per_epoch, n, lr_1, lr_2)


def _check_cycle(cycle: int, cycle_rate: float) -> None:
    if isinstance(cycle, bool) or not isinstance(cycle, int) or cycle < 1:
        raise ValueError(f"cycle must be a whole number of epochs ≥ 1, got {cycle!r}")
    if not 0.0 < float(cycle_rate) < 1.0:
        raise ValueError(f"cycle_rate is the share of training spent in cycles and must be in (0, 1), got {cycle_rate}")


def _check_superposition(method: str, cima_factor: float) -> str:
    key = str(method).lower()
    if key not in SUPERPOSITIONS:
        raise ValueError(f"unknown superposition method {method!r}; valid: {list(SUPERPOSITIONS)}")
    if not 0.0 < float(cima_factor) <= 1.0:
        raise ValueError(f"cima_factor λ must be in (0, 1], got {cima_factor}")
    return key


class Superposer:
    """Running superposition of state dicts: CAA (running mean) or CIMA (λ · new + (1 − λ) · old).
    Floating-point entries are combined; the others (bool masks, BN batch counters) follow the
    latest ticket."""

    def __init__(self, method: str = "caa", cima_factor: float = 0.5):
        self.method = _check_superposition(method, cima_factor)
        self.cima_factor = float(cima_factor)
        self.count = 0
        self.state: dict[str, Tensor] = {}

    @torch.no_grad()
    def add(self, state: dict[str, Tensor]) -> None:
        k = self.count
        for name, value in state.items():
            value = value.detach()
            if k == 0 or not value.is_floating_point():
                self.state[name] = value.clone()
            elif self.method == "caa":
                self.state[name].mul_(1 - 1 / (k + 1)).add_(value, alpha=1 / (k + 1))
            else:
                self.state[name].mul_(1 - self.cima_factor).add_(value, alpha=self.cima_factor)
        self.count += 1


def superpose(states: Sequence[dict[str, Tensor]], method: str = "caa", cima_factor: float = 0.5) -> dict[str, Tensor]:
    """The superposition of ``states`` in order (see :class:`Superposer`)."""
    if not states:
        raise ValueError("nothing to superpose: no ticket was saved")
    sup = Superposer(method, cima_factor)
    for s in states:
        sup.add(s)
    return sup.state


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
        steps_per_epoch: int | None = None,
        base_kwargs: dict[str, Any] | None = None,
        init_method: str = "random",
        include: str | Iterable[str] | None = None,
        exclude: str | Iterable[str] | None = None,
        param_filter: Callable | None = None,
    ):
        super().__init__(sparsity, distribution, init_method, include, exclude, param_filter)
        _check_cycle(cycle, cycle_rate)
        self.superposition = _check_superposition(superposition, cima_factor)
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
        self.steps_per_epoch = steps_per_epoch

    # --- the plan -------------------------------------------------------------------------
    def plan(self, total_steps: int | None) -> CyclePlan:
        if not total_steps:
            raise ValueError("Sup-tickets needs the training length: pass total_steps to the sparsifier")
        spe = self.steps_per_epoch or 1
        return cyclic_plan(int(total_steps) // spe, self.cycle, self.cycle_rate, spe, self.lr_1, self.lr_2)

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

    def initial_masks(self, params, sparsities, seed: int) -> list[Tensor]:
        return self.base.initial_masks(params, sparsities, seed)

    @property
    def keeps_count(self) -> bool:  # type: ignore[override]
        return self.base.keeps_count

    def target_sparsities(self, params: Sequence[SparseParam], clock: Clock) -> list[float] | None:
        plan = self.plan(clock.total_steps)
        return self.base.target_sparsities(params, self._base_clock(clock, plan))

    # --- updates ----------------------------------------------------------------------------
    # Set by a TicketCollector: called with the step count at the end of each cycle, from inside
    # the engine's step (masks already applied), before the next cycle's re-exploration.
    on_cycle_end: Callable[[int], None] | None = None

    def is_update(self, clock: Clock) -> bool:
        plan = self.plan(clock.total_steps)
        if clock.step < plan.pretrain_steps:
            return self.base.is_update(self._base_clock(clock, plan))
        return (self.re_explore and plan.is_cycle_start(clock.step)) or \
            (self.on_cycle_end is not None and plan.is_cycle_end(clock.step))

    @torch.no_grad()
    def update_masks(self, params, optimizer, clock: Clock, seed: int) -> list[Tensor] | None:
        plan = self.plan(clock.total_steps)
        if clock.step < plan.pretrain_steps:
            return self.base.update_masks(params, optimizer, self._base_clock(clock, plan), seed)
        if self.on_cycle_end is not None and plan.is_cycle_end(clock.step):
            self.on_cycle_end(clock.step)
        if not (self.re_explore and plan.is_cycle_start(clock.step)) or self.explore_rate == 0:
            return None
        out = []
        for sp in params:
            n_drop = int(math.floor(self.explore_rate * int(sp.mask.sum())))
            grow = self._grow_score(sp, optimizer, seed, clock.step)
            out.append(drop_and_grow(sp.mask, sp.param.detach().abs(), grow, n_drop, n_drop))
        return out

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


@dataclass
class CheapTicket:
    """One ticket: the step it was saved at, its masks, and (with ``keep_tickets``) its whole state."""

    index: int
    step: int
    masks: dict[str, Tensor]
    state: dict[str, Tensor] | None = field(default=None, repr=False)


def _default_inputs(batch: Any) -> Any:
    return batch[0] if isinstance(batch, (list, tuple)) else batch


class TicketCollector:
    """The cyclic phase of Sup-tickets for any loop driven by a :class:`fastsparse.Sparsifier`
    that holds a :class:`SupTickets` algorithm.

    The loop asks :meth:`set_lr` before each optimizer step (it sets the cyclic learning rate
    in the cyclic phase and returns it; None in the base phase, where the loop's own schedule
    rules); the engine saves a ticket at the end of each cycle (masks applied, before the next
    cycle's re-exploration); after training, :meth:`finish` superposes the tickets, prunes back
    to the target count and re-estimates BN statistics. :meth:`state_dict` carries the
    superposition so far, so a resumed run ends with the same model.
    """

    def __init__(self, model: nn.Module, sparsifier: Any, keep_tickets: bool = False):
        found = [g for g in sparsifier.groups if isinstance(g.algorithm, SupTickets)]
        if len(found) != 1:
            raise ValueError(f"a TicketCollector needs exactly one suptickets algorithm in the engine, "
                             f"found {len(found)}")
        self.group = found[0]
        self.algorithm: SupTickets = self.group.algorithm
        self.model, self.sparsifier, self.keep_tickets = model, sparsifier, keep_tickets
        self.plan = self.algorithm.plan(sparsifier.total_steps)
        self.tickets: list[CheapTicket] = []
        self.superposer = Superposer(self.algorithm.superposition, self.algorithm.cima_factor)
        self.algorithm.on_cycle_end = self._save_ticket

    def lr(self, step: int) -> float | None:
        """The cyclic learning rate of the step after ``step`` steps; None in the base phase."""
        return self.plan.lr(step)

    def set_lr(self, optimizer: torch.optim.Optimizer, step: int) -> float | None:
        lr = self.plan.lr(step)
        if lr is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr
        return lr

    @torch.no_grad()
    def _save_ticket(self, step: int) -> None:
        state = self.model.state_dict()
        self.superposer.add(state)
        masks = {sp.name: sp.mask.clone() for sp in self.group.params}
        kept = {k: v.detach().clone() for k, v in state.items()} if self.keep_tickets else None
        self.tickets.append(CheapTicket(len(self.tickets), step, masks, kept))

    @torch.no_grad()
    def finish(self, bn_inputs: Iterable | None = None) -> None:
        """Load the superposed state, prune it back to the target count (global magnitude, or
        per layer with ``prune_scope="local"``), and re-estimate BN statistics over
        ``bn_inputs`` (model inputs; required when the model has BatchNorm)."""
        if not self.tickets:
            raise ValueError("no ticket was saved: train through the cyclic phase first")
        current = self.model.state_dict()
        for name, value in self.superposer.state.items():
            if value.is_floating_point():
                current[name].copy_(value)
        params = self.group.params
        counts = [int(self.tickets[-1].masks[sp.name].sum()) for sp in params]
        scores = [sp.param.detach().abs() for sp in params]
        if self.algorithm.prune_scope == "global":
            masks = global_topk_masks(scores, sum(counts))
        else:
            masks = [topk_mask(s, c) for s, c in zip(scores, counts)]
        for sp, m in zip(params, masks):
            self.sparsifier._set_mask(sp, m.to(sp.mask.device))
        self.sparsifier.apply_masks()
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model.modules()):
            if bn_inputs is None:
                raise ValueError("the model has BatchNorm: pass the training inputs to re-estimate its statistics")
            torch.optim.swa_utils.update_bn(bn_inputs, self.model)

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.superposer.count, "state": dict(self.superposer.state),
                "tickets": [(t.index, t.step, t.masks) for t in self.tickets]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.superposer.count = int(state["count"])
        self.superposer.state = {k: v.clone() for k, v in state["state"].items()}
        self.tickets = [CheapTicket(i, step, masks) for i, step, masks in state["tickets"]]


class SupTicketsTrainer:
    """Plain-loop driver: trains ``epochs`` epochs with a :class:`SupTickets` algorithm.

    Each iteration: ``optimizer.zero_grad(); loss_fn(model, batch).backward(); optimizer.step()``,
    then the engine (masks re-applied; the base's updates or a re-exploration when due). In the
    base phase ``scheduler.step()`` follows every iteration (if given); in the cyclic phase the
    driver sets the learning rate of every param group to the cyclic value. A ticket is saved at
    the end of each cycle (before the next cycle's re-exploration); after the last one the
    tickets are superposed, pruned back to the target count and BN statistics re-estimated over
    ``bn_data`` (default ``train_data``; ``inputs(batch)`` picks the model's input, default
    ``batch[0]``). The same steps run in ``fastsparse train`` for ``algorithm: suptickets``
    (both use a :class:`TicketCollector`).

    ``train_data`` is iterated once per epoch and must have a length (steps per epoch).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        algorithm: SupTickets,
        train_data: Iterable,
        loss_fn: Callable[[nn.Module, Any], Tensor],
        epochs: int,
        *,
        scheduler: Any = None,
        bn_data: Iterable | None = None,
        inputs: Callable[[Any], Any] = _default_inputs,
        seed: int = 0,
        keep_tickets: bool = False,
    ):
        from ..engine.sparsifier import Sparsifier

        if not isinstance(algorithm, SupTickets):
            raise TypeError(f"algorithm must be a SupTickets instance, got {algorithm!r}")
        spe = len(train_data)  # type: ignore[arg-type]
        if spe < 1:
            raise ValueError("train_data is empty")
        if algorithm.steps_per_epoch is not None and algorithm.steps_per_epoch != spe:
            raise ValueError(f"the algorithm counts {algorithm.steps_per_epoch} steps per epoch, "
                             f"train_data has {spe} batches")
        cyclic_plan(epochs, algorithm.cycle, algorithm.cycle_rate)   # checks the cycle against the budget first
        algorithm.steps_per_epoch = spe
        self.model, self.optimizer, self.algorithm = model, optimizer, algorithm
        self.train_data, self.loss_fn, self.epochs = train_data, loss_fn, int(epochs)
        self.scheduler, self.bn_data, self.inputs = scheduler, bn_data, inputs
        self.sparsifier = Sparsifier(model, optimizer, algorithm, total_steps=epochs * spe, seed=seed, hook=False)
        self.collector = TicketCollector(model, self.sparsifier, keep_tickets)
        self.plan = self.collector.plan
        self.lrs: list[float] = []

    @property
    def tickets(self) -> list[CheapTicket]:
        return self.collector.tickets

    @property
    def _superposer(self) -> Superposer:
        return self.collector.superposer

    def fit(self) -> nn.Module:
        model, opt, engine = self.model, self.optimizer, self.sparsifier
        step = engine.step_count
        model.train()
        for _ in range(self.epochs):
            for batch in self.train_data:
                lr = self.collector.set_lr(opt, step)
                self.lrs.append(float(opt.param_groups[0]["lr"]))
                opt.zero_grad()
                self.loss_fn(model, batch).backward()
                opt.step()
                step += 1
                if lr is None and self.scheduler is not None:
                    self.scheduler.step()
                engine.step()   # saves a ticket at a cycle end, then re-explores for the next cycle
        self.superpose()
        return model

    def superpose(self) -> None:
        """Load the superposed state, prune it back to the target count, re-estimate BN."""
        data = self.bn_data if self.bn_data is not None else self.train_data
        self.collector.finish(self.inputs(b) for b in data)
