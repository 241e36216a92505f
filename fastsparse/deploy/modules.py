"""Inference modules that compute a layer from a CSR copy of its weights (int32 indices), and
the 2:4 semi-structured one where CUDA has kernels for it (see :mod:`.inference`)."""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import native

__all__ = ["SparseLinear", "SemiStructuredLinear", "SparseMultiheadAttention", "is_2to4", "SEMI_STRUCTURED_CPU_NOTE"]

# torch warns once that CSR support is "beta"; the operations used here are tested in this project.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state", category=UserWarning)

SEMI_STRUCTURED_CPU_NOTE = ("2:4 semi-structured sparse kernels are CUDA-only; "
                            "they are not used on CPU (2:4 weights are handled like any other sparse weight)")

# from this many input rows the compiled kernels run the product (measured on a 4096² layer at 90 and
# 98 %: 1.5x faster than MKL at 16 rows, 2.2-2.9x at 64; at 1-4 rows 0-10 % slower)
NATIVE_FROM_ROWS = 16


def _csr_parts(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(row pointers, column indices, values) of a 2-D weight's nonzeros, int32 indices."""
    weight = weight.detach()
    nonzero = weight != 0
    crow = torch.zeros(weight.shape[0] + 1, dtype=torch.int64, device=weight.device)
    torch.cumsum(nonzero.sum(1), 0, out=crow[1:])
    if int(crow[-1]) >= 2**31:
        raise ValueError("a weight with 2**31 or more nonzeros does not fit int32 CSR indices")
    col = nonzero.nonzero()[:, 1]
    return crow.to(torch.int32), col.to(torch.int32), weight[nonzero]


class SparseLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` held in CSR form (int32 indices; explicit zeros dropped),
    computed by the compiled kernels of :mod:`fastsparse.core.native` from ``NATIVE_FROM_ROWS``
    input rows on (float32, CPU), by torch's CSR kernels otherwise.

    The CSR parts are plain buffers (``crow_indices``, ``col_indices``, ``values``), so the
    module can be copied, moved and saved like any other; the CSR tensor itself is built
    at each call, which costs a few microseconds.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None = None):
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"SparseLinear needs a 2-D weight, got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = (int(s) for s in weight.shape)
        crow, col, values = _csr_parts(weight)
        self.register_buffer("crow_indices", crow)
        self.register_buffer("col_indices", col)
        self.register_buffer("values", values)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "SparseLinear":
        return cls(linear.weight, linear.bias)

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def weight(self) -> Tensor:
        """The weight as a CSR tensor (sharing memory with the buffers)."""
        return torch.sparse_csr_tensor(self.crow_indices, self.col_indices, self.values,
                                       (self.out_features, self.in_features), check_invariants=False)

    def to_dense_weight(self) -> Tensor:
        return self.weight.to_dense()

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        if x.is_floating_point() and x.dtype != self.values.dtype:   # e.g. bf16 from layers under autocast
            x = x.to(self.values.dtype)
        cols = x.reshape(-1, self.in_features).t()
        if (cols.shape[1] >= NATIVE_FROM_ROWS and x.dtype == torch.float32 and x.device.type == "cpu"
                and native.usable(self.values, self.bias, self.crow_indices, self.col_indices)):
            y = native.spmm(self.crow_indices, self.col_indices, self.values, cols.contiguous(), self.bias)
            return y.t().reshape(*lead, self.out_features)
        if self.bias is None:
            y = torch.sparse.mm(self.weight, cols)
        else:
            y = torch.addmm(self.bias.unsqueeze(1), self.weight, cols)
        return y.t().reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        n = self.out_features * self.in_features
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, nnz={self.nnz}, density={self.nnz / max(n, 1):.4f}")


class SemiStructuredLinear(nn.Module):
    """CUDA only: a Linear whose 2:4-sparse weight uses PyTorch's semi-structured kernels."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None):
        super().__init__()
        if not weight.is_cuda:
            raise RuntimeError(SEMI_STRUCTURED_CPU_NOTE)
        self.out_features, self.in_features = (int(s) for s in weight.shape)
        self.weight = torch.sparse.to_sparse_semi_structured(weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


def _dense_linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                    device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


class SparseMultiheadAttention(nn.Module):
    """Inference version of ``nn.MultiheadAttention`` whose projections may be sparse.

    Same call signature and results as the module it replaces in eval mode (no dropout);
    ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` are each a :class:`SparseLinear` or
    a dense ``nn.Linear``. Modules with ``add_bias_kv`` or ``add_zero_attn`` are not
    converted (see :func:`plan_inference`).
    """

    def __init__(self, mha: nn.MultiheadAttention, sparse_in: bool, sparse_out: bool):
        super().__init__()
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("add_bias_kv and add_zero_attn are not supported by SparseMultiheadAttention")
        self.embed_dim, self.num_heads, self.head_dim = mha.embed_dim, mha.num_heads, mha.head_dim
        self.batch_first = mha.batch_first
        weights = _in_proj_weights(mha)
        biases = (mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None, None, None))
        make = SparseLinear if sparse_in else _dense_linear
        self.q_proj, self.k_proj, self.v_proj = (make(w, b) for w, b in zip(weights, biases))
        make = SparseLinear if sparse_out else _dense_linear
        self.out_proj = make(mha.out_proj.weight, mha.out_proj.bias)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None,
                average_attn_weights: bool = True, is_causal: bool = False):
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention)")
        batched = query.dim() == 3
        if not batched:
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        bsz, tgt, _ = query.shape
        src = key.shape[1]
        heads, hd = self.num_heads, self.head_dim
        q = self.q_proj(query).reshape(bsz, tgt, heads, hd).transpose(1, 2)
        k = self.k_proj(key).reshape(bsz, src, heads, hd).transpose(1, 2)
        v = self.v_proj(value).reshape(bsz, src, heads, hd).transpose(1, 2)
        scores = (q * (1.0 / math.sqrt(hd))) @ k.transpose(-2, -1)
        if attn_mask is not None:
            shape = (1, 1, tgt, src) if attn_mask.dim() == 2 else (bsz, heads, tgt, src)
            scores = scores + _additive(attn_mask.reshape(shape), scores.dtype)
        if key_padding_mask is not None:
            scores = scores + _additive(key_padding_mask.reshape(bsz, 1, 1, src), scores.dtype)
        weights = scores.softmax(-1)
        out = (weights @ v).transpose(1, 2).reshape(bsz, tgt, self.embed_dim)
        out = self.out_proj(out)
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        if average_attn_weights:
            weights = weights.mean(1)
        return out, (weights if batched else weights.squeeze(0))


def _in_proj_weights(mha: nn.MultiheadAttention) -> tuple[Tensor, Tensor, Tensor]:
    if mha.in_proj_weight is not None:
        return tuple(mha.in_proj_weight.chunk(3))
    return mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight


def is_2to4(weight: Tensor) -> bool:
    """At most 2 nonzeros in every group of 4 consecutive inputs of every output row."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool(((weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1) <= 2).all())


# ----------------------------------------------------------------------------- timing
