"""How an engine takes hold of a model: which algorithm owns which weights, its recipes, first masks.

Everything here checks before it changes anything: a refused set-up leaves the model as it was.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable, Sequence

from torch import nn

from ..algorithms.base import Setup, SparsityAlgorithm
from ..core.masks import SparseParam, attach_mask, sparse_params
from .checks import check_optimizer, check_targets
from .execution import CompactParam, active_count, check_plan, compact_params, numel_of
from .fsdp import check_fsdp, full_views, is_fsdp
from .recipe import EntryPointRefused, Recipe, recipe_class

log = logging.getLogger("fastsparse")


class Group:
    """One algorithm, the parameters it owns, their target sparsities and its recipe (if any)."""

    def __init__(self, algorithm: SparsityAlgorithm, params: list[SparseParam], targets: list[float]):
        self.algorithm, self.params, self.targets = algorithm, params, targets
        self.recipe: Recipe | None = None


def held_params(model: nn.Module) -> dict[str, Any]:
    """The sparse weights a model already carries: masked ones (a ``_mask`` buffer) and the
    :class:`~fastsparse.core.sparse_linear.SparseLinear` layers it was built with (sparse-executed)."""
    held: dict[str, Any] = {sp.name: sp for sp in sparse_params(model)}
    for name, parent, attr, module in compact_params(model):
        held[name] = CompactParam(name, parent, attr, module)
    return held


def sparsity_of(params: Iterable[SparseParam]) -> float:
    params = list(params)
    total = sum(numel_of(sp) for sp in params)
    return 1.0 - sum(active_count(sp) for sp in params) / max(1, total)


def build_groups(self: Any, algorithms: list[SparsityAlgorithm]) -> list[Group]:
    existing = held_params(self.model)
    claimed: dict[str, str] = {}
    plans = []
    explicit = [a for a in algorithms if a.selects_explicitly]
    for alg in algorithms:
        if alg.selects_explicitly or not existing:
            params = alg.select(self.model)
        else:
            params = list(existing.values())
        if not alg.selects_explicitly and len(explicit) and len(algorithms) > 1:
            others = {sp.name for a in explicit for sp in a.select(self.model)}
            params = [sp for sp in params if sp.name not in others]
        for sp in params:
            if sp.name in claimed:
                raise ValueError(f"parameter {sp.name} is selected by two algorithms "
                                 f"({claimed[sp.name]} and {alg.name}); their filters must not overlap")
            claimed[sp.name] = alg.name
        plans.append((alg, params))
    groups = [Group(alg, params, []) for alg, params in plans]
    _check_optimizer(self, groups)
    _make_recipes(self, groups)     # every recipe checks its entry point before anything changes
    self.sharded = is_fsdp([sp for g in groups for sp in g.params])
    if self.sharded:
        check_fsdp(groups, self.execution)
    masks_of = []
    for g in groups:
        sparsities = g.algorithm.initial_sparsities(g.params)
        _check_targets(self, g, sparsities, existing)
        todo = [(sp, s) for sp, s in zip(g.params, sparsities) if sp.name not in existing]
        setup = _setup_for(self, g.algorithm, [sp for sp, _ in todo]) if todo else None
        chosen = [sp for sp, _ in todo]
        chosen = full_views(g.algorithm, chosen) if self.sharded else chosen
        masks = g.algorithm.initial_masks(chosen, [s for _, s in todo], setup) if todo else []
        masks_of.append((g, sparsities, todo, masks))
    if not self.attach_only:
        check_plan(groups, self.execution, self.optimizer)
    # every check passed: now change state
    for g, sparsities, todo, masks in masks_of:
        for (sp, _), m in zip(todo, masks):
            attach_mask(sp, m)
        g.targets = [s if sp.name not in existing else 1 - active_count(sp) / numel_of(sp)
                     for sp, s in zip(g.params, sparsities)]
        log.info("%s: %d parameters, model sparsity %.4f", g.algorithm.name, len(g.params),
                 sparsity_of(g.params))
    return groups

def _check_optimizer(self: Any, groups: list[Group]) -> None:
    check_optimizer(self.optimizer, [sp for g in groups for sp in g.params])

def _check_targets(self: Any, g: Group, sparsities: Sequence[float], existing: dict) -> None:
    check_targets(g.algorithm, g.params, sparsities, existing, adopting=self._adopting,
                  total_steps=self.total_steps, steps_per_epoch=self.steps_per_epoch,
                  probe=not (self.total_steps or self.external_clock or self.attach_only))

def _make_recipes(self: Any, groups: list[Group]) -> None:
    for g in groups:
        cls = recipe_class(g.algorithm)
        if cls is None:
            continue
        if cls.own_loop:
            raise EntryPointRefused(cls.own_loop.format(name=g.algorithm.name))
        if self.attach_only:
            continue
        if cls.exclusive and len(groups) > 1:
            raise EntryPointRefused(f"{g.algorithm.name} acts on the whole model (learning rate, superposition): "
                                    "it must be the only algorithm of its engine")
        g.recipe = cls(g.algorithm, g.params, self)
        g.recipe.check()
    self._recipes = [g.recipe for g in groups if g.recipe is not None]
    self._owns_lr = any(r.owns_lr for r in self._recipes)
    if self._owns_lr and not self.hooked and self.optimizer is None:
        raise EntryPointRefused("this method sets the learning rate of its steps: the engine needs the "
                                "optimizer (pass it to Sparsifier)")

def _setup_for(self: Any, algorithm: SparsityAlgorithm, params: list[SparseParam]) -> Setup:
    """What ``initial_masks`` may use; a batch and gradients only for methods that need them."""
    needs = set(getattr(algorithm, "needs", ()))
    batch = self.data.batch() if needs & {"batch", "gradients", "shape"} else None
    if "gradients" in needs and any(sp.param.grad is None for sp in params):
        if batch is None:
            raise ValueError(f"{algorithm.name} chooses its first masks by gradient: pass data= (a batch or a "
                             f"DataLoader) to the engine, or leave the gradients of a batch in .grad")
        self.data.gradients(self.model, batch, self.loss_fn)
    return Setup(self.seed, self.model, self.optimizer, batch)

