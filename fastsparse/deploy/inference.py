"""Sparse inference: CSR Linear layers where, and only where, they are measured to be faster.

:func:`to_inference` replaces ``nn.Linear`` layers and the projections of
``nn.MultiheadAttention`` by modules that compute the same function from a CSR copy of
the weights (``torch.addmm`` / ``torch.sparse.mm`` with int32 indices, which also work
under ``torch.inference_mode()``, unlike ``F.linear`` on a CSR weight). Which layers are
converted is decided per layer, either by a short calibration at the batch sizes the
caller gives (a layer is converted only when its CSR module is faster than dense
``F.linear`` at every one of them, by a margin), or by a sparsity threshold the caller
measured with ``benchmarks/inference.py``. Everything else stays dense.

On CUDA, a Linear weight with a 2:4 pattern (at most 2 nonzeros in every group of 4
along the input dimension) is also tried with PyTorch's semi-structured sparse kernels
when they exist, checked against the dense result and timed like the CSR module. On
CPU there are no such kernels: 2:4 weights are treated like any other sparse weight,
and the decisions say so.
"""
from __future__ import annotations

import copy
import math
import os
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "SparseLinear", "SparseMultiheadAttention", "LayerDecision", "plan_inference", "to_inference",
    "InferenceBench", "bench_inference", "bench_inference_command", "is_2to4",
]

# torch warns once that CSR support is "beta"; the operations used here are tested in this project.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state", category=UserWarning)

SEMI_STRUCTURED_CPU_NOTE = ("2:4 semi-structured sparse kernels are CUDA-only; "
                            "they are not used on CPU (2:4 weights are handled like any other sparse weight)")


# --------------------------------------------------------------------------- modules

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
    """``y = x W^T + b`` with ``W`` held in CSR form (int32 indices; explicit zeros dropped).

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
        cols = x.reshape(-1, self.in_features).t()
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

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fns: dict[str, Callable[[], Any]], reps: int = 7, min_sample_s: float = 1e-3,
            device: torch.device | str = "cpu") -> dict[str, float]:
    """Median seconds per call of each function, from ``reps`` interleaved rounds.

    Each function runs once to warm up, then enough calls per sample that one sample takes
    about ``min_sample_s``; in every round each function gives one sample, the order
    reversed every other round, so that drifts in machine load hit all of them alike.
    """
    device = torch.device(device)
    inner = {}
    with torch.inference_mode():
        for name, fn in fns.items():
            fn()
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            once = time.perf_counter() - t0
            inner[name] = max(1, min(1000, int(min_sample_s / max(once, 1e-7))))
        samples: dict[str, list[float]] = {name: [] for name in fns}
        names = list(fns)
        for r in range(reps):
            for name in (names if r % 2 == 0 else names[::-1]):
                fn, k = fns[name], inner[name]
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(k):
                    fn()
                _sync(device)
                samples[name].append((time.perf_counter() - t0) / k)
    return {name: statistics.median(v) for name, v in samples.items()}


# -------------------------------------------------------------------------- decisions

@dataclass
class LayerDecision:
    """What :func:`plan_inference` decided for one layer (or one attention projection)."""

    name: str                      # module name; attention projections as "<mha>.in_proj" / "<mha>.out_proj"
    shape: tuple[int, int]         # (out_features, in_features); in_proj: (3 * embed_dim, embed_dim)
    sparsity: float                # fraction of exact zeros in the weight
    use: str                       # "dense", "csr" or "semi_structured"
    reason: str
    timings: dict[int, tuple[float, float]] = field(default_factory=dict)  # batch -> (dense s, sparse s)

    @property
    def converted(self) -> bool:
        return self.use != "dense"

    def speedup(self, batch: int) -> float:
        dense, sparse = self.timings[batch]
        return dense / sparse if sparse > 0 else float("inf")


@dataclass
class _Unit:
    name: str
    kind: str                       # "linear" or "mha"
    part: str                       # "" for Linear, "in_proj" / "out_proj" for attention
    module: nn.Module
    weights: list[Tensor]
    biases: list[Tensor | None]
    dense_forward: Callable[[list[Tensor]], Any]

    @property
    def label(self) -> str:
        return f"{self.name}.{self.part}" if self.part else self.name

    @property
    def shape(self) -> tuple[int, int]:
        return sum(int(w.shape[0]) for w in self.weights), int(self.weights[0].shape[1])

    @property
    def sparsity(self) -> float:
        n = sum(w.numel() for w in self.weights)
        return 1.0 - sum(int(torch.count_nonzero(w)) for w in self.weights) / max(n, 1)


def _units(model: nn.Module) -> list[_Unit]:
    """Linear layers and attention projections, in module order."""
    units: list[_Unit] = []
    inside_mha: set[int] = set()
    for name, mod in model.named_modules():
        if isinstance(mod, nn.MultiheadAttention):
            inside_mha.update(id(m) for m in mod.modules())
            ws = list(_in_proj_weights(mod))
            bs = list(mod.in_proj_bias.chunk(3)) if mod.in_proj_bias is not None else [None] * 3
            if mod.in_proj_weight is not None:
                dense = (lambda xs, m=mod: F.linear(xs[0], m.in_proj_weight, m.in_proj_bias))
            else:
                dense = (lambda xs, ws=ws, bs=bs: [F.linear(x, w, b) for x, w, b in zip(xs, ws, bs)])
            units.append(_Unit(name, "mha", "in_proj", mod, ws, bs, dense))
            op = mod.out_proj
            units.append(_Unit(name, "mha", "out_proj", mod, [op.weight], [op.bias],
                               lambda xs, op=op: F.linear(xs[0], op.weight, op.bias)))
        elif type(mod) is nn.Linear and id(mod) not in inside_mha:
            units.append(_Unit(name, "linear", "", mod, [mod.weight], [mod.bias],
                               lambda xs, m=mod: F.linear(xs[0], m.weight, m.bias)))
    return units


def _unit_inputs(unit: _Unit, batch: int) -> list[Tensor]:
    w = unit.weights[0]
    g = torch.Generator(device=w.device).manual_seed(batch)
    if unit.part == "in_proj" and unit.module.in_proj_weight is not None:
        return [torch.randn(batch, w.shape[1], generator=g, device=w.device, dtype=w.dtype)]
    return [torch.randn(batch, wi.shape[1], generator=g, device=w.device, dtype=w.dtype) for wi in unit.weights]


def _try_semi_structured(unit: _Unit, batches: Sequence[int], reps: int) -> tuple[dict | None, str]:
    """CUDA 2:4 candidate for a Linear unit: ({batch: seconds}, note) or (None, why not)."""
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return None, "this PyTorch has no semi-structured sparse kernels"
    w, bias = unit.weights[0], unit.biases[0]
    try:
        mod = SemiStructuredLinear(w, bias)
        times = {}
        for b in batches:
            x = _unit_inputs(unit, b)[0]
            with torch.inference_mode():
                got, ref = mod(x).float(), F.linear(x, w, bias).float()
            if not torch.allclose(got, ref, rtol=1e-2, atol=1e-2 * float(ref.abs().max())):
                return None, "semi-structured result differs from dense; not used"
            times[b] = measure({"semi": lambda x=x: mod(x)}, reps, device=w.device)["semi"]
        return times, "semi-structured 2:4 kernels"
    except Exception as e:  # unsupported dtype, shape or GPU: the kernels say so by raising
        return None, f"semi-structured kernels unavailable here ({type(e).__name__}: {str(e)[:80]})"


def _csr_failure(unit: _Unit) -> str:
    """Why a CSR module of this unit cannot run here (e.g. fp16 on CPU), or "" when it can."""
    try:
        with torch.inference_mode():
            for (w, b), x in zip(zip(unit.weights, unit.biases), _probe_inputs(unit)):
                SparseLinear(w, b)(x)
    except (RuntimeError, NotImplementedError) as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
    return ""


def _probe_inputs(unit: _Unit) -> list[Tensor]:
    return [torch.zeros(1, w.shape[1], device=w.device, dtype=w.dtype) for w in unit.weights]


def plan_inference(
    model: nn.Module,
    batches: Sequence[int] = (1, 16, 128),
    *,
    threshold: float | None = None,
    min_speedup: float = 1.1,
    min_sparsity: float = 0.5,
    reps: int = 5,
) -> list[LayerDecision]:
    """Decide, per Linear layer and attention projection, whether CSR (or 2:4 on CUDA) is used.

    With ``threshold`` (a sparsity measured on this machine with ``benchmarks/inference.py``),
    a layer is converted when its sparsity is at least the threshold; nothing is timed.
    Otherwise every layer at least ``min_sparsity`` sparse is timed, dense ``F.linear``
    against the sparse module, at each batch size in ``batches`` (median of ``reps``
    interleaved samples), and converted only when the sparse module is at least
    ``min_speedup`` times faster at every batch size: a converted layer is never slower
    at the sizes it was calibrated for.
    """
    batches = sorted({int(b) for b in batches})
    if not batches or batches[0] < 1:
        raise ValueError(f"batch sizes must be positive integers, got {batches}")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold is a sparsity in [0, 1], got {threshold}")
    if min_speedup < 1.0:
        raise ValueError(f"min_speedup must be at least 1 (never slower), got {min_speedup}")
    decisions = []
    for unit in _units(model):
        sparsity = unit.sparsity
        device = unit.weights[0].device
        if unit.kind == "mha" and (unit.module.bias_k is not None or unit.module.add_zero_attn):
            decisions.append(LayerDecision(unit.label, unit.shape, sparsity, "dense",
                                           "attention with add_bias_kv/add_zero_attn is kept dense"))
            continue
        two_four = unit.kind == "linear" and is_2to4(unit.weights[0])
        note = ""
        if two_four and device.type != "cuda":
            note = "; 2:4 pattern: semi-structured kernels are CUDA-only, not used on CPU"
        broken = _csr_failure(unit)
        if broken:
            decisions.append(LayerDecision(unit.label, unit.shape, sparsity, "dense",
                                           f"CSR kernels unavailable here ({broken}){note}"))
            continue
        if threshold is not None:
            use = "csr" if sparsity >= threshold else "dense"
            rel = ">=" if use == "csr" else "<"
            decisions.append(LayerDecision(unit.label, unit.shape, sparsity, use,
                                           f"sparsity {sparsity:.1%} {rel} threshold {threshold:.1%}{note}"))
            continue
        if sparsity < min_sparsity:
            decisions.append(LayerDecision(unit.label, unit.shape, sparsity, "dense",
                                           f"sparsity {sparsity:.1%} < {min_sparsity:.0%}: not timed{note}"))
            continue
        sparse_mods = [SparseLinear(w, b) for w, b in zip(unit.weights, unit.biases)]
        timings = {}
        for b in batches:
            xs = _unit_inputs(unit, b)
            pairs = list(zip(sparse_mods, xs * len(sparse_mods) if len(xs) == 1 else xs))
            t = measure({"dense": lambda xs=xs, u=unit: u.dense_forward(xs),
                         "sparse": lambda pairs=pairs: [m(x) for m, x in pairs]}, reps, device=device)
            timings[b] = (t["dense"], t["sparse"])
        best, best_times, why = "csr", {b: s for b, (_, s) in timings.items()}, "CSR"
        if two_four and device.type == "cuda":
            semi, semi_note = _try_semi_structured(unit, batches, reps)
            if semi is not None and all(semi[b] < best_times[b] for b in batches):
                best, best_times, why = "semi_structured", semi, semi_note
                timings = {b: (timings[b][0], semi[b]) for b in batches}
            elif semi is None:
                note = f"; {semi_note}"
        slowest = min(timings[b][0] / best_times[b] for b in batches)
        if slowest >= min_speedup:
            decisions.append(LayerDecision(unit.label, unit.shape, sparsity, best,
                                           f"{why} faster at every batch (at least {slowest:.2f}x){note}", timings))
        else:
            worst = min(batches, key=lambda b: timings[b][0] / best_times[b])
            decisions.append(LayerDecision(
                unit.label, unit.shape, sparsity, "dense",
                f"{why} only {slowest:.2f}x dense at batch {worst} (needs {min_speedup:.2f}x){note}", timings))
    return decisions


def _strip_enforcement(model: nn.Module) -> None:
    """Drop the forward pre-hooks of mask enforcement (SparseHandle): not needed at inference."""
    from ..engine.handle import SparseHandle
    for mod in model.modules():
        for key, hook in list(mod._forward_pre_hooks.items()):
            if isinstance(getattr(hook, "__self__", None), SparseHandle):
                del mod._forward_pre_hooks[key]


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


@torch.no_grad()
def to_inference(
    model: nn.Module,
    batches: Sequence[int] = (1, 16, 128),
    *,
    threshold: float | None = None,
    min_speedup: float = 1.1,
    min_sparsity: float = 0.5,
    reps: int = 5,
    plan: list[LayerDecision] | None = None,
    inplace: bool = False,
) -> nn.Module:
    """A copy of ``model`` (``inplace=True``: the model itself) for inference, in eval mode,
    whose Linear layers and attention projections use CSR where :func:`plan_inference`
    found it faster (or where ``plan`` says so). The decisions are kept on the result as
    ``sparse_inference_plan``. Mask-enforcement hooks are removed from the result.
    """
    if plan is None:
        plan = plan_inference(model, batches, threshold=threshold, min_speedup=min_speedup,
                              min_sparsity=min_sparsity, reps=reps)
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    _strip_enforcement(model)
    use = {d.name: d.use for d in plan}
    for unit in _units(model):
        if unit.kind == "linear":
            choice = use.get(unit.label, "dense")
            if choice == "csr":
                _set_submodule(model, unit.name, SparseLinear.from_linear(unit.module))
            elif choice == "semi_structured":
                _set_submodule(model, unit.name, SemiStructuredLinear(unit.module.weight, unit.module.bias))
        elif unit.part == "in_proj":
            sparse_in = use.get(unit.label, "dense") != "dense"
            sparse_out = use.get(f"{unit.name}.out_proj", "dense") != "dense"
            if sparse_in or sparse_out:
                _set_submodule(model, unit.name, SparseMultiheadAttention(unit.module, sparse_in, sparse_out))
    model.sparse_inference_plan = plan
    return model


# -------------------------------------------------------------------------- benchmark

@dataclass
class InferenceBench:
    """Per-layer and end-to-end latencies (seconds) of the dense model and its converted copy."""

    batches: list[int]
    layers: list[LayerDecision]
    end_to_end: dict[int, tuple[float, float]]   # batch -> (dense s, converted s); empty when not measurable
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"threads: {torch.get_num_threads()}; latencies are medians of interleaved runs"]
        head = f"{'layer':<28} {'shape':<14} {'sparsity':>8} {'batch':>6} {'dense ms':>10} {'sparse ms':>10} {'speedup':>8}  used"
        lines += ["per layer (sparse = the CSR module, timed whether used or not):", head, "-" * len(head)]
        for d in self.layers:
            shape = f"{d.shape[0]}x{d.shape[1]}"
            if not d.timings:
                lines.append(f"{d.name:<28} {shape:<14} {d.sparsity:>8.1%} {'-':>6} {'-':>10} {'-':>10} {'-':>8}  "
                             f"{d.use} ({d.reason})")
            for b in sorted(d.timings):
                dense, sparse = d.timings[b]
                lines.append(f"{d.name:<28} {shape:<14} {d.sparsity:>8.1%} {b:>6} {dense * 1e3:>10.3f} "
                             f"{sparse * 1e3:>10.3f} {dense / sparse:>7.2f}x  {d.use}")
        if self.end_to_end:
            lines += ["end to end (dense model vs converted model):",
                      f"{'batch':>6} {'dense ms':>10} {'sparse ms':>10} {'speedup':>8}"]
            for b, (dense, sparse) in sorted(self.end_to_end.items()):
                lines.append(f"{b:>6} {dense * 1e3:>10.3f} {sparse * 1e3:>10.3f} {dense / sparse:>7.2f}x")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


class _LayerBank(nn.Module):
    """Stored sparse Linear weights as independent layers (when no model can be rebuilt)."""

    def __init__(self, layers: dict[str, nn.Linear]):
        super().__init__()
        self.layers = nn.ModuleDict({f"l{i}": lin for i, lin in enumerate(layers.values())})
        self.display = dict(zip(self.layers.keys(), layers.keys()))


def _model_from_file(path: str) -> tuple[nn.Module, Callable[[int], Tensor] | None, list[str]]:
    from .export import build_model, load_sparse, read_sparse
    sf = read_sparse(path)
    model = build_model(sf.model_spec)
    if model is not None:
        load_sparse(path, model)
        n_in = sf.model_spec["sizes"][0]
        return model, (lambda b: torch.randn(b, n_in, generator=torch.Generator().manual_seed(b))), \
            [f"model rebuilt from the file's spec {sf.model_spec}"]
    layers = {}
    state = sf.state_dict
    for name in sf.masks:
        w = state[name]
        if w.dim() != 2 or not w.is_floating_point():
            continue
        bias_name = name[: -len("weight")] + "bias" if name.endswith("weight") else None
        b = state.get(bias_name) if bias_name else None
        if b is not None and tuple(b.shape) != (w.shape[0],):
            b = None
        layers[name] = _dense_linear(w, b)
    if not layers:
        raise ValueError(f"{path} has no model spec and no 2-D sparse weight to benchmark")
    return _LayerBank(layers), None, ["no model spec in the file: each sparse 2-D weight is benchmarked "
                                      "as a Linear layer of its own; no end-to-end figure"]


def _default_input(model: nn.Module) -> Callable[[int], Tensor] | None:
    """A batch maker for models that start with a Linear layer (MLP-like Sequentials)."""
    if isinstance(model, nn.Sequential) and len(model) and isinstance(model[0], nn.Linear):
        first = model[0]
        return lambda b: torch.randn(b, first.in_features, generator=torch.Generator().manual_seed(b),
                                     dtype=first.weight.dtype).to(first.weight.device)
    return None


def bench_inference(
    model_or_file: nn.Module | str | os.PathLike,
    batches: Sequence[int] = (1, 16, 128),
    *,
    example_input: Callable[[int], Any] | None = None,
    reps: int = 5,
    min_speedup: float = 1.1,
) -> InferenceBench:
    """Dense vs sparse latency per layer (every Linear and attention projection, timed at
    each batch size) and end to end (the model against ``to_inference`` of it).

    ``model_or_file`` is a model or a file written by :func:`fastsparse.deploy.export.save_sparse`.
    End-to-end timing needs ``example_input(batch)`` (a tensor or a tuple of arguments);
    it is inferred for Sequentials that start with a Linear layer and for files holding
    an MLP spec.
    """
    notes = []
    if isinstance(model_or_file, (str, os.PathLike)):
        model, file_input, notes = _model_from_file(os.fspath(model_or_file))
        example_input = example_input or file_input
    else:
        model = model_or_file
    dense = copy.deepcopy(model).eval()
    _strip_enforcement(dense)
    plan = plan_inference(dense, batches, min_speedup=min_speedup, min_sparsity=0.0, reps=reps)
    if isinstance(dense, _LayerBank):
        for d in plan:
            d.name = dense.display.get(d.name.removeprefix("layers."), d.name)
    converted = to_inference(dense, plan=plan)
    if example_input is None:
        example_input = _default_input(dense)
    e2e = {}
    if example_input is not None:
        for b in sorted({int(x) for x in batches}):
            args = example_input(b)
            args = args if isinstance(args, tuple) else (args,)
            device = next(dense.parameters()).device
            t = measure({"dense": lambda a=args: dense(*a), "sparse": lambda a=args: converted(*a)},
                        reps, device=device)
            e2e[b] = (t["dense"], t["sparse"])
    elif not isinstance(dense, _LayerBank):
        notes.append("no example_input: end-to-end latency not measured")
    devices = {p.device.type for p in dense.parameters()}
    if "cuda" not in devices:
        notes.append(SEMI_STRUCTURED_CPU_NOTE)
    return InferenceBench(sorted({int(x) for x in batches}), plan, e2e, notes)


def bench_inference_command(file: str, batches: Iterable[int] = (1, 16, 128)) -> str:
    """``fastsparse bench-inference FILE --batch 1,16,128``: the printed benchmark."""
    batches = [int(b) for b in batches]
    result = bench_inference(file, batches)
    return f"{file}: dense vs sparse (CSR) inference\n{result}"
