"""The score vocabulary: larger means more worth keeping (keep scores, criteria) or more worth
growing (grow scores). One module, one shape check (:func:`checked_score`).

Two call forms, for the two ways methods score weights:

* engine scores ``f(param, opt) -> tensor of param's shape`` (DST keep and grow scores); a score
  function may also take a keyword ``generator``: the engine then passes a ``torch.Generator``
  seeded from (seed, step, stable hash of the parameter name), so random choices agree on every
  rank and every rerun;
* pruning criteria (the fasterai set) ``f(w, w0) -> tensor``: ``w`` is the weight now, ``w0`` the
  weight saved when pruning was set up (the init-based criteria need it).

| criterion | score |
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

import inspect
import warnings
from typing import Callable

import torch
from torch import Tensor

__all__ = [
    "weight_magnitude", "random_score", "gradient_magnitude", "gradient_momentum",
    "SCORES", "resolve_score", "accepts_generator", "checked_score",
    "CRITERIA", "INIT_BASED", "UPDATING", "criterion_scores", "resolve_criterion", "needs_init",
]

ScoreFn = Callable[..., Tensor]
Criterion = Callable[..., Tensor]


def checked_score(score, like: Tensor, what: str, fn=None, name: str | None = None, nan: bool = True) -> Tensor:
    """``score`` if it is a tensor of ``like``'s shape (and, with ``nan``, free of NaN); a clear error otherwise."""
    label = f"{what} function {getattr(fn, '__name__', fn)}" if fn is not None else what
    where = f" for {name}" if name else ""
    if not isinstance(score, Tensor) or tuple(score.shape) != tuple(like.shape):
        got = tuple(score.shape) if isinstance(score, Tensor) else type(score).__name__
        raise ValueError(f"{label} returned {got}{where}; it must return a tensor of the parameter's shape "
                         f"{tuple(like.shape)}")
    if nan and torch.isnan(score).any():
        raise ValueError(f"{label} returned NaN{where}")
    return score


def weight_magnitude(param: Tensor, opt=None, **kwargs) -> Tensor:
    """|w|."""
    return param.detach().abs()


def random_score(param: Tensor, opt=None, generator: torch.Generator | None = None, **kwargs) -> Tensor:
    """Uniform random numbers, drawn on the CPU so every device and rank draws the same."""
    return torch.rand(param.shape, generator=generator).to(param.device)


def gradient_magnitude(param: Tensor, opt=None, **kwargs) -> Tensor:
    """|∂L/∂w| of the current batch (the dense gradient, masked weights included)."""
    if param.grad is None:
        raise RuntimeError(
            "gradient_magnitude needs the parameter's gradient, but .grad is None: update masks "
            "after loss.backward() and before zero_grad()")
    return param.grad.detach().abs()


def _hyper(opt, param: Tensor, key: str, default: float) -> float:
    for group in getattr(opt, "param_groups", []):
        if any(p is param for p in group["params"]):
            return float(group.get(key, default))
    hypers = getattr(opt, "hypers", None)  # fastai's optimizer
    if hypers:
        return float(hypers[0].get(key, default))
    return default


def gradient_momentum(param: Tensor, opt=None, **kwargs) -> Tensor:
    """|momentum| from the optimizer state.

    SGD: ``momentum_buffer``; Adam/AdamW: exp_avg / (sqrt(exp_avg_sq) + eps); fastai:
    ``grad_avg`` (divided by sqrt(``sqr_avg``) + eps when present). Without any momentum
    state yet (before the first step, or SGD without momentum) the gradient is used.
    """
    state = opt.state.get(param, {}) if opt is not None and hasattr(opt, "state") else {}
    if state.get("momentum_buffer") is not None:
        return state["momentum_buffer"].detach().abs()
    if "exp_avg" in state and "exp_avg_sq" in state:
        eps = _hyper(opt, param, "eps", 1e-8)
        return (state["exp_avg"] / (state["exp_avg_sq"].sqrt() + eps)).abs()
    if state.get("grad_avg") is not None:
        avg = state["grad_avg"]
        if state.get("sqr_avg") is not None:
            eps = _hyper(opt, param, "eps", 1e-5)
            avg = avg / (state["sqr_avg"].sqrt() + eps)
        return avg.detach().abs()
    if param.grad is None:
        raise RuntimeError("gradient_momentum found neither optimizer momentum nor a gradient for the parameter")
    warnings.warn("gradient_momentum: the optimizer holds no momentum for this parameter; using |grad|",
                  stacklevel=2)
    return param.grad.detach().abs()


SCORES: dict[str, ScoreFn] = {
    "weight_magnitude": weight_magnitude, "magnitude": weight_magnitude,
    "random": random_score, "random_score": random_score,
    "gradient": gradient_magnitude, "gradient_magnitude": gradient_magnitude,
    "momentum": gradient_momentum, "gradient_momentum": gradient_momentum,
}


def resolve_score(score: str | ScoreFn, what: str = "score") -> ScoreFn:
    """A score name or a function ``f(param, opt)`` (checked to take those two arguments now, not
    at the first mask update)."""
    if callable(score):
        try:
            sig = inspect.signature(score)
            extra = {"generator": None} if "generator" in sig.parameters else {}
            sig.bind(None, None, **extra)
        except TypeError:
            raise ValueError(f"{what} function {getattr(score, '__name__', score)} must take (param, optimizer), "
                             f"as f(param, opt) -> a tensor of param's shape") from None
        except ValueError:   # a builtin without a signature: it is called as it is
            pass
        return score
    if isinstance(score, str) and score.lower() in SCORES:
        return SCORES[score.lower()]
    raise ValueError(f"unknown {what} {score!r}; valid names: {sorted(SCORES)} or a function f(param, opt)")


def accepts_generator(fn: ScoreFn) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "generator" or p.kind is p.VAR_KEYWORD for p in params)


# --- pruning criteria (the fasterai set) ----------------------------------------------------------------


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
    return checked_score(score, w, "criterion", fn, nan=False)
