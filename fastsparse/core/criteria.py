"""Pruning criteria (the fasterai set): ``f(w, w0) -> score``, larger means more worth keeping.

``w`` is the weight now, ``w0`` the weight saved when pruning was set up (the init-based
criteria need it). Every criterion returns a tensor of the weight's shape.

| name | score |
|---|---|
| ``large_final`` | \\|w\\| |
| ``small_final`` | −\\|w\\| |
| ``large_init`` | \\|w0\\| |
| ``small_init`` | −\\|w0\\| |
| ``large_init_large_final`` | min(\\|w\\|, \\|w0\\|) |
| ``small_init_small_final`` | −max(\\|w\\|, \\|w0\\|) |
| ``magnitude_increase`` | \\|w\\| − \\|w0\\| |
| ``movement`` | \\|w − w0\\| |
| ``random`` | uniform in [0, 1), from a seeded generator |
| ``squared_final`` | w² |
| ``movmag`` | \\|w · (w − w0)\\| |
| ``updating_magnitude_increase`` | \\|w\\| − \\|w_prev\\| |
| ``updating_movement`` | \\|w − w_prev\\| |
| ``updating_movmag`` | \\|w · (w − w_prev)\\| |
| ``grad_crit`` | (w · g)², g the weight's gradient (w² without one): first-order Taylor |

The ``updating_*`` criteria compare with ``w_prev``, the weights at the previous pruning
event (at set-up before the first): :class:`fastsparse.Sparsify` passes those as ``w0``.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = ["CRITERIA", "INIT_BASED", "UPDATING", "criterion_scores", "resolve_criterion", "needs_init"]

Criterion = Callable[..., Tensor]


def large_final(w: Tensor, w0: Tensor | None = None, **_) -> Tensor:
    return w.abs()


def small_final(w: Tensor, w0: Tensor | None = None, **_) -> Tensor:
    return -w.abs()


def large_init(w: Tensor, w0: Tensor, **_) -> Tensor:
    return w0.abs()


def small_init(w: Tensor, w0: Tensor, **_) -> Tensor:
    return -w0.abs()


def large_init_large_final(w: Tensor, w0: Tensor, **_) -> Tensor:
    return torch.minimum(w.abs(), w0.abs())


def small_init_small_final(w: Tensor, w0: Tensor, **_) -> Tensor:
    return -torch.maximum(w.abs(), w0.abs())


def magnitude_increase(w: Tensor, w0: Tensor, **_) -> Tensor:
    return w.abs() - w0.abs()


def movement(w: Tensor, w0: Tensor, **_) -> Tensor:
    return (w - w0).abs()


def random(w: Tensor, w0: Tensor | None = None, generator: torch.Generator | None = None, **_) -> Tensor:
    """Drawn on the CPU from ``generator`` so every device and rank draws the same numbers."""
    return torch.rand(w.shape, generator=generator).to(w.device)


def squared_final(w: Tensor, w0: Tensor | None = None, **_) -> Tensor:
    return w.square()


def movmag(w: Tensor, w0: Tensor, **_) -> Tensor:
    return (w * (w - w0)).abs()


def grad_crit(w: Tensor, w0: Tensor | None = None, grad: Tensor | None = None, **_) -> Tensor:
    """First-order Taylor importance (w · g)²; w² when the weight has no gradient yet."""
    return (w * grad).square() if grad is not None else w.square()


CRITERIA: dict[str, Criterion] = {f.__name__: f for f in (
    large_final, small_final, large_init, small_init, large_init_large_final,
    small_init_small_final, magnitude_increase, movement, random, squared_final, movmag, grad_crit,
)}
# the same scores against the weights of the previous pruning event (Sparsify passes them as w0)
CRITERIA.update(updating_magnitude_increase=magnitude_increase, updating_movement=movement,
                updating_movmag=movmag)
UPDATING = frozenset({"updating_magnitude_increase", "updating_movement", "updating_movmag"})
INIT_BASED = frozenset({"large_init", "small_init", "large_init_large_final", "small_init_small_final",
                        "magnitude_increase", "movement", "movmag"}) | UPDATING


def resolve_criterion(criterion: str | Criterion) -> Criterion:
    """A criterion name or a function ``f(w, w0, generator=None) -> tensor``."""
    if callable(criterion):
        return criterion
    if isinstance(criterion, str) and criterion in CRITERIA:
        return CRITERIA[criterion]
    raise ValueError(f"unknown criterion {criterion!r}; valid names: {sorted(CRITERIA)} or a function f(w, w0)")


def needs_init(criterion: str | Criterion) -> bool:
    """Whether a criterion reads the saved initial weights (custom functions are assumed to)."""
    return criterion in INIT_BASED if isinstance(criterion, str) else True


def criterion_scores(criterion: str | Criterion, w: Tensor, w0: Tensor | None = None,
                     generator: torch.Generator | None = None, grad: Tensor | None = None) -> Tensor:
    """Scores of ``w`` under ``criterion``; checks the shape and that w0 is there when needed."""
    fn = resolve_criterion(criterion)
    w = w.detach()
    if w0 is None and isinstance(criterion, str) and criterion in INIT_BASED:
        raise ValueError(f"criterion {criterion!r} needs the weights saved when pruning was set up")
    extra = {"grad": grad.detach()} if grad is not None and fn is grad_crit else {}
    score = fn(w, None if w0 is None else w0.detach().to(w.device), generator=generator, **extra)
    if not isinstance(score, Tensor) or tuple(score.shape) != tuple(w.shape):
        got = tuple(score.shape) if isinstance(score, Tensor) else type(score).__name__
        raise ValueError(f"criterion {getattr(fn, '__name__', fn)} returned {got}; expected the weight's shape {tuple(w.shape)}")
    return score
