"""What the engine reports: per parameter, the target and actual sparsity, the active and the
explored counts (ITOP's exploration), and what each algorithm aims at by the end of training."""
from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor

from ..core.schedules import Clock
from ..core.sharded import count_like, global_count

__all__ = ["report_rows", "final_targets"]


def report_rows(groups: Sequence[Any], clock: Clock, union: dict[str, Tensor]) -> list[dict[str, Any]]:
    rows = []
    for g in groups:
        targets = g.algorithm.target_sparsities(g.params, clock) or g.targets
        for sp, t in zip(g.params, targets):
            active = global_count(sp.mask)
            rows.append({"name": sp.name, "shape": tuple(sp.param.shape), "algorithm": g.algorithm.name,
                         "target_sparsity": float(t), "sparsity": 1 - active / sp.mask.numel(),
                         "active": active, "numel": sp.mask.numel(),
                         "explored": count_like(union[sp.name], sp.mask) if sp.name in union else active})
    return rows


def final_targets(groups: Sequence[Any], total_steps: int | None, steps_per_epoch: int | None) -> dict[str, float]:
    if not total_steps:
        return {}
    end = Clock(total_steps, total_steps, epoch_steps=steps_per_epoch)
    out: dict[str, float] = {}
    for g in groups:
        targets = g.algorithm.target_sparsities(g.params, end)
        if targets:
            out.update({sp.name: float(t) for sp, t in zip(g.params, targets)})
    return out
