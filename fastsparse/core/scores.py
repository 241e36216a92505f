"""Score functions ``f(param, opt) -> tensor of param's shape``: larger means more worth keeping
(keep scores) or more worth growing (grow scores).

A score function may also take a keyword ``generator``: the engine then passes a
``torch.Generator`` seeded from (seed, step, stable hash of the parameter name), so random
choices agree on every rank and every rerun.
"""
from __future__ import annotations

import inspect
import warnings
from typing import Callable

import torch
from torch import Tensor

__all__ = [
    "weight_magnitude", "random_score", "gradient_magnitude", "gradient_momentum",
    "SCORES", "resolve_score", "accepts_generator",
]

ScoreFn = Callable[..., Tensor]


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
    if callable(score):
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
