"""Compressed sparse row structures of a sparse (out, in) weight, built, changed and searched
without ever forming a dense tensor: the ground of sparse execution (:mod:`.sparse_linear`).

* :class:`CSRStructure`: CSR of W (``crow``, ``col``) and of W^T (``crow_t``, ``col_t``), with
  ``perm`` such that ``values[perm]`` are W's values in the CSR order of W^T; int32 indices
  wherever they fit (every CPU kernel used takes int32; int64 otherwise).
* :func:`relocate`: after a mask change, the values (and any per-value optimizer state) of the
  weights that stay active move to their new slots; grown weights start at 0 with 0 state.
  O(nnz log nnz) on sorted int64 flat indices ``row * in + col``.
* :func:`topk_outside`: the k positions outside a pattern with the largest scores, scored one
  block of rows at a time (RigL's gradient growth within a memory budget, SET's random growth
  drawn block by block from the same generator), with the exact tie rule of a dense top-k.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Tuple, Union

import torch
from torch import Tensor

__all__ = [
    "CSRStructure", "index_dtype_for", "structure_from_flat", "build_sparse", "relocate", "dense_grad_rows",
    "block_rows_for_budget", "topk_outside", "merge_sorted", "csr_rows", "topk_inactive_by_grad", "topk_inactive_reference", "topk_exact",
    "random_flat",
]

_INT32_MAX = 2**31 - 1
# torch warns once per process that its CSR tensors are a beta feature; we use only the kernels
# whose results the tests check exactly (mm, addmm, sampled_addmm), so the warning says nothing
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)


def _csr(crow: Tensor, col: Tensor, values: Tensor, shape: Tuple[int, int]) -> Tensor:
    """Wrap existing index/value tensors as a CSR tensor (no copy, no checks)."""
    return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


@dataclass
class CSRStructure:
    """Index structure of a sparse (out, in) weight; see module docstring."""

    shape: Tuple[int, int]
    crow: Tensor
    col: Tensor
    crow_t: Tensor
    col_t: Tensor
    perm: Tensor

    @property
    def nnz(self) -> int:
        return self.col.numel()

    @property
    def index_dtype(self) -> torch.dtype:
        return self.col.dtype

    def row_indices(self) -> Tensor:
        """Row of every stored value (int64, CSR order)."""
        out = self.shape[0]
        counts = self.crow[1:] - self.crow[:-1]
        return torch.repeat_interleave(
            torch.arange(out, device=self.crow.device), counts.long(), output_size=self.nnz
        )

    def flat(self) -> Tensor:
        """Sorted int64 flat indices ``row * in + col`` of the stored values."""
        return self.row_indices() * self.shape[1] + self.col.long()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in
                   (self.crow, self.col, self.crow_t, self.col_t, self.perm))

    def to(self, device) -> "CSRStructure":
        return CSRStructure(self.shape, *(t.to(device) for t in
                                          (self.crow, self.col, self.crow_t, self.col_t, self.perm)))


def index_dtype_for(shape: Tuple[int, int], nnz: int, prefer: Optional[torch.dtype] = None) -> torch.dtype:
    """int32 when all indices fit (and ``prefer`` is not int64), else int64."""
    if prefer == torch.int64:
        return torch.int64
    fits = max(nnz, shape[0] + 1, shape[1] + 1) <= _INT32_MAX
    if prefer == torch.int32 and not fits:
        raise ValueError("indices do not fit in int32")
    return torch.int32 if fits else torch.int64


def structure_from_flat(flat: Tensor, shape: Tuple[int, int],
                        index_dtype: Optional[torch.dtype] = None) -> CSRStructure:
    """Build a :class:`CSRStructure` from *sorted, unique* int64 flat indices."""
    out, inp = shape
    flat = flat.long()
    nnz = flat.numel()
    dt = index_dtype_for(shape, nnz, index_dtype)
    dev = flat.device
    rows = torch.div(flat, inp, rounding_mode="floor")
    cols = (flat - rows * inp).to(dt)
    rows = rows.to(dt)
    crow = torch.zeros(out + 1, dtype=torch.int64, device=dev)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=out), 0)
    # CSR of W^T: stable sort by column keeps rows ascending within a column.
    _, perm = torch.sort(cols, stable=True)
    crow_t = torch.zeros(inp + 1, dtype=torch.int64, device=dev)
    crow_t[1:] = torch.cumsum(torch.bincount(cols, minlength=inp), 0)
    return CSRStructure(
        shape=(out, inp),
        crow=crow.to(dt), col=cols,
        crow_t=crow_t.to(dt), col_t=rows.index_select(0, perm),
        perm=perm.to(dt),
    )


def build_sparse(weight: Tensor, mask: Tensor,
                 index_dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, CSRStructure]:
    """Compact form of a dense weight ``W`` (out, in) under bool mask ``M``.

    Returns ``(values, structure)``: ``values`` (nnz,) = ``W[M]`` in CSR (row-major)
    order, and the :class:`CSRStructure` (CSR of W and of W^T, ``perm``).
    """
    if weight.shape != mask.shape or weight.dim() != 2:
        raise ValueError("weight and mask must both be (out, in)")
    flat = mask.reshape(-1).nonzero().squeeze(1)          # sorted, int64
    st = structure_from_flat(flat, tuple(weight.shape), index_dtype)
    values = weight.reshape(-1).index_select(0, flat).clone()
    return values, st


def flat_indices(st: CSRStructure) -> Tensor:
    return st.flat()


def _new_flat(new: Union[Tensor, CSRStructure], shape: Tuple[int, int]) -> Tensor:
    if isinstance(new, CSRStructure):
        return new.flat()
    if new.dtype == torch.bool:
        if new.shape != torch.Size(shape):
            raise ValueError("mask shape mismatch")
        return new.reshape(-1).nonzero().squeeze(1)
    flat = new.long().reshape(-1)
    if flat.numel() > 1 and not bool((flat[1:] > flat[:-1]).all()):
        flat = torch.unique(flat)                       # sorted, unique
    return flat


def relocate(old: CSRStructure, new: Union[Tensor, CSRStructure], old_values: Tensor,
             *state_tensors: Optional[Tensor], index_dtype: Optional[torch.dtype] = None,
             kept_out: Optional[list] = None, sources: Optional[Tensor] = None):
    """Move values (and per-value state tensors) to a new sparsity structure.

    ``new`` is a bool mask (out, in), a 1-D tensor of flat indices ``row*in+col``
    (any order; deduplicated), or a :class:`CSRStructure`.  Weights active in
    both keep value and state; newly active ones get 0 value and 0 state.
    ``None`` state tensors pass through as ``None``.

    Returns ``(new_structure, new_values, *new_state_tensors)``; ``kept_out`` (a list) receives the
    bool tensor, in the new order, of the weights that were active before. ``sources`` (with sorted
    flat ``new``): each new weight's index in the old order, or -1 where it was not active; it
    spares the search.
    Cost: O(nnz log nnz) on int64 flat indices; no dense tensor is formed
    (unless ``new`` itself is a dense mask).
    """
    shape = old.shape
    new_flat = _new_flat(new, shape)
    new_st = new if isinstance(new, CSRStructure) else structure_from_flat(
        new_flat, shape, index_dtype or old.index_dtype)
    n_new = new_flat.numel()
    if sources is not None:                             # the caller knows where each weight was
        kept = sources >= 0
        dst = kept.nonzero().squeeze(1)
        src = sources.index_select(0, dst)
    elif old.nnz:
        old_flat = old.flat()                           # sorted
        pos = torch.searchsorted(old_flat, new_flat)
        pos_c = pos.clamp_max(old_flat.numel() - 1)
        kept = old_flat.index_select(0, pos_c) == new_flat
        dst = kept.nonzero().squeeze(1)
        src = pos_c.index_select(0, dst)
    else:
        kept = torch.zeros(n_new, dtype=torch.bool, device=new_flat.device)
        dst = src = torch.zeros(0, dtype=torch.long, device=new_flat.device)
    if kept_out is not None:
        kept_out.append(kept)

    def move(t: Optional[Tensor]) -> Optional[Tensor]:
        if t is None:
            return None
        out = torch.zeros(n_new, dtype=t.dtype, device=t.device)
        out.index_copy_(0, dst, t.index_select(0, src))
        return out

    return (new_st, move(old_values), *[move(t) for t in state_tensors])


def dense_grad_rows(x: Tensor, grad_y: Tensor, row_start: int, row_stop: int) -> Tensor:
    """Dense weight gradient of rows [row_start, row_stop): (rows, in) =
    ``grad_y[:, rows]^T @ x`` (leading dims of x / grad_y are flattened)."""
    x2 = x.reshape(-1, x.shape[-1])
    g2 = grad_y.reshape(-1, grad_y.shape[-1])
    return g2[:, row_start:row_stop].t() @ x2


def block_rows_for_budget(in_features: int, budget_bytes: int = 16 * 2**20,
                          dtype: torch.dtype = torch.float32) -> int:
    """Largest number of rows whose dense gradient block fits ``budget_bytes``."""
    per_row = in_features * torch.empty(0, dtype=dtype).element_size()
    rows = budget_bytes // per_row
    return max(8, rows - rows % 8)        # multiple of 8 (see topk_inactive_by_grad)


def _kth_largest(scores: Tensor, k: int) -> Tensor:
    """The k-th largest value (1 <= k <= n), exactly. For large n a strided sample brackets it, and
    the exact selection runs on the values inside the bracket only (torch's selection over all n
    copies the tensor and runs on one core)."""
    n = scores.numel()
    if k <= n - k + 1 and k <= 1024:   # a small top-k is cheaper than a full selection
        return torch.topk(scores, k, sorted=False).values.min()
    if n >= 1 << 17:
        stride = n // 16384
        sample = torch.sort(scores[::stride], descending=True).values
        q = k / n * sample.numel()                       # the k-th largest's rank in the sample
        margin = 4.0 * math.sqrt(q + 1.0) + 16.0
        hi = sample[max(0, int(q - margin))]
        lo = sample[min(sample.numel() - 1, int(q + margin))]
        above = int((scores > hi).count_nonzero())
        band = scores[(scores <= hi) & (scores >= lo)]
        need = k - above                                 # the k-th largest is the need-th largest of the band
        if 1 <= need <= band.numel():
            return torch.kthvalue(band, band.numel() - need + 1).values
    return torch.kthvalue(scores, n - k + 1).values


def _topk_exact_small(scores: Tensor, k: int) -> Tensor:
    """Positions of the k largest scores, ties -> lowest position first; sorted ascending (one pass
    over a bool mask, no sort)."""
    n = scores.numel()
    if k >= n:
        return torch.arange(n, device=scores.device)
    thr = _kth_largest(scores, k)
    take = scores > thr
    short = k - int(take.count_nonzero())
    if short > 0:
        take[(scores == thr).nonzero().squeeze(1)[:short]] = True
    return take.nonzero().squeeze(1)


def merge_sorted(a: Tensor, b: Tensor, payload_a: Optional[Tensor] = None, payload_b: Optional[Tensor] = None):
    """The sorted union of two sorted 1-D tensors with no element in common (no sort: one binary
    search of b's elements in a). With payloads (one per element of a and of b), returns
    ``(merged, merged payloads)``."""
    at = torch.searchsorted(a, b) + torch.arange(b.numel(), device=b.device)   # b's slots in the result
    from_a = torch.ones(a.numel() + b.numel(), dtype=torch.bool, device=a.device)
    from_a[at] = False
    a_at = from_a.nonzero().squeeze(1)                                         # a's slots

    def merge(x: Tensor, y: Tensor) -> Tensor:
        out = torch.empty(a.numel() + b.numel(), dtype=x.dtype, device=x.device)
        out.index_copy_(0, at, y)
        out.index_copy_(0, a_at, x)
        return out

    merged = merge(a, b)
    return merged if payload_a is None else (merged, merge(payload_a, payload_b))


def csr_rows(flat: Tensor, shape: Tuple[int, int]) -> Tuple[Tensor, Tensor]:
    """``crow`` and ``col`` (int64) of sorted unique flat positions: the row-major half of a structure."""
    rows = torch.div(flat, shape[1], rounding_mode="floor")
    crow = torch.zeros(shape[0] + 1, dtype=torch.int64, device=flat.device)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=shape[0]), 0)
    return crow, flat - rows * shape[1]


def topk_exact(scores: Tensor, k: int, sample_stride: int = 64) -> Tensor:
    """Exact top-k positions of a 1-D tensor with deterministic ties (lowest
    position first), returned in ascending position order.

    ``torch.topk`` with a large k on millions of elements is slow (~65 ms for
    k=100k of 4M on 2 cores) and does not define tie order.  Here a strided
    sample gives a lower bound ``t`` on the k-th largest value; the (few) positions
    with score >= t are extracted with one cheap pass, and the exact selection
    runs on them only.  Falls back to the direct selection if the bound misses.
    """
    n = scores.numel()
    if k >= n:
        return torch.arange(n, device=scores.device)
    stride = min(sample_stride, k // 256)
    if stride >= 4 and n >= 16 * k // 10:
        sample = scores[::stride]
        r = min(sample.numel(), int(1.25 * k / stride) + 16)
        t = torch.topk(sample, r, sorted=False).values.min()
        cand = (scores >= t).nonzero().squeeze(1)
        if k <= cand.numel() < n // 2:
            return cand.index_select(0, _topk_exact_small(scores.index_select(0, cand), k))
    return _topk_exact_small(scores, k)


def topk_outside(shape: Tuple[int, int], crow: Tensor, col: Tensor, k: int,
                 score_block: Callable[[int, int], Tensor], block_rows: int, dtype: torch.dtype = torch.float32,
                 ordered: bool = True) -> Tuple[Tensor, Tensor]:
    """The k positions OUTSIDE the CSR pattern (``crow``, ``col``) with the largest scores, as int64
    flat indices ``row*in+col`` ordered by score (descending; ties: lowest flat index first), and
    their scores; ``ordered=False``: in ascending flat index instead (no sort). ``score_block(r0, r1)`` returns the dense (r1 − r0, in) scores of rows [r0, r1);
    at most one such block plus O(k) candidates are alive at any time, so a layer never needs a
    dense score tensor larger than a block. If fewer than k positions are outside, all of them.

    Blocks are visited in increasing flat index, so once k candidates are held (threshold ``thr``
    = their smallest score) a later position can only enter with a score strictly greater than
    ``thr``: the selection is exactly that of one top-k over the dense scores with ties going to
    the lowest flat index (``fastsparse.core.masks.topk_mask``).
    """
    out_f, in_f = shape
    block_rows = max(8, int(block_rows))
    crow, col = crow.long(), col.long()
    dev = crow.device
    pool_idx = torch.zeros(0, dtype=torch.long, device=dev)   # ascending flat index
    pool_val = torch.zeros(0, dtype=dtype, device=dev)
    thr = None                                                # set once the pool holds k
    for r0 in range(0, out_f, block_rows):
        r1 = min(out_f, r0 + block_rows)
        G = score_block(r0, r1).reshape(-1).to(dtype)
        a0, a1 = int(crow[r0]), int(crow[r1])
        if a1 > a0:  # positions inside the pattern -> -inf (never selected)
            counts = crow[r0 + 1:r1 + 1] - crow[r0:r1]
            rows_local = torch.repeat_interleave(torch.arange(r1 - r0, device=dev), counts,
                                                 output_size=a1 - a0)
            G.index_fill_(0, rows_local * in_f + col[a0:a1], -math.inf)
        if thr is None:
            n_outside = G.numel() - (a1 - a0)
            kk = min(k, n_outside)
            if kk <= 0:
                continue
            loc = topk_exact(G, kk) if kk < n_outside else (G > -math.inf).nonzero().squeeze(1)
        else:
            loc = (G > thr).nonzero().squeeze(1)
            if loc.numel() > k:
                loc = loc.index_select(0, topk_exact(G.index_select(0, loc), k))
        if loc.numel() == 0:
            continue
        pool_idx = torch.cat([pool_idx, loc + r0 * in_f])
        pool_val = torch.cat([pool_val, G.index_select(0, loc)])
        if pool_idx.numel() >= k:
            keep = _topk_exact_small(pool_val, k)             # ties -> lowest flat index
            pool_idx, pool_val = pool_idx.index_select(0, keep), pool_val.index_select(0, keep)
            thr = pool_val.min()
    if not ordered:
        return pool_idx, pool_val
    order = torch.sort(pool_val, descending=True, stable=True).indices
    return pool_idx.index_select(0, order), pool_val.index_select(0, order)


def topk_inactive_by_grad(x: Tensor, grad_y: Tensor, st: CSRStructure, k: int,
                          block_rows: Optional[int] = None, return_scores: bool = False):
    """The k inactive positions with the largest |dense gradient| (RigL's growth), the gradient
    computed ``block_rows`` rows at a time (:func:`dense_grad_rows`): :func:`topk_outside` with
    |grad_y[:, rows]^T @ x| as the block score. Exact against the dense reference whenever the
    block GEMMs round like one full GEMM (with MKL: bitwise for blocks of >= 8 rows, which is
    why ``block_rows`` is raised to at least 8)."""
    out_f, in_f = st.shape
    rows = block_rows or block_rows_for_budget(in_f)
    idx, val = topk_outside(st.shape, st.crow, st.col, k,
                            lambda r0, r1: dense_grad_rows(x, grad_y, r0, r1).abs_(), rows, x.dtype)
    return (idx, val) if return_scores else idx


def topk_inactive_reference(x: Tensor, grad_y: Tensor, mask: Tensor, k: int) -> Tensor:
    """Dense reference for tests: full (out, in) gradient, same ordering rules."""
    x2 = x.reshape(-1, x.shape[-1])
    g2 = grad_y.reshape(-1, grad_y.shape[-1])
    G = (g2.t() @ x2).abs().reshape(-1)
    G[mask.reshape(-1)] = -math.inf
    k = min(k, int((~mask).sum()))
    order = torch.sort(G, descending=True, stable=True).indices
    return order[:k]


def random_flat(shape: Tuple[int, int], k: int, generator: torch.Generator) -> Tensor:
    """``k`` distinct flat positions of an (out, in) weight drawn uniformly at random, sorted, without
    any tensor of the weight's size (for layers whose dense form does not fit in memory)."""
    n = shape[0] * shape[1]
    if not 0 <= k <= n:
        raise ValueError(f"cannot keep {k} of {n} positions")
    if k > n // 4:   # dense enough for a permutation of every position
        return torch.sort(torch.randperm(n, generator=generator)[:k]).values
    chosen = torch.zeros(0, dtype=torch.long)
    while chosen.numel() < k:
        draw = torch.randint(n, (int((k - chosen.numel()) * 1.1) + 16,), generator=generator)
        chosen = torch.unique(torch.cat([chosen, draw]))
    pick = torch.randperm(chosen.numel(), generator=generator)[:k]
    return torch.sort(chosen[pick]).values
