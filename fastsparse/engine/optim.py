"""Plain PyTorch loops: the seed's optimizer wrapper, a thin shell over :class:`Sparsifier`."""
from __future__ import annotations

from typing import Any, Callable, Iterable

from torch import nn

from ..algorithms.dst import DST
from ..core.masks import sparse_params
from ..core.schedules import UpdateSchedule
from ..core.scores import gradient_magnitude, gradient_momentum, random_score, weight_magnitude
from .sparsifier import Sparsifier

__all__ = ["DynamicSparseTrainingOptimizerWrapper", "SET_presets", "SNFS_presets", "RigL_presets", "dst_algorithm"]

SET_presets = {"keep_score_f": weight_magnitude, "grow_score_f": random_score,
               "initial_drop_grow_pct": 0.3, "stop_pct": 0.75, "redistribution": "none"}
# As in the seed, SNFS_presets keeps every layer's count (no redistribution): with ERK layer
# densities the RigL paper found SNFS without redistribution the better of the two. The
# registered "snfs" algorithm, or {**SNFS_presets, "redistribution": "momentum"}, redistributes.
SNFS_presets = {"keep_score_f": weight_magnitude, "grow_score_f": gradient_momentum,
                "initial_drop_grow_pct": 0.3, "stop_pct": 0.75, "redistribution": "none"}
RigL_presets = {"keep_score_f": weight_magnitude, "grow_score_f": gradient_magnitude,
                "initial_drop_grow_pct": 0.3, "stop_pct": 0.75, "redistribution": "none"}

DEFAULT_BATCHES_PER_UPDATE = 100


def dst_algorithm(
    model: nn.Module,
    sparse_modules: Iterable[nn.Module] | None = None,
    batches_per_update: int | None = None,
    initial_drop_grow_pct: float = 0.3,
    stop_pct: float = 0.75,
    keep_score_f: Callable = weight_magnitude,
    grow_score_f: Callable = gradient_magnitude,
    redistribution: str = "none",
) -> DST:
    """The seed's keyword arguments as a :class:`DST` algorithm over the model's masked parameters."""
    if not sparse_params(model):
        raise ValueError("the model carries no masks: call sparsify_model(model, model_sparsity, ...) first")
    bpu = DEFAULT_BATCHES_PER_UPDATE if batches_per_update is None else batches_per_update
    if isinstance(bpu, bool) or not isinstance(bpu, int) or bpu < 1:
        raise ValueError(f"batches_per_update must be an integer ≥ 1, got {batches_per_update!r}")
    if not 0.0 < float(stop_pct) <= 1.0:
        raise ValueError(f"stop_pct must be a fraction of training in (0, 1], got {stop_pct}")
    masked = {sp.name: sp for sp in sparse_params(model)}
    chosen = None if sparse_modules is None else {id(m) for m in sparse_modules}
    names = [n for n, sp in masked.items() if chosen is None or id(sp.module) in chosen]
    param_filter = lambda name, p, m: name in names  # noqa: E731
    # the wrapper adopts the model's masks: its targets are the counts they hold, layer by layer
    held = {n: 1.0 - int(masked[n].mask.count_nonzero()) / masked[n].mask.numel() for n in names}
    total = sum(masked[n].mask.numel() for n in names)
    model_sparsity = sum(held[n] * masked[n].mask.numel() for n in names) / max(1, total)
    return DST(sparsity=min(model_sparsity, 1.0 - 1e-12), distribution=_Held([held[n] for n in names]),
               drop_fraction=initial_drop_grow_pct, update=UpdateSchedule(freq=bpu, stop=float(stop_pct)),
               keep_score=keep_score_f, grow_score=grow_score_f, redistribution=redistribution,
               param_filter=param_filter)


class _Held:
    """The layer sparsities the model's masks already hold (a distribution in the engine's terms)."""

    __name__ = "held by the masks"

    def __init__(self, sparsities: list[float]):
        self.sparsities = sparsities

    def __call__(self, params, model_sparsity: float) -> list[float]:
        return list(self.sparsities)


class DynamicSparseTrainingOptimizerWrapper:
    """Wrap an optimizer so that ``step(step, pct_train)`` also updates the masks when due.

    ``step`` counts batches (the update follows the optimizer step of every
    ``batches_per_update``-th batch, never batch 0) and ``pct_train`` is the fraction of
    training done, which drives the drop fraction α/2 · (1 + cos(π · pct / stop_pct)) and
    stops updates at ``stop_pct``. ``batches_per_update=None`` means 100 (RigL's ΔT): a plain
    loop has no epoch length to default to.
    """

    def __init__(self, model: nn.Module, opt, sparse_modules=None, batches_per_update: int | None = None,
                 initial_drop_grow_pct: float = 0.3, stop_pct: float = 0.75,
                 keep_score_f: Callable = weight_magnitude, grow_score_f: Callable = gradient_magnitude,
                 redistribution: str = "none", seed: int = 0, **engine_kwargs: Any):
        algorithm = dst_algorithm(model, sparse_modules, batches_per_update, initial_drop_grow_pct, stop_pct,
                                  keep_score_f, grow_score_f, redistribution)
        self.optimizer = opt
        self.sparsifier = Sparsifier(model, opt, algorithm, seed=seed, external_clock=True, **engine_kwargs)

    def step(self, step: int, pct_train: float, closure=None):
        self.sparsifier.set_clock(step, pct_train)
        return self.optimizer.step() if closure is None else self.optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "sparsifier": self.sparsifier.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sparsifier.load_state_dict(state["sparsifier"])
        self.optimizer.load_state_dict(state["optimizer"])

    def remove(self) -> None:
        self.sparsifier.remove()
