"""Sparse execution of a linear layer: O(nnz) forward, backward and optimizer step.

The trainable tensor of a :class:`SparseLinear` is only the active weights: a 1-D
``nn.Parameter`` ``values`` of length ``nnz`` stored in CSR (row-major) order of
the (out, in) weight ``W``, plus an index structure (:class:`CSRStructure`):

* ``crow`` (out+1,) / ``col`` (nnz,)           CSR of ``W``
* ``crow_t`` (in+1,) / ``col_t`` (nnz,)        CSR of ``W^T`` (used for grad_x)
* ``perm`` (nnz,)                              ``values[perm]`` = values of ``W^T``
                                                in its CSR order

Kernels (CPU): the compiled kernels of :mod:`.native` (CSR @ dense for the forward and the
input gradient, which reads W^T's values through ``perm`` instead of gathering them, and the
sampled product for the weight gradient) wherever they are built and the tensors are contiguous
float32, measured 2-3x faster than MKL's (``benchmarks/native_kernels.py``). Otherwise, and on
CUDA, torch's kernels (torch 2.13 with MKL; chosen by measurement):

* forward   ``y^T = b 1^T + A @ x^T`` computed by ``torch.addmm(yT, A, xT, out=yT)``
  in place into a fresh (out, N) buffer holding the bias, with ``A`` the CSR of
  ``W`` and ``x^T`` contiguous (in, N); ``y`` is returned as the transposed view
  of the contiguous (out, N) result, so a following sparse layer gets its
  ``x^T`` for free.  (``x @ A.t()`` / ``x @ A_T`` use MKL's transposed or
  column-major paths and are 2-20x slower.)
* grad_x    ``grad_x^T = A_T @ grad_y^T`` with ``A_T`` the CSR of ``W^T`` whose
  values are ``values.index_select(0, perm)`` (``index_select`` is 2-25x faster
  than ``values[perm]``; it runs on one thread, so :func:`gather` splits a long
  one over torch's threads; the CSC path ``A.t() @ g`` is 3-10x slower), computed
  by ``torch.addmm(buf, A_T, gT, beta=0, out=buf)`` into an uninitialized
  buffer: ``torch.sparse.mm`` / ``@`` allocate a zero-filled result, run MKL
  into a temporary and copy it over (3 passes over the output instead of 1;
  negligible at 4096x128 but 10x for the large outputs of im2col convolutions).
  beta=0 ignores the buffer's content (checked NaN-safe, incl. nnz=0 and empty rows).
* grad_val  ``torch.sparse.sampled_addmm(G, grad_y^T, x^T.t(), beta=0, out=G)``
  in place into a zeroed buffer ``G`` that shares the int32 indices: this avoids
  the index copy (int32 -> int64 conversion) and the value copy that the
  out-of-place call makes, and the ``x^T`` saved by the forward is exactly the
  layout the kernel wants (no transpose copy).  Gather formulations
  (``(g^T[row] * x^T[col]).sum(1)``) are 10-50x slower.

Index dtypes: every kernel used here accepts int32 indices on CPU (MKL SpMM is
LP64, so int64 indices are converted to int32 on *every* call; sampled_addmm
dispatches on the index type and accepts both; ``index_select`` accepts an
int32 index).  int32 is used whenever ``nnz`` and the dims fit, int64 otherwise.

A dense (out, in) gradient is never formed by the autograd function.  For mask
updates (RigL) :func:`topk_inactive_by_grad` scores growth candidates block by
block of rows (:func:`dense_grad_rows`) within a memory budget, and
:func:`relocate` moves values and per-value optimizer state to the new
structure using sorted int64 flat indices (``row * in + col``), with no dense
tensor.
"""
from __future__ import annotations

import logging
import math
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Union

import torch
from torch import Tensor, nn

from . import native
from .csr import CSRStructure, _csr, build_sparse, random_flat, relocate, structure_from_flat

warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")

log = logging.getLogger("fastsparse")

__all__ = ["SparseLinearFn", "sparse_linear", "SparseLinear", "dense_state_dict"]


PARALLEL_GATHER = 1 << 18   # a gather this long is split over torch's threads
_pool: Optional[ThreadPoolExecutor] = None


def gather(values: Tensor, index: Tensor) -> Tensor:
    """``values.index_select(0, index)``. Torch runs a CPU gather on one thread; a long one is
    split over ``torch.get_num_threads()`` Python threads (each releases the GIL; the parts are
    disjoint slices of one output), measured 2.0x faster on 2 cores for 1.7 M values, the same
    values bit for bit."""
    global _pool
    n, threads = index.numel(), torch.get_num_threads()
    if values.device.type != "cpu" or n < PARALLEL_GATHER or threads < 2:
        return values.index_select(0, index)
    if _pool is None or _pool._max_workers < threads - 1:
        _pool = ThreadPoolExecutor(threads - 1, thread_name_prefix="fastsparse-gather")
    out = torch.empty(n, dtype=values.dtype)
    cut = [n * i // threads for i in range(threads + 1)]
    parts = [_pool.submit(torch.index_select, values, 0, index[a:b], out=out[a:b])
             for a, b in zip(cut[1:-1], cut[2:])]
    torch.index_select(values, 0, index[:cut[1]], out=out[:cut[1]])
    for part in parts:
        part.result()
    return out


_told: set = set()


def _compiled(*tensors: Optional[Tensor]) -> bool:
    """Whether the compiled kernels take these tensors; where they are built but cannot, the
    reason is logged once (float64 layers, for one, run on torch's kernels)."""
    if native.usable(*tensors):
        return True
    why = native.unfit(*tensors)
    if why is not None and why not in _told and not why.startswith("a cuda") and native.available():
        _told.add(why)
        log.warning("sparse layers with %s run on torch's kernels, 2-3x slower than the compiled ones", why)
    return False


def forward_torch(st: CSRStructure, values: Tensor, xT: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``b 1^T + A x^T`` on torch's CSR kernels (the fallback of :func:`native.spmm`), in place into a
    fresh (out, N) buffer."""
    out_f, n = st.shape[0], xT.shape[1]
    A = _csr(st.crow, st.col, values, st.shape)
    yT = torch.empty(out_f, n, dtype=xT.dtype, device=xT.device)
    if bias is None:                                          # beta=0: yT's content is ignored
        return torch.addmm(yT, A, xT, beta=0.0, out=yT)
    yT.copy_(bias.unsqueeze(1).expand(out_f, n))
    return torch.addmm(yT, A, xT, out=yT)


def grad_x_torch(st: CSRStructure, values: Tensor, gT: Tensor) -> Tensor:
    """``A^T g^T`` on torch's CSR kernels: W^T's values gathered into its CSR order, in place into an
    uninitialized (in, N) buffer (no zero-fill, no copy)."""
    out_f, in_f = st.shape
    AT = _csr(st.crow_t, st.col_t, gather(values.detach(), st.perm), (in_f, out_f))
    gxT = torch.empty(in_f, gT.shape[1], dtype=gT.dtype, device=gT.device)
    return torch.addmm(gxT, AT, gT, beta=0.0, out=gxT)


def grad_values_torch(st: CSRStructure, gT: Tensor, xT: Tensor) -> Tensor:
    """``g^T x`` at the pattern's positions on torch's kernels, in place into a zeroed (nnz,) buffer."""
    grad_v = torch.zeros(st.nnz, dtype=gT.dtype, device=gT.device)
    if st.nnz and gT.shape[1]:
        G = _csr(st.crow, st.col, grad_v, st.shape)          # result = 0 * G + (g^T @ x) sampled at G
        torch.sparse.sampled_addmm(G, gT, xT.t(), beta=0.0, alpha=1.0, out=G)
    return grad_v


class SparseLinearFn(torch.autograd.Function):
    """``y = x @ W^T + b`` with ``W`` given by ``(structure, values)``.

    ``x``: (..., in); ``values``: (nnz,) in CSR order; ``bias``: (out,) or None;
    ``structure``: :class:`CSRStructure`.  Returns (..., out).  The output (and
    grad_x) are transposed views of contiguous (out, N) / (in, N) buffers.
    """

    @staticmethod
    def forward(ctx, x: Tensor, values: Tensor, bias: Optional[Tensor], st: CSRStructure,
                sink: Optional[list] = None) -> Tensor:
        out_f, in_f = st.shape
        lead = x.shape[:-1]
        xT = x.reshape(-1, in_f).t().contiguous()             # (in, N); free if x is a transposed view
        if _compiled(xT, values, bias, st.crow, st.col):      # y^T = b 1^T + A x^T
            yT = native.spmm(st.crow, st.col, values, xT, bias)
        else:
            yT = forward_torch(st, values, xT, bias)
        ctx.st = st
        ctx.lead = lead
        ctx.sink = sink
        need_x, need_v = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.save_for_backward(xT if need_v or sink is not None else None, values if need_x else None)
        return yT.t().reshape(*lead, out_f)

    @staticmethod
    def backward(ctx, gy: Tensor):
        st: CSRStructure = ctx.st
        out_f, in_f = st.shape
        xT, values = ctx.saved_tensors
        gT = gy.reshape(-1, out_f).t().contiguous()           # (out, N)
        grad_x = grad_v = grad_b = None
        compiled = _compiled(gT, xT, values, st.crow, st.col, st.crow_t, st.col_t, st.perm)
        if ctx.needs_input_grad[0]:                           # compiled: W^T's values read through perm
            gxT = native.spmm(st.crow_t, st.col_t, values, gT, perm=st.perm) if compiled \
                else grad_x_torch(st, values, gT)
            grad_x = gxT.t().reshape(*ctx.lead, in_f)
        if ctx.needs_input_grad[1]:
            grad_v = native.sddmm(st.crow, st.col, gT, xT) if compiled else grad_values_torch(st, gT, xT)
        if ctx.needs_input_grad[2]:
            grad_b = gT.sum(1)
        if ctx.sink is not None:   # a mask update follows this step: keep what its dense gradient needs
            ctx.sink.append((xT, gT))
        return grad_x, grad_v, grad_b, None, None


def sparse_linear(x: Tensor, values: Tensor, bias: Optional[Tensor], st: CSRStructure,
                  sink: Optional[list] = None) -> Tensor:
    return SparseLinearFn.apply(x, values, bias, st, sink)



class SparseLinear(nn.Module):
    """Linear layer whose weight is stored compactly (values + CSR structure)."""

    def __init__(self, in_features: int, out_features: int, values: Tensor,
                 structure: CSRStructure, bias: Optional[Tensor] = None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        if structure.shape != (out_features, in_features) or values.shape != (structure.nnz,):
            raise ValueError(f"a structure of shape {structure.shape} with {structure.nnz} values does not fit "
                             f"({out_features}, {in_features}) and {tuple(values.shape)} values")
        self.values = nn.Parameter(values.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone()) if isinstance(bias, Tensor) and not isinstance(bias, nn.Parameter) \
            else bias
        self._set_structure(structure)
        self.capture: Optional[list] = None   # set by the engine before a step whose mask update needs gradients

    @classmethod
    def random(cls, in_features: int, out_features: int, density: float, generator: torch.Generator,
               bias: bool = True, std: Optional[float] = None) -> "SparseLinear":
        """A layer with ``round(density · in · out)`` weights at uniformly random positions, drawn
        without forming its dense weight (for layers too large to hold densely). Values
        ~ N(0, std²), by default He's std for the weights a unit really receives:
        sqrt(2 / (in · density)); the bias starts at 0."""
        k = int(round(density * in_features * out_features))
        flat = random_flat((out_features, in_features), k, generator)
        st = structure_from_flat(flat, (out_features, in_features))
        std = std if std is not None else math.sqrt(2.0 / max(1e-12, in_features * density))
        values = torch.randn(k, generator=generator) * std
        return cls(in_features, out_features, values, st, torch.zeros(out_features) if bias else None)

    # buffers so that .to(), state_dict() carry the structure
    def _set_structure(self, st: CSRStructure) -> None:
        for name in ("crow", "col", "crow_t", "col_t", "perm"):
            self.register_buffer(name, getattr(st, name))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """A checkpoint may hold another number of active weights (a gradual method pruned since the
        layer was built): the values and the structure take the stored sizes, then load."""
        values = state_dict.get(prefix + "values")
        if isinstance(values, Tensor) and values.shape != self.values.shape:
            # a new Parameter (autograd keeps a parameter's shape); an optimizer built over the old
            # one must be given the new one (the engine's load_state_dict does)
            self.values = nn.Parameter(torch.empty_like(values, device=self.values.device),
                                       requires_grad=self.values.requires_grad)
        for name in ("crow", "col", "crow_t", "col_t", "perm"):
            # the stored sizes and index type, all five alike (the kernels read them as one type)
            # (the row pointers keep their length: another one is a layer of another shape, refused below)
            stored, mine = state_dict.get(prefix + name), self._buffers[name]
            if not isinstance(stored, Tensor):
                continue
            resized = name not in ("crow", "crow_t") and stored.shape != mine.shape
            retyped = stored.dtype != mine.dtype and stored.shape == mine.shape
            if resized or retyped:
                self._buffers[name] = torch.empty_like(stored, device=mine.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @property
    def structure(self) -> CSRStructure:
        return CSRStructure((self.out_features, self.in_features),
                            self.crow, self.col, self.crow_t, self.col_t, self.perm)

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @classmethod
    def from_dense(cls, linear: nn.Linear, mask: Tensor,
                   index_dtype: Optional[torch.dtype] = None) -> "SparseLinear":
        values, st = build_sparse(linear.weight.detach(), mask.bool(), index_dtype)
        return cls(linear.in_features, linear.out_features, values, st, linear.bias)   # the same bias Parameter

    def forward(self, x: Tensor) -> Tensor:
        sink = self.capture if torch.is_grad_enabled() else None
        if x.is_floating_point() and x.dtype != self.values.dtype:
            # another dtype arrives from layers under autocast (bf16, fp16): the sparse product runs in
            # the values' dtype, as autocast runs the ops it does not list; autograd casts the gradient back
            x = x.to(self.values.dtype)
        return SparseLinearFn.apply(x, self.values, self.bias, self.structure, sink)

    def to_dense(self) -> Tensor:
        """Dense (out, in) weight, exact zeros off the mask."""
        W = torch.zeros(self.out_features * self.in_features,
                        dtype=self.values.dtype, device=self.values.device)
        W[self.structure.flat()] = self.values.detach()
        return W.view(self.out_features, self.in_features)

    def mask(self) -> Tensor:
        """Dense bool mask (for tests only)."""
        M = torch.zeros(self.out_features * self.in_features, dtype=torch.bool, device=self.crow.device)
        M[self.structure.flat()] = True
        return M.view(self.out_features, self.in_features)

    @torch.no_grad()
    def update_structure(self, new: Union[Tensor, CSRStructure],
                         optimizer: Optional[torch.optim.Optimizer] = None, sources: Optional[Tensor] = None) -> Tensor:
        """Change the mask; kept weights (and their optimizer state) move to their
        new slots, grown weights start at 0 with 0 state.  ``new``: bool mask,
        flat indices, or a CSRStructure.  Per-value optimizer state tensors of
        ``optimizer.state[self.values]`` (any tensor of shape (nnz,)) are relocated.
        Returns, in the new order, whether each weight was active before. ``sources``: see
        :func:`~fastsparse.core.csr.relocate`.
        """
        p = self.values
        state = optimizer.state.get(p, {}) if optimizer is not None else {}
        keys = [k for k, v in state.items() if torch.is_tensor(v) and v.shape == p.shape]
        kept: list = []
        new_st, new_vals, *new_states = relocate(self.structure, new, p.data,
                                                 *[state[k] for k in keys], kept_out=kept, sources=sources)
        if new_vals.shape == p.shape:
            p.data = new_vals
        else:   # autograd keeps a parameter's shape: another count of active weights is a new Parameter
            fresh = nn.Parameter(new_vals, requires_grad=p.requires_grad)
            if optimizer is not None:
                for group in optimizer.param_groups:
                    group["params"] = [fresh if q is p else q for q in group["params"]]
                if p in optimizer.state:
                    optimizer.state[fresh] = optimizer.state.pop(p)
                state = optimizer.state.get(fresh, state)
            self.values = fresh
        for k, v in zip(keys, new_states):
            state[k] = v
        self._set_structure(new_st)
        return kept[0]

    def extra_repr(self) -> str:
        dens = self.nnz / max(1, self.in_features * self.out_features)
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"nnz={self.nnz} (density {dens:.4f}), index_dtype={self.col.dtype}, "
                f"bias={self.bias is not None}")


def dense_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` with every SparseLinear as a masked Linear: ``<name>.weight`` (exact zeros
    off the mask) and ``<name>.weight_mask`` in place of its values and structure (what compressed
    exports and masked models read)."""
    state = dict(model.state_dict())
    for name, m in model.named_modules():
        if isinstance(m, SparseLinear):
            prefix = f"{name}." if name else ""
            for key in ("values", "crow", "col", "crow_t", "col_t", "perm"):
                state.pop(prefix + key, None)
            state[prefix + "weight"] = m.to_dense().detach().clone()
            state[prefix + "weight_mask"] = m.mask()
    return state


def compact_layers(model: nn.Module) -> dict[str, "SparseLinear"]:
    """Every SparseLinear of ``model`` by the name its dense weight would have (``<module>.weight``)."""
    return {(f"{name}.weight" if name else "weight"): m for name, m in model.named_modules()
            if isinstance(m, SparseLinear)}


def weight_masks(model: nn.Module) -> dict[str, Tensor]:
    """Every weight mask of ``model`` by weight name: the ``<weight>_mask`` buffers of masked layers and,
    built as dense bool tensors, the structures of SparseLinear layers."""
    masks = {name[: -len("_mask")]: buf for name, buf in model.named_buffers() if name.endswith("_mask")}
    masks.update({name: m.mask() for name, m in compact_layers(model).items()})
    return masks
