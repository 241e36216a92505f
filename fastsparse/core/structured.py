"""Structured selection: groups of weights scored as one, kept or pruned together.

A *granularity* names the dimensions of a weight that one group spans; the group's score
is the mean of its elements' scores. For a Linear weight (out, in): ``weight`` (one
element), ``row`` (an output neuron, reduced over ``in``), ``column`` (an input feature,
reduced over ``out``). For a Conv weight (out, in, *kernel): ``weight``, ``kernel`` (all
kernel positions of one (out, in) pair), ``filter`` (a whole output filter: in and kernel),
``channel`` (the fibre along the input channels at one (out, kernel position)), and for
2-D kernels ``row`` (one kernel row) and ``column`` (one kernel column), plus fasterai's
``shared_*`` and ``*_slice`` groups (see ``_FASTERAI_CONV2D``); ``layer`` is the whole
weight, for every layer type. A ConvTranspose
weight is (in, out, *kernel), so its ``filter`` spans dims (0, 2, ...) and ``channel`` dim 0.

Selection (:func:`select_masks`) keeps exact numbers of groups: per layer (``local``)
n_keep(G_l, s_l) of its G_l groups; over all layers (``global``) one threshold on every
layer's group scores, keeping the prefix of groups, best first, whose element count is
closest to round((1 − s) · Σ N_l), with each layer's best group always kept so that no
layer is emptied. With element granularity both are exact element counts and go through
:func:`fastsparse.core.masks.topk_mask` (ties to the lowest index, no full sort).

N:M (:func:`nm_mask`): in every run of M consecutive weights along the input dimension,
keep the N with the largest scores.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from .masks import SparseParam, n_keep, topk_mask

__all__ = [
    "valid_granularities", "granularity_dims", "resolve_dims", "parse_nm", "check_nm",
    "group_scores", "group_active", "select_masks", "prune_masks", "nm_mask", "nm_keep_for", "input_dim",
    "check_scope", "SCOPES",
]

SCOPES = ("local", "global")
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _kind(module: nn.Module | None, shape: Sequence[int]) -> str:
    if isinstance(module, _CONV_T):
        return "conv_transpose"
    if isinstance(module, _CONV):
        return "conv"
    if len(shape) == 2:
        return "linear"
    return "conv"


def valid_granularities(module: nn.Module | None, shape: Sequence[int]) -> dict[str, tuple[int, ...]]:
    """Granularity name -> the weight dimensions one group spans, for this layer type."""
    kind, nd = _kind(module, shape), len(shape)
    if kind == "linear":
        return {"weight": (), "row": (1,), "column": (0,), "layer": (0, 1)}
    out_dim, in_dim = (1, 0) if kind == "conv_transpose" else (0, 1)
    kernel = tuple(range(2, nd))
    found = {
        "weight": (),
        "kernel": kernel,
        "filter": tuple(sorted((in_dim,) + kernel)),
        "channel": (in_dim,),
    }
    if nd == 4:
        found["row"] = (3,)
        found["column"] = (2,)
        if kind == "conv":
            found.update(_FASTERAI_CONV2D)
    found["layer"] = tuple(range(nd))
    return found


# fasterai's further Conv2d granularities (weight (out, in, kh, kw)): "shared" ones span the
# output filters too (one score shared by every filter); slices span in-channels and one
# kernel axis; ``layer`` (any layer type) is the whole weight as one group.
_FASTERAI_CONV2D = {
    "shared_weight": (0,), "shared_channel": (0, 1), "shared_column": (0, 2), "shared_row": (0, 3),
    "vertical_slice": (1, 2), "horizontal_slice": (1, 3), "shared_vertical_slice": (0, 1, 2),
    "shared_horizontal_slice": (0, 1, 3), "shared_kernel": (0, 2, 3),
}


def granularity_dims(module: nn.Module | None, shape: Sequence[int], granularity: str) -> tuple[int, ...]:
    """The dimensions a ``granularity`` group spans for a weight of ``shape`` owned by ``module``."""
    valid = valid_granularities(module, shape)
    if granularity not in valid:
        layer = type(module).__name__ if module is not None else f"a {len(shape)}-D weight"
        raise ValueError(f"granularity {granularity!r} does not exist for {layer}; valid: {list(valid)}")
    return valid[granularity]


def resolve_dims(params: Sequence[SparseParam], granularity: str) -> list[tuple[int, ...]]:
    """Group dimensions for each parameter; fails before anything changes if one layer lacks the granularity."""
    return [granularity_dims(sp.module, tuple(sp.param.shape), granularity) for sp in params]


def parse_nm(granularity: str) -> tuple[int, int] | None:
    """``"2:4"`` -> (2, 4); anything without a colon -> None."""
    if not isinstance(granularity, str) or ":" not in granularity:
        return None
    left, _, right = granularity.partition(":")
    try:
        n, m = int(left), int(right)
    except ValueError:
        raise ValueError(f"an N:M granularity is two integers such as '2:4', got {granularity!r}") from None
    check_nm(n, m)
    return n, m


def check_nm(n: int, m: int, size: int | None = None, where: str = "the input dimension") -> None:
    """N:M needs 1 ≤ N < M, and M must divide the dimension the groups run along."""
    if isinstance(n, bool) or isinstance(m, bool) or not isinstance(n, int) or not isinstance(m, int):
        raise TypeError(f"N and M must be integers, got {n!r}:{m!r}")
    if not 1 <= n < m:
        raise ValueError(f"N:M sparsity needs 1 ≤ N < M (keep N of every M), got {n}:{m}")
    if size is not None and size % m:
        raise ValueError(f"M={m} does not divide {where} of size {size}: N:M groups need a multiple of M")


def input_dim(module: nn.Module | None, shape: Sequence[int]) -> int:
    """The input dimension of a weight (1 for Linear and Conv, 0 for ConvTranspose)."""
    return 0 if _kind(module, shape) == "conv_transpose" else 1


def group_scores(scores: Tensor, dims: Sequence[int]) -> Tensor:
    """Mean score of each group, keeping the reduced dimensions (size 1) for broadcasting back."""
    return scores.mean(dim=tuple(dims), keepdim=True) if dims else scores


def check_scope(scope: str) -> str:
    """``local`` (per layer) or ``global`` (one threshold over all layers)."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {list(SCOPES)}, got {scope!r}")
    return scope


def group_active(mask: Tensor, dims: Sequence[int]) -> Tensor:
    """Whether each group holds at least one active weight (reduced dimensions kept, size 1)."""
    return mask.amax(dim=tuple(dims), keepdim=True) if dims else mask


def _bias(score: Tensor, active: Tensor | None, grow: bool) -> Tensor:
    """Keep the decision nested: when shrinking, inactive groups come last (−inf); when
    growing, every active group stays (+inf) and the best inactive ones join."""
    if active is None:
        return score
    inf = torch.tensor(float("inf"), dtype=score.dtype, device=score.device)
    return torch.where(active, inf, score) if grow else torch.where(active, score, -inf)


def _check_finite(score: Tensor, i: int) -> None:
    if torch.isnan(score).any():
        raise ValueError(f"scores of parameter {i} contain NaN; scores must be numbers or ±inf")


def select_masks(
    scores: Sequence[Tensor],
    dims: Sequence[Sequence[int]] | None,
    sparsity: float | Sequence[float],
    scope: str = "local",
    masks: Sequence[Tensor] | None = None,
    reserve: bool = True,
) -> list[Tensor]:
    """Bool masks keeping the best-scored groups.

    scores: one tensor per parameter, of its shape (larger = keep).
    dims: per parameter, the dimensions a group spans (``()`` for single weights); None = all ().
    sparsity: ``local``: a float or one per parameter, each layer keeps n_keep(G_l, s_l) of its
      G_l groups. ``global``: one float; the kept groups' element count is the one closest to
      round((1 − s) · Σ N_l).
    masks: the current masks. When the target is below the active count the choice is made
      among active groups only (pruning is nested); above it, every active group stays and
      the best inactive ones are added.
    reserve: ``global`` only: each layer's best group is always kept (no layer is emptied).
    """
    check_scope(scope)
    n = len(scores)
    dims = [tuple(d) for d in dims] if dims is not None else [()] * n
    if len(dims) != n or (masks is not None and len(masks) != n):
        raise ValueError("scores, dims and masks must have one entry per parameter")
    for i, s in enumerate(scores):
        _check_finite(s, i)
    gs = [group_scores(s.detach(), d) for s, d in zip(scores, dims)]
    active = [group_active(m.bool(), d) for m, d in zip(masks, dims)] if masks is not None else [None] * n
    sizes = [s.numel() // g.numel() for s, g in zip(scores, gs)]
    if scope == "local":
        sps = [float(sparsity)] * n if isinstance(sparsity, (int, float)) else [float(x) for x in sparsity]
        if len(sps) != n:
            raise ValueError(f"{len(sps)} sparsities for {n} parameters")
        keeps = []
        for g, a, s in zip(gs, active, sps):
            k = n_keep(g.numel(), s)
            grow = a is not None and k > int(a.sum())
            keeps.append(topk_mask(_bias(g, a, grow), k))
    else:
        if not isinstance(sparsity, (int, float)):
            raise ValueError("global selection takes one model sparsity, not one per parameter")
        target = n_keep(sum(s.numel() for s in scores), float(sparsity))
        n_active = sum(int(a.sum()) * z for a, z in zip(active, sizes)) if masks is not None else None
        grow = n_active is not None and target > n_active
        biased = [_bias(g, a, grow) for g, a in zip(gs, active)]
        keeps = _global_keep(biased, sizes, target, reserve)
    return [k.expand(s.shape).clone() for k, s in zip(keeps, scores)]


def _global_keep(gscores: list[Tensor], sizes: list[int], target: int, reserve: bool) -> list[Tensor]:
    dtype = gscores[0].dtype
    for g in gscores[1:]:
        dtype = torch.promote_types(dtype, g.dtype)
    device = gscores[0].device
    flat = [g.reshape(-1).to(device=device, dtype=dtype) for g in gscores]
    n_reserved = 0
    if reserve:
        flat = [f.clone() for f in flat]
        for f in flat:
            if f.numel() and bool(f.max() > float("-inf")):
                f[int(torch.argmax(f))] = float("inf")
                n_reserved += 1
    cat = torch.cat(flat)
    if len(set(sizes)) == 1:
        k = int(round(target / sizes[0]))
        keep = topk_mask(cat, min(cat.numel(), max(k, n_reserved)))
    else:
        order = torch.sort(cat, descending=True, stable=True).indices
        size_of = torch.cat([torch.full((f.numel(),), z, dtype=torch.int64, device=device) for f, z in zip(flat, sizes)])
        cum = torch.cat([torch.zeros(1, dtype=torch.int64, device=device), torch.cumsum(size_of[order], 0)])
        j = max(int(torch.argmin((cum - target).abs())), n_reserved)
        keep = torch.zeros_like(cat, dtype=torch.bool)
        keep[order[:j]] = True
    out, start = [], 0
    for g, f in zip(gscores, flat):
        out.append(keep[start:start + f.numel()].view(g.shape).to(g.device))
        start += f.numel()
    return out


def prune_masks(
    params: Sequence[SparseParam],
    scores: Sequence[Tensor],
    sparsity: float | Sequence[float],
    granularity: str = "weight",
    scope: str = "local",
    masks: Sequence[Tensor] | None = None,
    reserve: bool = True,
) -> list[Tensor]:
    """:func:`select_masks` with the granularity resolved for each parameter's layer type."""
    return select_masks(scores, resolve_dims(params, granularity), sparsity, scope, masks, reserve)


def nm_mask(scores: Tensor, n: int, m: int, dim: int = 1, mask: Tensor | None = None) -> Tensor:
    """Keep the ``n`` best of every ``m`` consecutive entries along ``dim`` (ties to the lower index).

    With ``mask``, inactive entries come last, so a mask that already holds N:M (or a denser
    N':M) stays nested.
    """
    size = scores.shape[dim]
    check_nm(n, m, size, where=f"dimension {dim}")
    _check_finite(scores, 0)
    x = scores.detach().movedim(dim, -1)
    moved = x.shape
    x = x.reshape(*moved[:-1], size // m, m)
    if mask is not None:
        active = mask.bool().movedim(dim, -1).reshape(x.shape)
        x = torch.where(active, x, torch.tensor(float("-inf"), dtype=x.dtype, device=x.device))
    best = torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :n]
    keep = torch.zeros_like(x, dtype=torch.bool).scatter_(-1, best, True)
    return keep.reshape(moved).movedim(-1, dim).contiguous()


def nm_keep_for(fraction: float, n: int, m: int) -> int:
    """How many of every M a schedule at ``fraction`` of the way to N:M keeps: M − round(f · (M − N))."""
    f = min(1.0, max(0.0, float(fraction)))
    return m - int(math.floor(f * (m - n) + 0.5))
