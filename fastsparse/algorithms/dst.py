"""Dynamic sparse training: prune and regrow at a fixed number of active weights.

Every update, per layer: n_active = mask.sum(); k = floor(f(t) · n_active); drop the k
active weights with the lowest keep score; grow k weights with the highest grow score
among the positions not kept (a weight dropped this update may grow straight back, and
then keeps its value and optimizer state). SET, SNFS and RigL differ only in the grow
score (random, momentum, gradient) and SNFS in moving growth between layers.

Two other drop rules of sparse_learning/GraNet (``--prune``) are offered: ``set`` (SET's own
removal, :func:`set_drop`) and ``threshold`` (:func:`threshold_drop`); and three ways to move
growth between layers (``--redistribution``): ``momentum``, ``magnitude``, ``nonzeros``
(:func:`layer_scores`, :func:`redistribute`).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..core.masks import SparseParam, n_keep, topk_mask
from ..core.schedules import Clock, Cosine, Schedule, UpdateSchedule, check_levels
from ..core.scores import (
    accepts_generator, checked_score, gradient_magnitude, gradient_momentum, random_score, resolve_score,
    weight_magnitude,
)
from .base import Setup, SparsityAlgorithm, generator_for, register

__all__ = ["drop_and_grow", "grow_into", "set_drop", "threshold_drop", "layer_scores", "redistribute", "DST", "SET",
           "SNFS", "RigL", "REDISTRIBUTIONS", "DROP_RULES"]

REDISTRIBUTIONS = ("none", "momentum", "magnitude", "nonzeros")
DROP_RULES = ("keep_score", "set", "threshold")


def drop_and_grow(mask: Tensor, keep_score: Tensor, grow_score: Tensor, n_drop: int, n_grow: int) -> Tensor:
    """The new mask: keep the n_active − n_drop active weights with the largest keep score,
    then add the n_grow positions with the largest grow score among those not kept."""
    n_active = int(mask.count_nonzero())
    return grow_into(_topk_among(keep_score, mask, n_active - n_drop), grow_score, n_grow)


def grow_into(kept: Tensor, grow_score: Tensor, n_grow: int) -> Tensor:
    """``kept`` plus the n_grow positions with the largest grow score among those not kept."""
    return kept | _topk_among(grow_score, ~kept, n_grow)


def set_drop(weights: Tensor, mask: Tensor, n_drop: int) -> Tensor:
    """SET's removal (Mocanu et al. 2018): the kept mask after dropping, among the active
    weights, the ⌈n/2⌉ smallest positive weights and the ⌊n/2⌋ negative weights closest to zero
    (an active weight of exactly 0 counts as positive). When one sign has too few active
    weights, the other gives the rest, so exactly n_drop are dropped.

    (sparse_learning's ``SET`` mode keeps the negative weights *below* its threshold, which
    drops the most negative ones instead; this is the paper's rule.)
    """
    pos, neg = mask & (weights >= 0), mask & (weights < 0)
    n_pos_active, n_neg_active = int(pos.count_nonzero()), int(neg.count_nonzero())
    if n_drop > n_pos_active + n_neg_active:
        raise ValueError(f"cannot drop {n_drop} of {n_pos_active + n_neg_active} active weights")
    from_pos = min(math.ceil(n_drop / 2), n_pos_active)
    from_neg = min(n_drop - from_pos, n_neg_active)
    from_pos = n_drop - from_neg
    kept_pos = _topk_among(weights, pos, n_pos_active - from_pos)      # the largest positives stay
    kept_neg = _topk_among(-weights, neg, n_neg_active - from_neg)     # the most negative stay
    return kept_pos | kept_neg


def threshold_drop(weights: Tensor, mask: Tensor, threshold: float) -> Tensor:
    """The kept mask after dropping every active weight with |w| ≤ threshold (sparse_learning's
    ``threshold`` mode: the number dropped follows the weights, not a fraction)."""
    return mask & (weights.abs() > threshold)


def layer_scores(rule: str, weights: Sequence[Tensor], masks: Sequence[Tensor], momenta: Sequence[Tensor] | None,
                 threshold: float = 0.001) -> list[float]:
    """The share s_l of each layer in redistribution (sparse_learning's definitions), over the
    active weights A_l before the drop: ``momentum`` s_l = mean_{A_l} |m|; ``magnitude``
    s_l = mean_{A_l} |w|; ``nonzeros`` s_l = #{i ∈ A_l : |w_i| > threshold}. A layer without
    active weights scores 0."""
    out = []
    for i, (w, m) in enumerate(zip(weights, masks)):
        if not bool(m.any()):
            out.append(0.0)
        elif rule == "momentum":
            out.append(float(momenta[i][m].abs().mean()))
        elif rule == "magnitude":
            out.append(float(w[m].abs().mean()))
        elif rule == "nonzeros":
            out.append(float((w[m].abs() > threshold).sum()))
        else:
            raise ValueError(f"unknown redistribution {rule!r}; valid: {list(REDISTRIBUTIONS[1:])}")
    return out


def _topk_among(scores: Tensor, allowed: Tensor, k: int) -> Tensor:
    """Exactly ``k`` True at the largest ``scores`` among the ``allowed`` positions only (ties:
    lowest flat index). Selecting within the subset, rather than setting the others to -inf,
    keeps the count exact even when a score itself is -inf."""
    scores = scores.to(torch.float32)
    masked = torch.where(allowed, scores, torch.tensor(float("-inf"), device=scores.device))
    if int((masked > float("-inf")).count_nonzero()) >= k:
        return topk_mask(masked, k)  # the k winners are all allowed: same answer, no gather/scatter
    idx = allowed.reshape(-1).nonzero().squeeze(1)
    out = torch.zeros(allowed.numel(), dtype=torch.bool, device=allowed.device)
    out[idx[topk_mask(scores.reshape(-1)[idx].to(torch.float32), k)]] = True
    return out.view(allowed.shape)


def redistribute(layer_scores: Sequence[float], removed: Sequence[int], free: Sequence[int],
                 cap_fraction: float = 0.99) -> list[int]:
    """SNFS momentum redistribution: how many weights each layer regrows.

    Layer l gets the share p_l = s_l / Σ s_k of all R = Σ removed (s_l its mean |momentum|
    over active weights), at most ``cap_fraction`` of its free slots; what a full layer cannot
    take goes to the others. Floors plus largest remainders make the total exactly R.
    """
    total = int(sum(removed))
    n = len(removed)
    if total == 0:
        return [0] * n
    s = [max(0.0, float(x)) if math.isfinite(float(x)) else 0.0 for x in layer_scores]
    ssum = sum(s)
    p = [x / ssum for x in s] if ssum > 0 else [r / total for r in removed]
    cap = [int(math.floor(cap_fraction * f)) for f in free]
    if sum(cap) < total:
        cap = [int(f) for f in free]
    if sum(cap) < total:
        raise ValueError(f"cannot regrow {total} weights into {sum(cap)} free slots")
    grow = [0] * n
    left = total
    while left > 0:
        open_ = [i for i in range(n) if grow[i] < cap[i]]
        wsum = sum(p[i] for i in open_)
        shares = {i: (p[i] / wsum if wsum > 0 else 1 / len(open_)) * left for i in open_}
        floors = {i: int(math.floor(shares[i])) for i in open_}
        add = {i: min(cap[i] - grow[i], floors[i]) for i in open_}
        if all(floors[i] < cap[i] - grow[i] for i in open_):
            # no layer is full: the weights the floors leave go one each to the largest remainders
            rest = left - sum(add.values())
            for i in sorted(open_, key=lambda i: (-(shares[i] - floors[i]), i))[:rest]:
                add[i] += 1
        # else: a layer reached its cap; spread what is left over the others in the next round
        for i, a in add.items():
            grow[i] += a
            left -= a
    return grow


def _balance_spec(out_groups: int | None, in_groups: int | None) -> tuple[int, int] | None:
    """(dim, G) for balanced drop and grow, or None."""
    for what, value in (("balance_out_groups", out_groups), ("balance_in_groups", in_groups)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{what} must be an integer ≥ 1, got {value!r}")
    if out_groups is not None and in_groups is not None:
        raise ValueError("give balance_out_groups or balance_in_groups, not both")
    if out_groups is not None:
        return 0, out_groups
    return (1, in_groups) if in_groups is not None else None


def _grouped(t: Tensor, dim: int, groups: int) -> Tensor:
    """A (G, n/G) copy of ``t``: row g holds the g-th of G equal slices along ``dim``."""
    return t.movedim(dim, 0).reshape(groups, -1)


def _ungrouped(parts: Tensor, like: Tensor, dim: int) -> Tensor:
    return parts.reshape(like.movedim(dim, 0).shape).movedim(0, dim)


def _balanced_drop_and_grow(mask: Tensor, keep: Tensor, grow: Tensor, f: float, dim: int, groups: int) -> Tensor:
    """:func:`drop_and_grow` inside each of G groups along ``dim``, floor(f · n_active_g) each."""
    m, k, g = (_grouped(t, dim, groups) for t in (mask, keep, grow))
    rows = []
    for i in range(groups):
        n = int(math.floor(f * int(m[i].count_nonzero())))
        rows.append(drop_and_grow(m[i], k[i], g[i], n, n))
    return _ungrouped(torch.stack(rows), mask, dim)


class DST(SparsityAlgorithm):
    """Prune and regrow with any keep and grow score.

    drop_fraction: a float α (cosine-decayed from α to 0 at ``update.stop``, RigL's
      f(t) = α/2 · (1 + cos(π t / T_end))) or any schedule.
    update: when masks change (default every 100 steps until 75% of training).
    keep_score / grow_score: a name (``magnitude``, ``random``, ``gradient``, ``momentum``) or
      a function ``f(param, opt) -> tensor``.
    redistribution: ``"none"`` (each layer regrows what it dropped), or the total dropped shared
      by :func:`redistribute` in proportion to :func:`layer_scores`: ``"momentum"`` (SNFS),
      ``"magnitude"`` or ``"nonzeros"``.
    drop_rule: ``"keep_score"`` (drop the floor(f · n_active) lowest keep scores), ``"set"``
      (:func:`set_drop`, the same count split between positive and negative weights) or
      ``"threshold"`` (:func:`threshold_drop` with ``drop_threshold``; the drop fraction is unused).
    balance_out_groups / balance_in_groups: split each parameter's output rows (dim 0) or
      input columns (dim 1) into G equal groups, e.g. the heads of an attention projection;
      every group starts with round((1 − s) · n / G) active weights and drops and grows
      within itself, so each group keeps the same count (needs ``redistribution="none"``).
    """

    name = "dst"
    default_grow = "gradient"
    default_redistribution = "none"
    comparison_note = "generic base class (its defaults are rigl's)"

    def __init__(
        self,
        sparsity: float = 0.9,
        distribution: str | Callable = "uniform",
        drop_fraction: float | Schedule = 0.3,
        update: UpdateSchedule | None = None,
        keep_score: str | Callable = "magnitude",
        grow_score: str | Callable | None = None,
        redistribution: str | None = None,
        balance_out_groups: int | None = None,
        balance_in_groups: int | None = None,
        drop_rule: str = "keep_score",
        drop_threshold: float = 0.001,
        **kwargs,
    ):
        if str(drop_rule).lower() not in DROP_RULES:
            raise ValueError(f"unknown drop_rule {drop_rule!r}; valid: {list(DROP_RULES)}")
        if isinstance(drop_threshold, bool) or not isinstance(drop_threshold, (int, float)) or drop_threshold < 0:
            raise ValueError(f"drop_threshold must be a number ≥ 0, got {drop_threshold!r}")
        update = update if update is not None else UpdateSchedule(freq=100, stop=0.75)
        super().__init__(sparsity, distribution, update=update, **kwargs)
        check_levels(drop_fraction, 0.0, 1.0, "drop_fraction")
        if isinstance(drop_fraction, Schedule):
            self.drop_fraction = drop_fraction
        else:
            stop = update.stop if update.stop is not None else 1.0
            self.drop_fraction = Cosine(float(drop_fraction), half_period=stop)
        self.keep_score = resolve_score(keep_score, "keep score")
        self.grow_score = resolve_score(grow_score or self.default_grow, "grow score")
        self.redistribution = (redistribution or self.default_redistribution).lower()
        if self.redistribution not in REDISTRIBUTIONS:
            raise ValueError(f"unknown redistribution {redistribution!r}; valid: {list(REDISTRIBUTIONS)}")
        self.drop_rule, self.drop_threshold = str(drop_rule).lower(), float(drop_threshold)
        self.balance_out_groups, self.balance_in_groups = balance_out_groups, balance_in_groups
        self._balance = _balance_spec(balance_out_groups, balance_in_groups)
        if self._balance is not None and self.drop_rule != "keep_score":
            raise ValueError(f"balance_out_groups / balance_in_groups need drop_rule='keep_score', not {drop_rule!r}")
        if self._balance is not None and self.redistribution != "none":
            raise ValueError("balance_out_groups / balance_in_groups keep every group's count, so they "
                             f"need redistribution='none', not {self.redistribution!r}")
        if self._balance is not None and self.init_method == "from_zeros":
            raise ValueError("balance_out_groups / balance_in_groups need init_method 'random' or 'topk': "
                             "a mask taken from the weights' zeros is not balanced")

    def initial_sparsities(self, params: Sequence[SparseParam]) -> list[float]:
        if self._balance is not None:
            dim, groups = self._balance
            for sp in params:
                size = sp.param.shape[dim] if sp.param.dim() > dim else 0
                if size % groups:
                    what = "balance_out_groups" if dim == 0 else "balance_in_groups"
                    raise ValueError(f"{what}={groups} does not divide the {size} "
                                     f"{'rows' if dim == 0 else 'columns'} of {sp.name} {tuple(sp.param.shape)}")
        return super().initial_sparsities(params)

    @torch.no_grad()
    def initial_masks(self, params: Sequence[SparseParam], sparsities: Sequence[float], setup: Setup) -> list[Tensor]:
        if self._balance is None:
            return super().initial_masks(params, sparsities, setup)
        seed = setup.seed
        dim, groups = self._balance
        masks = []
        for sp, s in zip(params, sparsities):
            w = sp.param.detach()
            score = w.abs() if self.init_method == "topk" else \
                torch.rand(w.shape, generator=generator_for(seed, 0, sp.name)).to(w.device)
            parts = _grouped(score, dim, groups)
            k = n_keep(parts.shape[1], s)
            masks.append(_ungrouped(torch.stack([topk_mask(row, k) for row in parts]), w, dim))
        return masks

    def _score(self, fn, sp: SparseParam, optimizer, seed: int, step: int, what: str) -> Tensor:
        kwargs = {"generator": generator_for(seed, step, sp.name)} if accepts_generator(fn) else {}
        return checked_score(fn(sp.param, optimizer, **kwargs), sp.param, what, fn, sp.name).detach()

    @torch.no_grad()
    def update_masks(self, params, optimizer, clock: Clock, seed: int) -> list[Tensor] | None:
        f = float(self.drop_fraction(clock))
        if f <= 0 and self.drop_rule != "threshold":
            return None
        masks = [sp.mask for sp in params]
        active = [int(m.count_nonzero()) for m in masks]
        weights = [sp.param.detach() for sp in params]
        grow = [self._score(self.grow_score, sp, optimizer, seed, clock.step, "grow score") for sp in params]
        if self.drop_rule == "threshold":
            kept = [threshold_drop(w, m, self.drop_threshold) for w, m in zip(weights, masks)]
        else:
            n_drop = [int(math.floor(f * a)) for a in active]
            if self.drop_rule == "set":
                kept = [set_drop(w, m, d) for w, m, d in zip(weights, masks, n_drop)]
            else:
                keep = [self._score(self.keep_score, sp, optimizer, seed, clock.step, "keep score") for sp in params]
                if self._balance is not None:
                    return [_balanced_drop_and_grow(m, k, g, f, *self._balance) for m, k, g in zip(masks, keep, grow)]
                kept = [_topk_among(k, m, a - d) for k, m, a, d in zip(keep, masks, active, n_drop)]
        dropped = [a - int(k.count_nonzero()) for a, k in zip(active, kept)]
        n_grow = list(dropped)
        if self.redistribution != "none":
            momenta = ([self._score(resolve_score("momentum"), sp, optimizer, seed, clock.step, "momentum")
                        for sp in params] if self.redistribution == "momentum" else None)
            shares = layer_scores(self.redistribution, weights, masks, momenta, self.drop_threshold)
            n_grow = redistribute(shares, dropped, [k.numel() - int(k.count_nonzero()) for k in kept])
        return [grow_into(k, g, n) for k, g, n in zip(kept, grow, n_grow)]

    @property
    def keeps_count(self) -> bool:  # type: ignore[override]
        return self.redistribution == "none"

    def compact_reason(self) -> str | None:
        if self.grow_score is gradient_momentum:
            return ("it grows by the momentum of every position, inactive ones included: a dense state sparse "
                    "execution does not keep")
        known = (weight_magnitude, random_score, gradient_magnitude, gradient_momentum)
        custom = [f for f in (self.keep_score, self.grow_score) if f not in known]
        if custom:
            return (f"a custom score ({getattr(custom[0], '__name__', custom[0])}) may read the state of inactive "
                    "weights, which sparse execution does not keep")
        return None


@register
class SET(DST):
    """SET (Mocanu et al. 2018): drop the smallest |w|, grow at random."""

    name = "set"
    default_grow = "random"
    comparison_note = None


@register
class RigL(DST):
    """RigL (Evci et al. 2020): drop the smallest |w|, grow the largest |gradient|."""

    name = "rigl"
    default_grow = "gradient"
    comparison_note = None


@register
class SNFS(DST):
    """SNFS (Dettmers & Zettlemoyer 2019): grow the largest |momentum|, with momentum
    redistribution of growth across layers."""

    name = "snfs"
    default_grow = "momentum"
    default_redistribution = "momentum"
    comparison_note = None


register(DST)
