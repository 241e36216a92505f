"""Layer densities: pure functions ``f(params, model_sparsity) -> list of per-layer sparsities``.

``params`` may be tensors or shapes. Every function here returns sparsities (0 = dense),
one per entry of ``params``, in the same order. Any user function of the same signature
can be passed wherever these are accepted.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

__all__ = [
    "uniform_sparsity", "erdos_renyi_sparsity", "first_layer_dense_uniform",
    "check_sparsity", "resolve_sparsities", "DISTRIBUTIONS",
]

Distribution = Callable[[Sequence, float], Sequence[float]]


def _shape(p) -> tuple[int, ...]:
    return tuple(p.shape) if hasattr(p, "shape") else tuple(p)


def check_sparsity(value: float, what: str = "sparsity") -> float:
    """A model or layer sparsity must be a number (not a string, not a bool) in [0, 1)."""
    if isinstance(value, (bool, str, bytes)) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise TypeError(f"{what} must be a number in [0, 1), got {value!r}")
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be a number in [0, 1), got {value!r}") from None
    if not 0.0 <= value < 1.0 or math.isnan(value):
        raise ValueError(f"{what} must be in [0, 1) (0 = dense, 0.9 = 90% zeros), got {value}")
    return value


def uniform_sparsity(params: Sequence, model_sparsity: float) -> list[float]:
    """Every layer gets the model sparsity."""
    return [float(model_sparsity)] * len(params)


def first_layer_dense_uniform(params: Sequence, model_sparsity: float) -> list[float]:
    """The first layer dense (sparsity 0), every other layer at the model sparsity."""
    return [0.0] + [float(model_sparsity)] * (len(params) - 1)


def erdos_renyi_sparsity(
    params: Sequence,
    model_sparsity: float,
    include_kernel: bool = True,
    erk_power_scale: float = 1.0,
) -> list[float]:
    """Erdős–Rényi(-Kernel) layer sparsities with the model's total kept count (1 - S)·ΣN.

    Layer l gets density d_l = ε·raw_l, with raw_l = (Σ dims / Π dims)^p (ERK, p =
    ``erk_power_scale``) or (n_in + n_out)/(n_in · n_out) (ER, ``include_kernel=False``).
    ε solves Σ_{l∉D} ε·raw_l·N_l = (1 − S)·Σ_{l∉D} N_l − S·Σ_{l∈D} N_l, where D holds the
    layers made dense: while some ε·raw_l > 1, every layer tied at the largest raw_l joins D
    and ε is solved again.
    """
    shapes = [_shape(p) for p in params]
    sizes = [math.prod(s) for s in shapes]
    if include_kernel:
        raw = [(sum(s) / math.prod(s)) ** erk_power_scale for s in shapes]
    else:
        raw = [(s[0] + s[1]) / (s[0] * s[1]) if len(s) >= 2 else 1.0 for s in shapes]
    dense: set[int] = set()
    while True:
        free = [i for i in range(len(shapes)) if i not in dense]
        if not free:
            break
        rhs = sum((1 - model_sparsity) * sizes[i] for i in free) - sum(model_sparsity * sizes[i] for i in dense)
        divisor = sum(raw[i] * sizes[i] for i in free)
        eps = rhs / divisor
        top = max(raw[i] for i in free)
        if eps * top <= 1:
            break
        dense.update(i for i in free if raw[i] == top)
    return [0.0 if i in dense else max(0.0, 1.0 - eps * raw[i]) for i in range(len(shapes))]


DISTRIBUTIONS: dict[str, Distribution] = {
    "uniform": uniform_sparsity,
    "erk": erdos_renyi_sparsity,
    "er": lambda params, s: erdos_renyi_sparsity(params, s, include_kernel=False),
    "first_layer_dense": first_layer_dense_uniform,
    "first_layer_dense_uniform": first_layer_dense_uniform,
}


def resolve_sparsities(distribution, shapes: Sequence, model_sparsity: float) -> list[float]:
    """Call a distribution (a name or a function) and check its answer before anything uses it."""
    check_sparsity(model_sparsity, "model_sparsity")
    if isinstance(distribution, str):
        key = distribution.lower()
        if key not in DISTRIBUTIONS:
            raise ValueError(f"unknown distribution {distribution!r}; valid names: {sorted(DISTRIBUTIONS)}")
        distribution = DISTRIBUTIONS[key]
    values = distribution(list(shapes), model_sparsity)
    values = [float(v.item()) if isinstance(v, torch.Tensor) else v for v in values]
    if len(values) != len(shapes):
        raise ValueError(
            f"distribution {getattr(distribution, '__name__', distribution)} returned {len(values)} "
            f"sparsities for {len(shapes)} parameters")
    for i, v in enumerate(values):
        if not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0 or math.isnan(v):
            raise ValueError(
                f"distribution {getattr(distribution, '__name__', distribution)} returned {v!r} for "
                f"parameter {i}; each sparsity must be in [0, 1]")
    return [float(v) for v in values]
