"""Lottery tickets around IMP's decisions: rewinding, a fresh optimizer state, the learning
rates of level 0 replayed in every later level; and :func:`find_ticket`, the driver that
trains each level separately (the reference every entry point is checked against).

Inside one run (:class:`IMPRecipe`, any entry point that drives the engine): level 0 trains
T_0 steps, the learning rate of each of its steps (whatever the loop's schedule set) is
recorded; at each level boundary the masks of the next level are installed, every weight
and buffer is rewound to its value after step k of level 0 and the optimizer's state is
cleared; in the level's steps j = 0, 1, ... the learning rate of level 0's step k + j is set
again, so each level retrains from step k exactly as a separate run from a fresh optimizer
and a schedule advanced k steps would. Build the loop's schedule over one level
(``sparsifier.schedule_steps()`` steps; ``fastsparse train`` does) to give every level the
whole schedule.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from ..algorithms.lottery import IMP, check_prune_fraction, check_rewind_step
from ..core.masks import SparseParam, attach_mask, restore_state, snapshot_state, sparse_params
from ..core.schedules import Clock
from ..core.structured import resolve_dims
from ..engine.recipe import Recipe
from ..engine.sparsifier import Sparsifier

__all__ = ["IMPRecipe", "Ticket", "find_ticket"]


class IMPRecipe(Recipe):
    """Rewinding and the per-level learning rates of :class:`~fastsparse.IMP` (see the module)."""

    owns_lr = True
    exclusive = True

    def __init__(self, algorithm: IMP, params, engine):
        super().__init__(algorithm, params, engine)
        self.rewind_state: dict[str, Tensor] | None = None
        self.lrs: list[list[float]] = []   # level 0's learning rates, per step, per parameter group

    def check(self) -> None:
        self.plan = self.algorithm.plan(self.engine.clock())   # raises without total_steps or with too few

    def schedule_steps(self, total_steps: int) -> int:
        return self.plan.level0

    def attached(self) -> None:
        if self.plan.rewind == 0 and self.rewind_state is None:
            self.rewind_state = snapshot_state(self.engine.model)

    def learning_rate(self, step: int) -> list[float] | None:
        if self.plan.level_at(step) == 0:
            if step == len(self.lrs):
                self.lrs.append(self.engine.learning_rates())
            return None
        return self.lrs[min(self.plan.schedule_step(step), len(self.lrs) - 1)]

    def on_step(self, clock: Clock) -> None:
        if self.rewind_state is None and clock.step == self.plan.rewind:
            self.rewind_state = snapshot_state(self.engine.model)

    @torch.no_grad()
    def after_update(self, clock: Clock) -> None:
        restore_state(self.engine.model, self.rewind_state)
        self.engine.reset_optimizer_state()

    def state_dict(self) -> dict[str, Any]:
        rs = self.rewind_state
        return {"rewind_state": None if rs is None else {k: v.clone() for k, v in rs.items()},
                "lrs": [list(x) for x in self.lrs]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        rs = state.get("rewind_state")
        self.rewind_state = None if rs is None else {k: v.clone() for k, v in rs.items()}
        self.lrs = [list(x) for x in state.get("lrs", [])]


@dataclass
class Ticket:
    """What :func:`find_ticket` found: the masks, the weights to rewind to, each level's record."""

    masks: dict[str, Tensor]
    rewind_state: dict[str, Tensor]
    rewind_step: int
    levels: list[dict[str, Any]] = field(default_factory=list)

    @property
    def density(self) -> float:
        total = sum(m.numel() for m in self.masks.values())
        return sum(int(m.sum()) for m in self.masks.values()) / max(1, total)

    def apply(self, model: nn.Module) -> None:
        """Give ``model`` the ticket at its rewind values: the masks attached, the weights rewound."""
        named = dict(model.named_parameters())
        missing = sorted(set(self.masks) - set(named))
        if missing:
            raise ValueError(f"the ticket's masks do not fit the model: it has no parameters {missing}")
        for name, mask in self.masks.items():
            module_name, _, attr = name.rpartition(".")
            attach_mask(SparseParam(name, model.get_submodule(module_name) if module_name else model, attr), mask)
        restore_state(model, self.rewind_state)


def _advance(scheduler, steps: int) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*")
        for _ in range(steps):
            scheduler.step()


def _level0_params(model: nn.Module, algorithm: IMP) -> list[SparseParam]:
    """The parameters IMP prunes, with all-ones masks attached where they have none yet."""
    existing = sparse_params(model)
    params = existing if existing and not algorithm.selects_explicitly else algorithm.select(model)
    resolve_dims(params, algorithm.granularity)   # an unknown granularity fails before anything changes
    have = {sp.name for sp in existing}
    for sp in params:
        if sp.name not in have:
            attach_mask(sp, torch.ones_like(sp.param, dtype=torch.bool))
    return params


def find_ticket(
    model: nn.Module,
    train_fn: Callable[[nn.Module, Any, Any, int], Any],
    make_optimizer: Callable[[nn.Module], Any],
    *,
    levels: int | None = None,
    sparsity: float | None = None,
    prune_fraction: float = 0.2,
    rewind_step: int = 0,
    make_scheduler: Callable[[Any], Any] | None = None,
    scope: str = "global",
    granularity: str = "weight",
    distribution: str | Callable = "uniform",
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    total_steps: int | None = None,
    seed: int = 0,
) -> Ticket:
    """Run IMP: level 0, then ``levels`` rounds of prune, rewind to step ``rewind_step``, retrain.

    train_fn(model, optimizer, scheduler, start_step) -> metrics: your training loop, run from
      optimizer step ``start_step`` (0 at level 0, ``rewind_step`` after) to the end, with the
      data order resumed there. Masks are enforced after every optimizer step for you.
    make_optimizer(model) -> a fresh torch optimizer (one per level);
    make_scheduler(optimizer) -> a learning-rate scheduler, stepped once per optimizer step
      (the driver advances it ``rewind_step`` steps before each retraining).
    levels or sparsity: how far to go; with ``sparsity`` alone, the levels needed to reach it,
      the last one landing on it exactly.
    total_steps: steps per level; given, a rewind step beyond it is refused before training.

    Returns a :class:`Ticket`; the model is left trained at the last level with its masks.
    """
    p = check_prune_fraction(prune_fraction)
    if isinstance(rewind_step, bool) or not isinstance(rewind_step, int):
        raise ValueError(f"rewind_step must be an integer step ≥ 0, got {rewind_step!r}")
    check_rewind_step(rewind_step)
    if total_steps is not None and rewind_step > total_steps:
        raise ValueError(f"rewind_step {rewind_step} is after the end of training ({total_steps} steps)")
    if levels is None and sparsity is None:
        raise ValueError("give levels (pruning rounds) or sparsity (the target) to find_ticket")
    if levels is not None and (isinstance(levels, bool) or not isinstance(levels, int) or levels < 0):
        raise ValueError(f"levels must be an integer ≥ 0, got {levels!r}")
    target = sparsity if sparsity is not None else 1.0 - (1.0 - p) ** levels
    algorithm = IMP(target, p, scope, granularity, distribution, include=include, exclude=exclude)
    n_levels = algorithm.levels if levels is None else levels

    # level 0
    params = _level0_params(model, algorithm)
    opt = make_optimizer(model)
    engine = Sparsifier(model, opt, seed=seed)
    saved: dict[str, Any] = {"state": snapshot_state(model) if rewind_step == 0 else None, "steps": 0}

    def count(optimizer, args, kwargs):
        saved["steps"] += 1
        if saved["steps"] == rewind_step:
            saved["state"] = snapshot_state(model)

    handle = opt.register_step_post_hook(count) if rewind_step > 0 else None
    try:
        metrics = train_fn(model, opt, make_scheduler(opt) if make_scheduler else None, 0)
    finally:
        engine.remove()
        if handle is not None:
            handle.remove()
    if saved["state"] is None:
        raise ValueError(f"rewind_step {rewind_step} is after the end of training: level 0 made "
                         f"{saved['steps']} optimizer steps")
    records = [_record(0, params, metrics)]

    for level in range(1, n_levels + 1):
        for sp, m in zip(params, algorithm.level_masks(params, level)):
            attach_mask(sp, m)
        restore_state(model, saved["state"])
        opt = make_optimizer(model)
        engine = Sparsifier(model, opt, seed=seed)
        scheduler = make_scheduler(opt) if make_scheduler else None
        if scheduler is not None:
            _advance(scheduler, rewind_step)
        try:
            metrics = train_fn(model, opt, scheduler, rewind_step)
        finally:
            engine.remove()
        records.append(_record(level, params, metrics))
    return Ticket({sp.name: sp.mask.detach().clone() for sp in params}, saved["state"], rewind_step, records)


def _record(level: int, params: Sequence[SparseParam], metrics: Any) -> dict[str, Any]:
    active = {sp.name: int(sp.mask.sum()) for sp in params}
    total = sum(sp.mask.numel() for sp in params)
    return {"level": level, "active": active, "density": sum(active.values()) / total, "metrics": metrics}
