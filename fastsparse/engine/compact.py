"""Mask updates of sparse-executed layers: the algorithm decides as always, the engine moves the
values and their optimizer state.

Two ways to decide:

* the fast path, for prune-and-regrow by magnitude with random or gradient growth and each
  layer on its own (SET, RigL, ITOP, a DST with those scores): the drop is a top-k of the
  active |values|, the growth a top-k outside the kept positions scored one block of rows at a
  time (the gradient rebuilt from the kept inputs and output gradients; SET's random numbers drawn
  block by block from the same generator as the masked run, so its masks are the same); no
  tensor of the layer's dense size ever exists;
* dense views for every other method: each compact layer lends the algorithm a dense weight, its
  mask, its gradient (rebuilt in full) and its dense optimizer state; the new mask is read back.

Either way the result is a sorted set of flat positions; :func:`install` relocates the values
and every per-value state tensor (kept weights keep both; grown ones start at 0).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from ..algorithms.base import MaskUpdate, generator_for
from ..algorithms.dst import DST
from ..core.csr import block_rows_for_budget, csr_rows, merge_sorted, topk_exact, topk_outside
from ..core.masks import SparseParam
from ..core.schedules import Clock
from ..core.scores import gradient_magnitude, random_score, weight_magnitude
from .execution import CompactParam

__all__ = ["arm", "fast_path", "decide", "install", "dense_grad"]

# the budget of one block of a dense gradient or score (bytes)
BLOCK_BYTES = 64 * 2**20


def arm(params: Sequence[Any], on: bool) -> None:
    """Keep (or stop keeping) what the next backward needs for a dense gradient of each layer."""
    for sp in params:
        if getattr(sp, "compact", False):
            sp.module.capture = [] if on else None


def _captured(cp: CompactParam) -> list[tuple[Tensor, Tensor]]:
    got = cp.module.capture or []
    if not got:
        raise RuntimeError(f"{cp.name}: a mask update needs this step's gradient, but the layer did not keep it; "
                           "the engine arms the layers on the step before an update (call engine.step() after every "
                           "optimizer step, or set the clock before the forward pass)")
    return got


def dense_grad(cp: CompactParam, rows: tuple[int, int] | None = None) -> Tensor:
    """The dense weight gradient of this step (of rows ``r0:r1``): Σ over the layer's calls of g^T x."""
    r0, r1 = rows if rows is not None else (0, cp.shape[0])
    out = None
    for xT, gT in _captured(cp):
        block = gT[r0:r1] @ xT.t()
        out = block if out is None else out + block
    return out


def fast_path(algorithm: Any) -> bool:
    """Whether the compact decisions reproduce this algorithm's (see the module)."""
    return (isinstance(algorithm, DST) and algorithm.redistribution == "none" and algorithm._balance is None
            and algorithm.drop_rule == "keep_score" and algorithm.keep_score is weight_magnitude
            and algorithm.grow_score in (random_score, gradient_magnitude))


@torch.no_grad()
def _fast(alg: DST, cp: CompactParam, clock: Clock, seed: int) -> Tensor | None:
    """DST's decision on a compact layer: keep the n − ⌊f·n⌋ largest |w| (ties: lowest position),
    grow as many outside the kept ones by the grow score, scored block by block."""
    f = float(alg.drop_fraction(clock))
    if f <= 0:
        return None
    values, flat = cp.values.detach(), cp.flat()
    n_active = flat.numel()
    n_drop = int(math.floor(f * n_active))
    if n_drop == 0:
        return flat
    kept_at = topk_exact(values.abs(), n_active - n_drop)   # ascending positions in the old order
    kept = flat.index_select(0, kept_at)
    crow, col = csr_rows(kept, cp.shape)
    rows = block_rows_for_budget(cp.shape[1], BLOCK_BYTES)
    if alg.grow_score is gradient_magnitude:
        score = lambda r0, r1: dense_grad(cp, (r0, r1)).abs_()  # noqa: E731
    else:   # the masked run's torch.rand(shape) drawn block by block: the same numbers
        gen = generator_for(seed, clock.step, cp.name)
        score = lambda r0, r1: torch.rand((r1 - r0, cp.shape[1]), generator=gen).to(values.device)  # noqa: E731
    grown, _ = topk_outside(cp.shape, crow, col, n_drop, score, rows, values.dtype, ordered=False)
    # where each new weight was: kept ones at kept_at, regrown dropped ones found, grown ones nowhere
    at = torch.searchsorted(flat, grown).clamp_max(n_active - 1)
    grown_src = torch.where(flat.index_select(0, at) == grown, at, torch.full_like(at, -1))
    return merge_sorted(kept, grown, kept_at, grown_src)   # both sorted, disjoint


class _View(nn.Module):
    """A compact layer lent to an algorithm as a dense weight with its mask and gradient."""

    def __init__(self, cp: CompactParam, with_grad: bool):
        super().__init__()
        self.weight = nn.Parameter(cp.module.to_dense().detach().clone())
        self.register_buffer("weight_mask", cp.mask)
        if with_grad and cp.module.capture:
            self.weight.grad = dense_grad(cp)


class _OptimizerView:
    """The optimizer as a decision sees it: its own state, and each view's state scattered to dense."""

    def __init__(self, optimizer: Any, views: dict[int, tuple[CompactParam, nn.Parameter]]):
        self.optimizer = optimizer
        self.state: dict[Any, Any] = dict(getattr(optimizer, "state", {}) or {})
        self.param_groups = []
        for group in getattr(optimizer, "param_groups", []):
            params = list(group["params"])
            for cp, view in views.values():
                if any(p is cp.values for p in params):
                    params.append(view)
            self.param_groups.append({**group, "params": params})
        for cp, view in views.values():
            st = self.state.get(cp.values, {})
            flat = cp.flat()
            self.state[view] = {k: _scatter(v, flat, cp.shape) if isinstance(v, Tensor) and v.shape == cp.values.shape
                                else v for k, v in st.items()}


def _scatter(v: Tensor, flat: Tensor, shape: tuple[int, int]) -> Tensor:
    out = torch.zeros(shape[0] * shape[1], dtype=v.dtype, device=v.device)
    out[flat] = v
    return out.view(shape)


def decide(alg: Any, params: Sequence[Any], optimizer: Any, clock: Clock, seed: int
           ) -> tuple[list[Any], list[Any] | None] | None:
    """The algorithm's new masks for ``params`` (masked ones: bool tensors; compact ones: sorted
    flat positions), and the positions to restart at 0 beyond the newly active (or None)."""
    if fast_path(alg):
        out = []
        for sp in params:
            if getattr(sp, "compact", False):
                new = _fast(alg, sp, clock, seed)   # (positions, where each was) or the positions
                out.append(new if new is not None else sp.flat())
            else:
                new = alg.update_masks([sp], optimizer, clock, seed)
                out.append(new[0] if new is not None else sp.mask.clone())
        return out, None
    views = {id(sp): (sp, SparseParam(sp.name, _View(sp, True), "weight")) for sp in params
             if getattr(sp, "compact", False)}
    lent = [views[id(sp)][1] if id(sp) in views else sp for sp in params]
    new = alg.update_masks(lent, _OptimizerView(optimizer, {k: (cp, v.param) for k, (cp, v) in views.items()}),
                           clock, seed)
    if new is None:
        return None
    masks, grown = (new.masks, new.grown) if isinstance(new, MaskUpdate) else (list(new), None)
    read = lambda sp, m: m.reshape(-1).nonzero().squeeze(1) if getattr(sp, "compact", False) else m  # noqa: E731
    return [read(sp, m) for sp, m in zip(params, masks)], \
        None if grown is None else [read(sp, g) for sp, g in zip(params, grown)]


def lend(params: Sequence[Any]) -> list[Any]:
    """Dense views of the compact parameters (for commit and reports), the masked ones as they are."""
    return [SparseParam(sp.name, _View(sp, False), "weight") if getattr(sp, "compact", False) else sp
            for sp in params]


@torch.no_grad()
def install(cp: CompactParam, new_flat: Tensor | tuple[Tensor, Tensor], grown: Tensor | None, optimizer: Any
            ) -> Tensor:
    """Move ``cp``'s values and per-value optimizer state to ``new_flat`` (sorted positions, or
    (positions, each one's index in the old order or -1)); newly active weights (and the positions
    of ``grown``) start at 0 with 0 state. Returns the positions of the weights that restarted."""
    new_flat, sources = new_flat if isinstance(new_flat, tuple) else (new_flat, None)
    cp.resync(optimizer)
    fresh = ~cp.module.update_structure(new_flat, optimizer if hasattr(optimizer, "state") else None, sources)
    cp.registered = cp.module.values
    if grown is not None and grown.numel():
        new = cp.flat()
        again = torch.isin(new, grown) & ~fresh
        if again.any():   # active before, regrown in this update: restart them too
            cp.values.data[again] = 0
            state = getattr(optimizer, "state", {}).get(cp.values, {})
            for v in state.values():
                if isinstance(v, Tensor) and v.shape == cp.values.shape:
                    v[again] = 0
            fresh |= again
    return cp.flat()[fresh]


def union(explored: Tensor, added: Tensor) -> Tensor:
    """ITOP's union of every position ever active (sorted flat positions) with the sorted ``added``."""
    if explored.numel() == 0:
        return added
    at = torch.searchsorted(explored, added).clamp_max(explored.numel() - 1)
    return merge_sorted(explored, added[explored.index_select(0, at) != added])


def call_with_views(fn: Callable, alg: Any, params: Sequence[Any], clock: Clock) -> Any:
    return fn(lend(params), clock) if any(getattr(sp, "compact", False) for sp in params) else fn(params, clock)
