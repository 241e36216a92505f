"""The engine on parameters sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``).

Each rank holds the rows of its shard of every weight, of its mask (a DTensor buffer placed like
the weight, see :mod:`fastsparse.core.sharded`), of its gradient and of its optimizer state.

* Applying masks: the local weight and the local mask, as on one process (no collective).
* First masks: the algorithm chooses them as one process would. A random mask needs no
  weights (each rank draws the whole tensor from the seeded generator and keeps its rows); a
  mask from the weights (``init_method`` ``topk`` or ``from_zeros``) gathers each layer once, at attach.
* Updates (static masks, and the drop-and-grow family: SET, RigL, any keep and grow score with
  ``drop_rule="keep_score"`` and no redistribution): per layer, one all_reduce of the active
  count, then two exact selections (drop, grow), each a few all_reduces of 256 counts
  (:func:`~fastsparse.core.sharded.sharded_topk_among`). No layer is gathered.
* Gradual pruning (GMP, GraNet; weight granularity, local or global scope): one process's
  ``select_masks`` on the shards (:func:`sharded_select_masks`: global scope selects over every
  layer's shards at once, each layer's best weight reserved); GraNet then drops and grows per
  layer as RigL does.
* The rank check: the masks have no replica to compare, so the ranks compare what they must
  agree on: per layer, the name, global shape, the seed, the count this rank expects the layer
  to hold, the count the shards hold together and the SHA-256 of the shards' digests in rank order.

Everything else (other methods, their recipes, sparse execution) is refused with the reason.
"""
from __future__ import annotations

import hashlib
import math
import struct
from typing import Any, Sequence

import torch
from torch import Tensor

from ..algorithms.base import SparsityAlgorithm, generator_for
from ..algorithms.dst import DST
from ..algorithms.gmp import GMP, GraNet
from ..core.errors import MaskDisagreement
from ..core.masks import SparseParam, n_keep
from ..core.schedules import Clock
from ..core.scores import accepts_generator, checked_score
from ..core.sharded import (
    TRAFFIC, global_count, is_sharded, local, shard_rows, sharded_first_max, sharded_topk_among,
    sharded_topk_over, totals_like,
)
from .recipe import EntryPointRefused

__all__ = ["is_fsdp", "check_fsdp", "full_views", "localized", "sharded_update", "check_sharded_agreement",
           "shard_digest", "full_model_state", "whole_union", "local_rows", "sharded_select_masks"]


def is_fsdp(params: Sequence[Any]) -> bool:
    """Whether the engine's parameters are DTensors (the model was ``fully_shard``-ed)."""
    return any(is_sharded(getattr(sp, "param", None)) for sp in params)


def _supported(alg: SparsityAlgorithm) -> str | None:
    """Why ``alg`` cannot run on sharded parameters (None: it can)."""
    if type(alg) is SparsityAlgorithm or (type(alg).update_masks is SparsityAlgorithm.update_masks
                                          and type(alg).initial_masks is SparsityAlgorithm.initial_masks):
        return None
    if isinstance(alg, DST):
        if alg.drop_rule != "keep_score":
            return f"drop_rule={alg.drop_rule!r} (use 'keep_score')"
        if alg.redistribution != "none":
            return f"redistribution={alg.redistribution!r} (use 'none')"
        if alg._balance is not None:
            return "balance_out_groups / balance_in_groups"
        if type(alg).update_masks is not DST.update_masks or type(alg).initial_masks is not DST.initial_masks:
            return f"{type(alg).__name__} overrides how masks are chosen"
        return None
    if type(alg) in (GMP, GraNet):
        return f"granularity={alg.granularity!r} (use 'weight')" if alg.granularity != "weight" else None
    return "it is not one of the methods offered under FSDP"


def check_fsdp(groups: Sequence[Any], execution: Any) -> None:
    """Refuse, before anything changes, what the engine does not run on sharded parameters."""
    if execution != "masked":
        raise EntryPointRefused(f"execution={execution!r} is not offered with FSDP (fully_shard): sparse execution "
                                "stores Linear weights as their active values, which FSDP does not shard; use "
                                "execution='masked' under FSDP (sparse execution runs in one process)")
    for g in groups:
        for sp in g.params:
            if not is_sharded(sp.param):
                raise EntryPointRefused(f"{sp.name} is not sharded while other weights are: apply fully_shard to "
                                        "every module holding a sparse weight (or to none)")
            shard_rows(sp.param)   # one placement: Shard(0) on a 1-D mesh
        why = _supported(g.algorithm)
        if why is not None or g.recipe is not None:
            raise EntryPointRefused(
                f"{g.algorithm.name} does not run on FSDP-sharded weights: {why or 'its recipe works on whole layers'}."
                " Under FSDP use static masks, set, rigl or dst (drop_rule='keep_score', no redistribution, "
                "no balance), gmp or granet (granularity 'weight'), or train this method with DDP")


class _FullView:
    """What ``initial_masks`` reads of a parameter: its name and its whole value (or only its shape)."""

    def __init__(self, sp: SparseParam, gather: bool):
        self.name, self.module, self.attr = sp.name, sp.module, sp.attr
        self.param = sp.param.full_tensor() if gather else sp.param


def full_views(alg: SparsityAlgorithm, params: Sequence[SparseParam]) -> list[Any]:
    """The parameters as ``initial_masks`` needs them: gathered once when the first masks come from
    the weights, as they are (the global shape is enough) for random masks."""
    gather = getattr(alg, "init_method", "random") != "random"
    return [_FullView(sp, gather) for sp in params]


def localized(score: Tensor, like: Tensor) -> Tensor:
    """A score of the parameter's global shape as this rank's rows: a DTensor's local shard, or the
    rows of a full tensor (a random score each rank draws whole from the same seeded generator)."""
    if is_sharded(score):
        return local(score)
    start, n = shard_rows(like)
    return score.narrow(0, start, n)


def _local_score(fn: Any, sp: SparseParam, optimizer: Any, seed: int, step: int, what: str) -> Tensor:
    """``fn``'s score of the sharded parameter, this rank's rows. Its shape is checked here; NaN by the
    selection, over every shard at once (a check on the DTensor would be a collective of its own)."""
    kwargs = {"generator": generator_for(seed, step, sp.name)} if accepts_generator(fn) else {}
    score = checked_score(fn(sp.param, optimizer, **kwargs), sp.param, what, fn, sp.name, nan=False)
    return localized(score.detach(), sp.param)


@torch.no_grad()
def sharded_update(alg: SparsityAlgorithm, params: Sequence[SparseParam], optimizer: Any, clock: Clock,
                   seed: int) -> tuple[list[Tensor], list[int], list[Tensor] | None] | None:
    """:meth:`DST.update_masks`, :meth:`GMP.update_masks` or :meth:`GraNet.update_masks` on the
    shards: the local new masks, each layer's expected count and the positions grown (None: the
    new active ones).

    DST, per layer, as on one process: a = active count, d = floor(f · a); keep the a − d active
    weights with the largest keep score; grow d among the others by the grow score.
    """
    if type(alg) in (GMP, GraNet):
        return _gmp_update(alg, params, clock)
    if not isinstance(alg, DST):
        return None
    f = float(alg.drop_fraction(clock))
    if f <= 0:
        return None
    out, counts = [], []
    for sp in params:
        mask = local(sp.mask)
        a = global_count(sp.mask)
        d = int(math.floor(f * a))
        keep = _local_score(alg.keep_score, sp, optimizer, seed, clock.step, "keep score")
        grow = _local_score(alg.grow_score, sp, optimizer, seed, clock.step, "grow score")
        kept = sharded_topk_among(keep.to(torch.float32), mask, a - d, sp.param)
        grown = sharded_topk_among(grow.to(torch.float32), ~kept, d, sp.param)
        out.append(kept | grown)
        counts.append(a)
    return out, counts, None


def _biased(score: Tensor, active: Tensor, grow: bool) -> Tensor:
    """As one process keeps pruning nested: shrinking, inactive weights last (−inf); growing, every
    active weight first (+inf)."""
    inf = torch.tensor(float("inf"), dtype=score.dtype, device=score.device)
    return torch.where(active, inf, score) if grow else torch.where(active, score, -inf)


def sharded_select_masks(scores: Sequence[Tensor], masks: Sequence[Tensor], sparsity: float | Sequence[float],
                         scope: str, likes: Sequence[Tensor]) -> tuple[list[Tensor], list[int]]:
    """:func:`~fastsparse.core.structured.select_masks` at weight granularity (nested in ``masks``,
    global scope with each layer's best weight reserved) on local shards of tensors sharded like
    ``likes``: this rank's parts of the masks one process computes, and the count of each.
    Local: per layer k = n_keep(N, s_l), the k largest biased scores. Global: k = max(n_keep(Σ N,
    s), the number of reserved weights), over every layer at once."""
    likes = list(likes)
    scores = [sc.to(torch.float32) for sc in scores]
    actives = totals_like([int(m.count_nonzero()) for m in masks], likes[0])
    numels = [like.numel() for like in likes]
    if scope == "global":
        total, n_active = sum(numels), sum(actives)
        target = n_keep(total, float(sparsity))
        biased = [_biased(sc, m, target > n_active) for sc, m in zip(scores, masks)]
        reserved, n_reserved = sharded_first_max(biased, likes)
        biased = [torch.where(r, torch.tensor(float("inf")), b) for r, b in zip(reserved, biased)]
        new = sharded_topk_over(biased, min(total, max(target, n_reserved)), likes)
        return new, totals_like([int(n.count_nonzero()) for n in new], likes[0])
    sps = [float(sparsity)] * len(likes) if isinstance(sparsity, (int, float)) else [float(x) for x in sparsity]
    counts = [n_keep(n, x) for n, x in zip(numels, sps)]
    new = [sharded_topk_among(_biased(sc, m, k > a), torch.ones_like(m), k, like)
           for sc, m, k, a, like in zip(scores, masks, counts, actives, likes)]
    return new, counts


def _gmp_update(alg: GMP, params: Sequence[SparseParam],
                clock: Clock) -> tuple[list[Tensor], list[int], list[Tensor] | None] | None:
    """:meth:`GMP.prune` on the shards, None when no layer's count changes (as one process); for
    GraNet then, per layer, n = ceil(r_t · a) of the a weights left: keep the a − n largest |w|,
    grow n by |gradient| among the others (the grown ones named: zeroed, even one just pruned)."""
    likes = [sp.param for sp in params]
    masks = [local(sp.mask) for sp in params]
    scores = [local(sp.param).detach().abs() for sp in params]
    actives = totals_like([int(m.count_nonzero()) for m in masks], likes[0])
    numels = [sp.param.numel() for sp in params]
    targets = alg.target_sparsities(params, clock)
    if alg.scope == "global":
        sparsity: float | list[float] = max(targets[0], 1.0 - sum(actives) / sum(numels))
    else:
        sparsity = [max(t, 1.0 - a / n) for t, a, n in zip(targets, actives, numels)]
    new, counts = sharded_select_masks(scores, masks, sparsity, alg.scope, likes)
    if not isinstance(alg, GraNet):
        return None if counts == actives else (new, counts, None)
    r = float(alg.regrow_fraction(clock))
    if r <= 0:
        return new, counts, None
    out, grown = [], []
    for sp, pruned, a, like in zip(params, new, counts, likes):
        if sp.param.grad is None:
            raise RuntimeError(f"GraNet regrows by gradient, but {sp.name}.grad is None: the engine must "
                               "update masks after loss.backward() and before zero_grad()")
        n = int(math.ceil(r * a))
        kept = sharded_topk_among(local(sp.param).detach().abs().to(torch.float32), pruned, a - n, like)
        grow = sharded_topk_among(local(sp.param.grad).detach().abs().to(torch.float32), ~kept, n, like)
        out.append(kept | grow)
        grown.append(grow & ~pruned)
    return out, counts, grown


def shard_digest(name: str, mask: Tensor) -> bytes:
    """SHA-256 of a layer's name, global shape, this shard's first row and its bits."""
    start, _ = shard_rows(mask)
    h = hashlib.sha256(f"{name}|{tuple(mask.shape)}|{start}|".encode())
    h.update(local(mask).detach().cpu().reshape(-1).to(torch.uint8).numpy().tobytes())
    return h.digest()


def check_sharded_agreement(names: Sequence[str], masks: Sequence[Tensor], expected: Sequence[int], seed: int,
                            step: int) -> list[str]:
    """Raise :class:`MaskDisagreement` on every rank if the ranks disagree on the sharded masks.

    First the number of layers (an all_reduce of min and max), then per layer an all_gather of
    the shard's digest and its count (40 bytes a rank), then min and max of the rows every rank
    computes: [SHA-256 of (name, global shape, seed, expected count), the shards' total count,
    this rank's expected count, the SHA-256 of the digests in rank order]. Returns the layers'
    global digests (hex)."""
    import torch.distributed as dist

    from .distributed import _collective_device, _min_max, check_same_count

    device = _collective_device()
    check_same_count(len(masks), step)
    rows, digests = [], []
    for name, m, e in zip(names, masks, expected):
        mine = torch.tensor(list(struct.unpack("<4q", shard_digest(name, m))) + [int(local(m).count_nonzero())],
                            dtype=torch.int64, device=device)
        world = dist.get_world_size(m.device_mesh.get_group())
        every = torch.zeros(world * 5, dtype=torch.int64, device=device)
        dist.all_gather_into_tensor(every, mine, group=m.device_mesh.get_group())
        TRAFFIC.add(mine, world)
        every = every.view(world, 5).cpu()
        total = int(every[:, 4].sum())
        glob = hashlib.sha256(every[:, :4].numpy().tobytes()).digest()
        ident = hashlib.sha256(f"{name}|{tuple(m.shape)}|{seed}|{e}".encode()).digest()
        rows.append(list(struct.unpack("<4q", ident)) + [total, int(e)] + list(struct.unpack("<4q", glob)))
        digests.append(glob.hex())
    if not rows:
        return digests
    lo, hi = _min_max(torch.tensor(rows, dtype=torch.int64, device=device))
    differ = (hi != lo).any(dim=1)
    short = [n for n, r in zip(names, rows) if r[4] != r[5]]
    if bool(differ.any()) or short:
        bad = [n for n, d, r in zip(names, differ.tolist(), rows) if d or r[4] != r[5]]
        raise MaskDisagreement(
            f"at step {step} the ranks disagree on the sharded masks of {bad} (the layer, the seed, the count "
            f"each rank expects or the count the shards hold together; shards off their count: {short}). Every rank "
            "must run the same method with the same seed on the same model, and nothing but the engine may change "
            "the masks")
    return digests


# --- whole state (comparisons in tests, the explored positions of the engine state) ------------
def _whole(value: Any) -> Any:
    return value.full_tensor().detach().cpu() if is_sharded(value) else value


def full_model_state(model: Any) -> dict[str, Tensor]:
    """``model.state_dict()`` with every sharded tensor gathered whole (a collective: call it on every rank)."""
    return {k: _whole(v) for k, v in model.state_dict().items()}


def whole_union(union: Tensor, like: Tensor) -> Tensor:
    """A layer's explored positions over every rank (``union`` holds this rank's rows)."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(union, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                              stride=like.stride()).full_tensor()


def local_rows(whole: Tensor, like: Tensor) -> Tensor:
    start, n = shard_rows(like)
    return whole.narrow(0, start, n).clone()
