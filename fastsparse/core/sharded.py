"""Masks of parameters sharded by FSDP2 (``fully_shard``: DTensor parameters, ``Shard(0)``).

A sharded parameter's mask is a DTensor buffer with the parameter's mesh and placements: each
rank holds the mask rows of its own shard, ``state_dict`` and ``torch.distributed.checkpoint``
shard it like the weight, and applying it works on the two local tensors (no collective).

Selection is exact without gathering a layer: :func:`sharded_topk_among` finds the k-th
largest score among the allowed positions by a radix select over the scores' float32 bit
patterns (4 rounds of an all_reduce of a 256-bin histogram), then gives ties at the threshold
to the lowest global flat index (one all_gather of each rank's tie count). ``Shard(0)`` of a
contiguous tensor gives rank r the r-th contiguous range of the flattened tensor, so the lowest
global index is "lower ranks first, then the lower local index": the rule of
:func:`fastsparse.core.masks.topk_mask`, so the masks are those one process computes.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .errors import MaskDisagreement

__all__ = ["is_sharded", "local", "shard_rows", "shard_like", "global_count", "count_like", "total_like", "sharded_topk_among",
           "sharded_topk_over", "sharded_first_max", "totals_like", "SelectionTraffic", "TRAFFIC"]

_BINS = 256
_ROUNDS = 4        # 8 bits of the 32-bit key per round
_BOUNDED_FROM = 1 << 18   # layers this large first bound the threshold from a sample (as on one process)
_SAMPLE = 256             # sampled scores per rank


def is_sharded(t: Any) -> bool:
    """A DTensor (a parameter or buffer of a ``fully_shard``-ed module)."""
    return hasattr(t, "to_local") and hasattr(t, "device_mesh")


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (sharing its storage), or ``t`` itself."""
    return t.to_local() if is_sharded(t) else t


def _check_placement(dt: Tensor) -> None:
    from torch.distributed.tensor import Shard

    if dt.device_mesh.ndim != 1 or list(dt.placements) != [Shard(0)]:
        raise ValueError(f"sharded masks need a parameter sharded as fully_shard does (a 1-D mesh, Shard(0)); "
                         f"this one has mesh {dt.device_mesh} and placements {dt.placements}")


def shard_rows(dt: Tensor) -> tuple[int, int]:
    """(first row, number of rows) of this rank's shard of ``dt`` along dim 0 (torch.chunk's split)."""
    _check_placement(dt)
    rows = dt.shape[0]
    world = dt.device_mesh.size()
    me = dt.device_mesh.get_local_rank()
    per = -(-rows // world)
    start = min(rows, me * per)
    return start, min(rows, start + per) - start


def shard_like(full: Tensor, dt: Tensor) -> Tensor:
    """The DTensor holding this rank's rows of the full tensor ``full``, placed like ``dt``."""
    from torch.distributed.tensor import DTensor

    start, n = shard_rows(dt)
    part = full.narrow(0, start, n).to(local(dt).device).contiguous()
    return DTensor.from_local(part, dt.device_mesh, dt.placements, run_check=False,
                              shape=dt.shape, stride=full.contiguous().stride())


def _group(dt: Tensor):
    return dt.device_mesh.get_group()


def _collective_device(dt: Tensor) -> torch.device:
    return local(dt).device


class SelectionTraffic:
    """Bytes and calls of the collectives the sharded selection made (for the benchmark)."""

    def __init__(self) -> None:
        self.bytes = 0
        self.calls = 0

    def add(self, t: Tensor, world: int = 1) -> None:
        self.bytes += t.numel() * t.element_size() * world
        self.calls += 1


TRAFFIC = SelectionTraffic()


def _all_reduce(t: Tensor, group) -> Tensor:
    import torch.distributed as dist

    dist.all_reduce(t, group=group)
    TRAFFIC.add(t)
    return t


def global_count(mask: Tensor) -> int:
    """The number of True of a (possibly sharded) bool mask over all its shards."""
    return count_like(local(mask), mask)


def count_like(part: Tensor, like: Tensor) -> int:
    """The number of True of ``part``, this rank's local rows of a tensor sharded like ``like``, over
    every rank (``part`` itself when ``like`` is not sharded)."""
    return total_like(int(part.count_nonzero()), like)


def total_like(n: int, like: Tensor) -> int:
    """The sum of ``n`` over the ranks that shard ``like`` (``n`` itself when it is not sharded)."""
    if not is_sharded(like):
        return int(n)
    t = torch.tensor([int(n)], dtype=torch.int64, device=_collective_device(like))
    return int(_all_reduce(t, _group(like))[0])


def totals_like(ns: list[int], like: Tensor) -> list[int]:
    """Each of ``ns`` summed over the ranks that shard ``like``: one all_reduce for them all."""
    if not is_sharded(like) or not ns:
        return [int(n) for n in ns]
    t = torch.tensor([int(n) for n in ns], dtype=torch.int64, device=_collective_device(like))
    return [int(x) for x in _all_reduce(t, _group(like)).cpu().tolist()]


def _keys(scores: Tensor) -> Tensor:
    """Order-preserving int32 keys of float32 scores: signed comparison of the keys is the float
    comparison (−0.0 counts as +0.0, as ``==`` does): negative floats get their 31 low bits flipped."""
    bits = (scores.to(torch.float32) + 0.0).view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _beyond_bound(where: Tensor, values: Tensor, k: int, group, device) -> tuple[Tensor, Tensor]:
    """The allowed positions worth selecting among: on a large layer, when k is at most half of the
    allowed positions, those at or above a bound b that the k-th largest very probably passes,
    from a fixed pseudo-random sample of every shard (all_gather of _SAMPLE + 1 float64 a rank;
    every rank derives the same b). If at least k positions reach b over all shards (one
    all_reduce), the k-th largest is >= b, so selecting among them gives the same answer; else,
    or when k is large, every allowed position stays (a missed bound only costs time)."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    pick = torch.randint(max(1, values.numel()), (_SAMPLE,), generator=torch.Generator().manual_seed(0))
    sample = values[pick].to(torch.float64) if values.numel() else torch.full((_SAMPLE,), float("nan"),
                                                                                dtype=torch.float64)
    mine = torch.cat([torch.tensor([float(values.numel())], dtype=torch.float64), sample]).to(device)
    every = torch.zeros(world * (_SAMPLE + 1), dtype=torch.float64, device=device)
    dist.all_gather_into_tensor(every, mine, group=group)
    TRAFFIC.add(mine, world)
    every = every.view(world, _SAMPLE + 1).cpu()
    total = int(every[:, 0].sum())
    pooled = every[every[:, 0] > 0, 1:].reshape(-1)
    pooled = pooled[~torch.isnan(pooled)]
    use = 0 < k <= total // 2 and pooled.numel() > 0
    if use:
        expected = k * pooled.numel() / total
        j = min(pooled.numel(), int(expected + 4.0 * expected ** 0.5) + 16)
        bound = float(pooled.topk(j).values.min())
        beyond = values >= bound
        n = int(beyond.count_nonzero())
    n_all = torch.tensor([n if use else 0], dtype=torch.int64, device=device)
    if int(_all_reduce(n_all, group)[0]) >= k and use:
        return where[beyond], values[beyond]
    return where, values


def _radix_threshold(keys: Tensor, nan: int, k: int, group, device) -> tuple[int, int]:
    """The k-th largest of the keys of every rank (signed int32) and how many of the keys equal to
    it are kept (the others above it all are): 4 rounds, each an all_reduce of a 256-bin histogram
    of the next 8 bits of the candidates' keys; the first also carries the NaN count, k and k²."""
    import torch.distributed as dist

    # the radix select walks the keys as unsigned numbers: the sign bit flipped
    top = (keys >> 24) + 128
    prefix, need = 0, int(k)
    candidates: Tensor | None = None
    for r in range(_ROUNDS):
        shift = 8 * (_ROUNDS - 1 - r)
        if r == 0:
            digits = top
        else:
            digits = (candidates >> shift) & 0xFF
        hist = torch.bincount(digits.reshape(-1), minlength=_BINS).to(torch.int64)
        if r == 0:   # with the NaN count and k, k² (every rank asked for the same k iff Σk² · W = (Σk)²)
            hist = torch.cat([hist, torch.tensor([nan, int(k), int(k) ** 2, 1], dtype=torch.int64)])
        hist = _all_reduce(hist.to(device), group).cpu()
        if r == 0:
            (nan_total, k_sum, k_sq, world), hist = hist[_BINS:].tolist(), hist[:_BINS]
            total = int(hist.sum())
            if k_sq * world != k_sum * k_sum:
                raise MaskDisagreement(f"the ranks ask for different numbers of weights of one layer (this rank, "
                                       f"{dist.get_rank()}, for {k}): every rank must run the same method with the "
                                       "same settings on the same model")
            if nan_total:
                raise ValueError(f"scores contain NaN ({nan_total} over the shards); a score function must "
                                 "return finite numbers or ±inf")
            if not 0 <= need <= total:
                raise ValueError(f"cannot keep {k} of {total} entries")
        # the digit d of the need-th largest candidate: the smallest d with fewer than need candidates above it
        above_d = hist.flip(0).cumsum(0).flip(0) - hist     # how many candidates have a larger digit
        d = int((above_d < need).nonzero().min()) if 0 < need <= int(hist.sum()) else 0
        need -= int(above_d[d]) if need > 0 else 0
        prefix |= d << shift
        candidates = keys[top == d] if r == 0 else candidates[digits == d]
    return prefix - (1 << 31), need   # back to the signed keys


def sharded_topk_among(scores: Tensor, allowed: Tensor, k: int, like: Tensor) -> Tensor:
    """This rank's part of the global mask with exactly ``k`` True at the largest ``scores`` among
    the ``allowed`` positions, ties to the lowest global flat index.

    ``scores`` and ``allowed`` are this rank's local shards of a tensor sharded like the DTensor
    ``like``. Every rank makes the same fixed sequence of collectives (whatever its data or its
    ``k``), so ranks that disagree get wrong masks, which the rank check then reports, never a hang.
    Communicated: one all_reduce of 260 int64 (histogram, NaN count, k, k², ranks), three of 256, one
    all_gather of one int64 per rank.
    """
    import torch.distributed as dist

    group, device = _group(like), _collective_device(like)
    flat, ok = scores.reshape(-1), allowed.reshape(-1)
    where = ok.nonzero().squeeze(1)      # the allowed positions: all the work below is on them only
    values = flat[where]
    nan = int(torch.isnan(values).count_nonzero()) if values.is_floating_point() else 0
    if like.numel() >= _BOUNDED_FROM:
        where, values = _beyond_bound(where, values, int(k), group, device)
    keys = _keys(values)
    threshold, need = _radix_threshold(keys, nan, int(k), group, device)
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    tied = where[:0]
    if k > 0:
        keep[where[keys > threshold]] = True
        tied = where[keys == threshold]
    counts = torch.zeros(dist.get_world_size(group), dtype=torch.int64, device=device)
    mine = torch.tensor([tied.numel()], dtype=torch.int64, device=device)
    dist.all_gather_into_tensor(counts, mine, group=group)
    TRAFFIC.add(mine, dist.get_world_size(group))
    me = like.device_mesh.get_local_rank()
    before = int(counts[:me].sum())
    take = max(0, min(tied.numel(), need - before)) if k > 0 else 0
    keep[tied[:take]] = True
    return keep.view(allowed.shape)


def sharded_topk_over(scores: list[Tensor], k: int, likes: list[Tensor]) -> list[Tensor]:
    """This rank's parts of the masks with exactly ``k`` True over several sharded tensors together
    (a global selection), at the largest scores, ties to the lowest index of their concatenation
    (tensor by tensor, each in flat order): :func:`fastsparse.core.masks.topk_mask` of the
    concatenated whole scores, cut back into the tensors. ``scores[i]`` is this rank's local
    shard of a tensor sharded like ``likes[i]`` (one mesh). The radix select of
    :func:`sharded_topk_among` on every local score at once, then one all_gather of each rank's tie
    count per tensor: tensor i's ties on rank r come after every tie of the tensors before i and
    those of tensor i on the ranks before r."""
    import torch.distributed as dist

    like = likes[0]
    group, device = _group(like), _collective_device(like)
    flats = [s.reshape(-1) for s in scores]
    values = torch.cat(flats) if flats else torch.zeros(0)
    nan = int(torch.isnan(values).count_nonzero())
    keys = _keys(values)
    threshold, need = _radix_threshold(keys, nan, int(k), group, device)
    sizes = [f.numel() for f in flats]
    keep = (keys > threshold) if k > 0 else torch.zeros_like(keys, dtype=torch.bool)
    tied = (keys == threshold) if k > 0 else torch.zeros_like(keys, dtype=torch.bool)
    mine = torch.tensor([int(t.count_nonzero()) for t in tied.split(sizes)], dtype=torch.int64, device=device)
    world = dist.get_world_size(group)
    every = torch.zeros(world * len(sizes), dtype=torch.int64, device=device)
    dist.all_gather_into_tensor(every, mine, group=group)
    TRAFFIC.add(mine, world)
    every = every.view(world, len(sizes)).cpu()
    me = like.device_mesh.get_local_rank()
    out, start = [], 0
    for i, (n, s) in enumerate(zip(sizes, scores)):
        before = int(every[:, :i].sum()) + int(every[:me, i].sum())
        part_keep, part_tied = keep[start:start + n], tied[start:start + n]
        where = part_tied.nonzero().squeeze(1)
        take = max(0, min(where.numel(), need - before)) if k > 0 else 0
        part_keep[where[:take]] = True
        out.append(part_keep.view(s.shape))
        start += n
    return out


def sharded_first_max(scores: list[Tensor], likes: list[Tensor]) -> tuple[list[Tensor], int]:
    """Per sharded tensor, this rank's part of a mask holding its largest score's first position
    in global flat order (``argmax`` of the whole tensor), none when every score is −inf; and how
    many tensors have one. An all_reduce of the maxima (MAX), one of the first global positions
    holding them (MIN)."""
    import torch.distributed as dist

    like = likes[0]
    group, device = _group(like), _collective_device(like)
    top = torch.tensor([float(s.max()) if s.numel() else float("-inf") for s in scores], dtype=torch.float64,
                       device=device)
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    TRAFFIC.add(top)
    top = top.cpu()
    none = torch.iinfo(torch.int64).max
    first = []
    for s, l, m in zip(scores, likes, top.tolist()):
        start, _ = shard_rows(l)
        at = (s.reshape(-1).to(torch.float64) == m).nonzero()
        offset = start * (l.numel() // max(1, l.shape[0]))
        first.append(offset + int(at[0]) if at.numel() and m > float("-inf") else none)
    first_t = torch.tensor(first, dtype=torch.int64, device=device)
    dist.all_reduce(first_t, op=dist.ReduceOp.MIN, group=group)
    TRAFFIC.add(first_t)
    out, found = [], first_t.cpu().tolist()
    for s, l, f in zip(scores, likes, found):
        start, _ = shard_rows(l)
        offset = start * (l.numel() // max(1, l.shape[0]))
        mask = torch.zeros(s.numel(), dtype=torch.bool, device=s.device)
        if f != none and offset <= f < offset + s.numel():
            mask[f - offset] = True
        out.append(mask.view(s.shape))
    return out, sum(f != none for f in found)
