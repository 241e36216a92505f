"""What the engine checks before it changes anything: the numbers it is given, the optimizer,
what an algorithm asks for against the masks a model already carries, layers left empty, and
schedules that cannot be read without the training length."""
from __future__ import annotations

import weakref
from typing import Any, Sequence

from ..algorithms.base import SparsityAlgorithm
from ..core.masks import SparseParam, check_not_empty, n_keep
from ..core.schedules import Clock

__all__ = ["HOOKED", "check_steps", "check_optimizer", "check_targets"]

# the hooked engine of each optimizer (one at most)
HOOKED: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()


def check_steps(value: Any, what: str) -> int | None:
    """None, or a whole number of steps ≥ 1 (not a bool, a float or a string)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a whole number of optimizer steps ≥ 1 (or None), got {value!r}")
    return value


def _probe_without_total(alg: SparsityAlgorithm, params: list[SparseParam], steps_per_epoch: int | None) -> None:
    """Without total_steps, a schedule given in fractions of training cannot be read: say so now,
    not at the first update deep inside training."""
    update = getattr(alg, "update", None)
    steps = {1, 100} | ({update.freq} if getattr(update, "freq", None) else set())
    try:
        for step in sorted(steps):
            clock = Clock(step, None, epoch_steps=steps_per_epoch)
            alg.is_update(clock)
            alg.target_sparsities(params, clock)
            schedule = getattr(alg, "drop_fraction", None)
            if callable(schedule):
                schedule(clock)
    except ValueError as e:
        if "total" not in str(e):
            raise
        raise ValueError(f"{alg!r} reads its schedules in fractions of training: pass total_steps to the engine "
                         f"(or give every point in steps) ({e})") from None


def _optimizer_params(optimizer: Any) -> set[int] | None:
    """ids of the parameters an optimizer updates: a torch optimizer's param_groups, fastai's
    param_lists; None when it does not say."""
    groups = getattr(optimizer, "param_groups", None)
    if groups is not None and all(isinstance(g, dict) and "params" in g for g in groups):
        return {id(p) for g in groups for p in g["params"]}
    lists = getattr(optimizer, "param_lists", None)
    if lists is not None:
        return {id(p) for ps in lists for p in ps}
    return None


def _numel(sp: Any) -> int:
    return sp.shape[0] * sp.shape[1] if getattr(sp, "compact", False) else sp.mask.numel()


def _active(sp: Any) -> int:   # a SparseLinear's count without building its dense mask
    return sp.module.nnz if getattr(sp, "compact", False) else int(sp.mask.count_nonzero())


def check_optimizer(optimizer: Any, params: list[SparseParam]) -> None:
    """The optimizer must update every sparse parameter (when it says which it holds)."""
    held = _optimizer_params(optimizer)
    if held is None:
        return
    missing = [sp.name for sp in params if id(sp.registered if getattr(sp, "compact", False) else sp.param) not in held]
    if missing:
        what = "none of the sparse parameters" if len(missing) == len(params) else f"{missing}"
        raise ValueError(f"the optimizer does not update {what}: build it over the model's parameters "
                         f"(model.parameters()) before the engine, or leave those parameters out of the filter")


def check_targets(alg: SparsityAlgorithm, params: list[SparseParam], sparsities: Sequence[float], existing: dict,
                  *, adopting: bool, total_steps: int | None, steps_per_epoch: int | None, probe: bool) -> None:
    """What the algorithm asks for, against what the model carries and what a layer can lose."""
    held = [sp for sp, s in zip(params, sparsities) if sp.name in existing]
    if held and not adopting and alg.keeps_count and getattr(alg, "checks_held_masks", True):
        asks = sum(n_keep(_numel(sp), s) for sp, s in zip(params, sparsities) if sp.name in existing)
        has = sum(_active(sp) for sp in held)
        numel = sum(_numel(sp) for sp in held)
        # beyond each layer's rounding: one weight per layer, or per group where a method balances groups
        groups = getattr(alg, "balance_out_groups", None) or getattr(alg, "balance_in_groups", None) or 1
        if abs(asks - has) > len(held) * groups:
            raise ValueError(f"the model already carries masks: {[sp.name for sp in held]} keep {has:,} of "
                             f"{numel:,} weights (sparsity {1 - has / numel:.4f}), but {alg!r} asks for {asks:,} "
                             f"({1 - asks / numel:.4f}). Give the algorithm the model's sparsity, detach the masks "
                             "(fastsparse.core.masks.detach_masks) to start over, or build the engine without an "
                             "algorithm to train the masks as they are")
    if probe:
        _probe_without_total(alg, params, steps_per_epoch)
    names, numels = [sp.name for sp in params], [sp.param.numel() for sp in params]
    check_not_empty([n for n in names if n not in existing], [k for n, k in zip(names, numels) if n not in existing],
                    [s for n, s in zip(names, sparsities) if n not in existing], repr(alg))
    if total_steps:
        end = Clock(total_steps, total_steps, epoch_steps=steps_per_epoch)
        try:
            final = alg.target_sparsities(params, end)
        except ValueError:
            final = None   # the recipe's own check says what is missing
        if final:
            check_not_empty(names, numels, final, f"{alg!r} by the end of training")
