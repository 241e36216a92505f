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
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .modules import (
    SemiStructuredLinear, SparseLinear, SparseMultiheadAttention, _in_proj_weights, is_2to4,
)

__all__ = ["SparseLinear", "SparseMultiheadAttention", "LayerDecision", "plan_inference", "to_inference", "measure",
           "is_2to4"]


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
