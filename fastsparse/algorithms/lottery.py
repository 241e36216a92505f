"""Lottery tickets: iterative magnitude pruning with rewinding (Frankle & Carbin; open_lth).

Level 0 trains the network (dense, or with the masks it already carries). Level L prunes a
fraction p (default 0.2) of the weights that survive, by |w| over all layers (``global``,
the default) or per layer, rewinds every surviving weight, bias and BN buffer to its value
at step k (k = 0 is the original LTH, k > 0 late rewinding), then trains again from step k
with a fresh optimizer and the learning-rate schedule advanced to k. After L levels each
layer (local) or the model (global) keeps round((1 − p)^L · N) weights, never fewer than
the target sparsity allows, and every level's mask lies inside the previous one.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from ..core.distributions import resolve_sparsities
from ..core.masks import MASK_SUFFIX, SparseParam, attach_mask, sparse_params
from ..core.schedules import Clock
from ..engine.sparsifier import Sparsifier
from ..core.structured import check_scope, resolve_dims, select_masks
from .base import SparsityAlgorithm, register

__all__ = ["IMP", "Ticket", "find_ticket", "snapshot_state", "restore_state", "check_prune_fraction"]


def snapshot_state(model: nn.Module) -> dict[str, Tensor]:
    """A copy of every parameter and buffer of ``model`` except the masks."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith(MASK_SUFFIX)}


@torch.no_grad()
def restore_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy ``state`` back into ``model`` in place (the optimizer keeps its references), then re-apply masks."""
    own = model.state_dict(keep_vars=True)
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise ValueError(f"the saved state does not fit the model: it holds {unknown}, which the model has not")
    for k, v in state.items():
        own[k].copy_(v)
    for sp in sparse_params(model):
        sp.param.mul_(sp.mask)


def check_prune_fraction(p: float) -> float:
    try:
        p = float(p)
    except (TypeError, ValueError):
        raise TypeError(f"prune_fraction must be a number in (0, 1), got {p!r}") from None
    if not 0.0 < p < 1.0:
        raise ValueError(f"prune_fraction is the fraction of the remaining weights pruned per level and must be "
                         f"in (0, 1), got {p}")
    return p


@register
class IMP(SparsityAlgorithm):
    """Iterative magnitude pruning by levels towards ``sparsity`` (the target; masks start dense).

    :meth:`level_masks` is the pure decision used by :func:`find_ticket`. Inside a single run
    (``update=UpdateSchedule(steps=[...])``) each update prunes the next level without rewinding.
    """

    name = "imp"
    keeps_count = False

    def __init__(self, sparsity: float = 0.9, prune_fraction: float = 0.2, scope: str = "global",
                 granularity: str = "weight", distribution: str | Callable = "uniform", **kwargs):
        super().__init__(sparsity, distribution, **kwargs)
        self.prune_fraction = check_prune_fraction(prune_fraction)
        self.scope = check_scope(scope)
        self.granularity = granularity
        self.level = 0

    @property
    def levels(self) -> int:
        """Levels needed to reach the target: ⌈log(1 − s) / log(1 − p)⌉."""
        if self.sparsity == 0:
            return 0
        return int(math.ceil(math.log(1 - self.sparsity) / math.log(1 - self.prune_fraction) - 1e-9))

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
        return self.level_sparsities(params, self.level)

    def update_masks(self, params, optimizer, clock: Clock, seed: int) -> list[Tensor] | None:
        new = self.level_masks(params, self.level + 1)
        self.level += 1
        return new

    def state_dict(self) -> dict[str, Any]:
        return {"level": self.level}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.level = int(state.get("level", 0))


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
    if isinstance(rewind_step, bool) or not isinstance(rewind_step, int) or rewind_step < 0:
        raise ValueError(f"rewind_step must be an integer step ≥ 0, got {rewind_step!r}")
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
    opt = make_optimizer(model)
    engine = Sparsifier(model, opt, algorithm, total_steps=total_steps, seed=seed)
    params = engine.groups[0].params
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
        algorithm.level = level
        restore_state(model, saved["state"])
        opt = make_optimizer(model)
        engine = Sparsifier(model, opt, algorithm, total_steps=total_steps, seed=seed)
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
