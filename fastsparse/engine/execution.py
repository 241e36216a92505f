"""Sparse execution: the second representation of a sparse parameter.

``masked`` (the default): a dense weight and a bool ``<param>_mask`` buffer, the masks re-applied
after every step; works for every layer type, costs dense time and memory.

``sparse``: the layer becomes a :class:`~fastsparse.core.sparse_linear.SparseLinear` whose only
trainable tensor is the vector of active values (CSR structure beside it): forward, input
gradient and value gradient cost O(nnz), and the optimizer state is the size of the values. The
engine swaps the optimizer's dense weight for the values in place (hyperparameters and state
kept, the state compacted). At a mask update the algorithm decides as always; kept weights and
their state move to their new slots, grown ones start at 0 with zeroed state. The dense gradient
an update needs is rebuilt from the inputs and output gradients the layer keeps on the step
before an update only, one block of rows at a time for the fast decisions of :mod:`.compact`.

``auto``: a layer runs sparse only where a short calibration on this machine measures a whole
training step of it at least 1.25x faster than the masked one; layers denser than 50 % are not timed
(they stay masked); ``sparse`` takes every layer that can.

A layer that cannot run sparse stays masked, with the reason: only ``nn.Linear`` weights (a
subclass's forward is its own; attention projections are read by their module), float32 or
float64, on the CPU or CUDA, not under ``torch.distributed`` (the values change size at updates,
which DDP's buckets do not allow), and not in a group whose recipe rewinds or superposes dense
states (IMP, Sup-tickets, fasterai's in-fit tickets).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ..core import native
from ..core.masks import MASK_SUFFIX, SparseParam
from ..core.sharded import global_count
from ..core.sparse_linear import SparseLinear
from .recipe import EntryPointRefused, recipe_class

__all__ = ["cpu_kernels", "EXECUTIONS", "ExecutionRefused", "check_plan", "match_layout", "Choice", "CompactParam", "choose", "to_compact", "check_execution", "compact_params",
           "active_count", "numel_of"]

EXECUTIONS = ("masked", "sparse", "auto")
AUTO_MAX_DENSITY = 0.5   # auto does not time denser layers: measured, the sparse kernels break even near 50%
# auto runs a layer sparse only where its lone step is measured this much faster: a lone layer's
# step flatters the sparse kernels (a whole model adds updates, and the two are timed seconds
# apart on a busy machine), and a wrong choice for sparse costs more than one for masked
AUTO_MARGIN = 1.25
_DTYPES = (torch.float32, torch.float64)


@dataclass
class Choice:
    """How one sparse parameter runs, and why."""

    name: str
    shape: tuple[int, ...]
    execution: str                    # "sparse" or "masked"
    reason: str
    masked_ms: float | None = None    # measured by the calibration of ``auto``
    sparse_ms: float | None = None

    def as_dict(self) -> dict[str, Any]:
        out = {"execution": self.execution, "reason": self.reason}
        if self.masked_ms is not None:
            out.update(masked_ms=round(self.masked_ms, 3), sparse_ms=round(self.sparse_ms, 3))
        return out


class CompactParam:
    """The engine's handle of a sparse-executed weight: the :class:`SparseLinear` that holds it.

    ``param`` is a meta tensor of the dense shape (shape queries of the algorithms work, reading
    values does not: decisions get dense views or the compact fast path); ``mask`` is built on
    demand, never on the hot path.
    """

    compact = True

    def __init__(self, name: str, parent: nn.Module, attr: str, module: SparseLinear):
        self.name, self.parent, self.attr, self.module = name, parent, attr, module
        self.shape = (module.out_features, module.in_features)
        self.registered = module.values   # the Parameter the optimizer holds

    @property
    def param(self) -> Tensor:
        return torch.empty(self.shape, device="meta", dtype=self.module.values.dtype)

    @property
    def values(self) -> nn.Parameter:
        return self.module.values

    @property
    def mask(self) -> Tensor:
        return self.module.mask()

    @property
    def mask_name(self) -> str:
        return self.name + MASK_SUFFIX

    def flat(self) -> Tensor:
        return self.module.structure.flat()

    def resync(self, optimizer: Any) -> None:
        """Make the optimizer hold the layer's current values (a loaded checkpoint of another count of
        active weights replaces the values Parameter), its state moved along."""
        current = self.module.values
        if optimizer is None or self.registered is current:
            self.registered = current
            return
        for group in getattr(optimizer, "param_groups", []):
            group["params"] = [current if p is self.registered else p for p in group["params"]]
        state = getattr(optimizer, "state", None)
        if state is not None and self.registered in state:
            state[current] = state.pop(self.registered)
        self.registered = current

    def __repr__(self) -> str:
        return f"CompactParam({self.name!r}, nnz={self.module.nnz}, shape={self.shape})"


def active_count(sp: Any) -> int:
    return sp.module.nnz if getattr(sp, "compact", False) else global_count(sp.mask)


def numel_of(sp: Any) -> int:
    return sp.shape[0] * sp.shape[1] if getattr(sp, "compact", False) else sp.mask.numel()


def compact_params(model: nn.Module) -> list[tuple[str, nn.Module, str, SparseLinear]]:
    """Every :class:`SparseLinear` of ``model``: (weight name, parent, attribute, module)."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, SparseLinear):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            out.append((f"{name}.weight" if name else "weight", parent, attr, module))
    return out


def check_execution(execution: Any) -> str | dict[str, str]:
    if isinstance(execution, dict):
        bad = {k: v for k, v in execution.items() if v not in ("sparse", "masked")}
        if bad:
            raise ValueError(f"a per-layer execution must be 'sparse' or 'masked', got {bad}")
        return dict(execution)
    if execution not in EXECUTIONS:
        raise ValueError(f"execution must be one of {list(EXECUTIONS)} (or a dict layer -> 'sparse'/'masked'), "
                         f"got {execution!r}")
    return execution


# an attach-only engine compacts layers before the optimizer exists (Lightning's setup): the
# optimizer is then built over the compact values
OPTIMIZER_LATER = object()


class ExecutionRefused(ValueError):
    """The execution asked for cannot run as asked (raised before the engine changes anything)."""


def check_plan(groups: Sequence[Any], execution: str | dict[str, str], optimizer: Any) -> None:
    """An explicit ask must be met: ``"sparse"`` needs at least one layer that can run sparse, and a
    dict must name sparse parameters of the engine, each able to run as it says."""
    if execution in ("masked", "auto"):
        return
    reasons = {sp.name: (None if getattr(sp, "compact", False) else _ineligible(sp, g.algorithm, g.recipe, optimizer))
               for g in groups for sp in g.params}
    if isinstance(execution, dict):
        unknown = sorted(set(execution) - set(reasons))
        if unknown:
            raise ExecutionRefused(f"execution names {unknown}, which the engine does not train as sparse "
                                   f"parameters; known: {sorted(reasons)}")
        bad = {n: reasons[n] for n, e in execution.items() if e == "sparse" and reasons[n] is not None}
        if bad:
            raise ExecutionRefused("cannot run sparse as asked: " + "; ".join(f"{n}: {r}" for n, r in bad.items()))
        return
    if reasons and all(r is not None for r in reasons.values()):
        raise ExecutionRefused("execution='sparse', but no sparse parameter can run sparse ("
                               + "; ".join(sorted(set(reasons.values()))) + "); use 'masked' (or 'auto', which "
                               "trains each layer as it can and says why)")


def _ineligible(sp: SparseParam, algorithm: Any, recipe: Any, optimizer: Any) -> str | None:
    """Why this parameter cannot run sparse (None: it can)."""
    module = sp.module
    if type(module) is not nn.Linear or sp.attr != "weight":
        kind = type(module).__name__
        return (f"{kind} has no sparse path (only nn.Linear weights; a subclass's forward is its own, attention "
                "projections are read by their module)")
    if sp.param.dtype not in _DTYPES:
        return f"dtype {sp.param.dtype} (the sparse kernels take float32 and float64)"
    if sp.param.device.type not in ("cpu", "cuda"):
        return f"device {sp.param.device.type} (the sparse kernels run on the CPU and CUDA)"
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return "torch.distributed: the compact values change size at mask updates, which DDP's buckets do not allow"
    return _method_reason(algorithm, recipe, optimizer)


def _method_reason(algorithm: Any, recipe: Any, optimizer: Any) -> str | None:
    """Why the method or the optimizer cannot train compact weights (None: they can)."""
    recipe_cls = type(recipe) if recipe is not None else recipe_class(algorithm)
    if recipe_cls is not None and not getattr(recipe_cls, "compact", False):
        return f"{algorithm.name}'s recipe rewinds or superposes the dense state of the model"
    reason = algorithm.compact_reason()
    if reason:
        return f"{algorithm.name}: {reason}"
    if optimizer is None:
        return ("the engine has no optimizer to give the compact values to (pass it to the engine, which swaps "
                "its dense weights for them)")
    if optimizer is not OPTIMIZER_LATER and not _swappable(optimizer):
        return (f"{type(optimizer).__name__} is not a torch optimizer, whose parameters the engine can swap for the "
                "compact values (fastai: opt_func=partial(OptimWrapper, opt=torch.optim.SGD))")
    return None


def _swappable(optimizer: Any) -> bool:
    # a torch optimizer's param_groups are its own dicts; fastai's optimizer builds new ones on every
    # read, so a swap there would change nothing and the values would never train
    return isinstance(optimizer, torch.optim.Optimizer)


def choose(groups: Sequence[Any], execution: str | dict[str, str], optimizer: Any, batch_size: int) -> list[Choice]:
    """How each sparse parameter of the groups runs (see the module)."""
    choices = []
    for g in groups:
        for sp in g.params:
            if getattr(sp, "compact", False):
                why = _method_reason(g.algorithm, g.recipe, optimizer)
                if why is not None:   # it has no dense weight to fall back to
                    raise ValueError(f"{sp.name} is a SparseLinear (no dense weight), which cannot be trained "
                                     f"this way: {why}. Build the model with nn.Linear layers to train it masked")
                choices.append(Choice(sp.name, sp.shape, "sparse", "a SparseLinear already"))
                continue
            shape = tuple(sp.param.shape)
            wanted = execution.get(sp.name, "masked") if isinstance(execution, dict) else execution
            if wanted == "masked":
                choices.append(Choice(sp.name, shape, "masked", "execution: masked"))
                continue
            why = _ineligible(sp, g.algorithm, g.recipe, optimizer)
            if why is not None:
                choices.append(Choice(sp.name, shape, "masked", f"cannot run sparse: {why}"))
            elif wanted == "sparse":
                choices.append(Choice(sp.name, shape, "sparse", "execution: sparse"))
            elif active_count(sp) > AUTO_MAX_DENSITY * numel_of(sp):
                choices.append(Choice(sp.name, shape, "masked", f"density {active_count(sp) / numel_of(sp):.0%}: too dense "
                                      f"to gain (auto times layers up to {AUTO_MAX_DENSITY:.0%})"))
            else:
                device = sp.param.device
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    masked_ms, sparse_ms = calibrate(sp, batch_size)   # the run's random draws stay as they were
                faster = sparse_ms * AUTO_MARGIN < masked_ms
                verdict = f"measured {masked_ms / sparse_ms:.2f}x the masked step" + ("" if faster else
                                                                                      f": under the {AUTO_MARGIN}x auto asks for")
                choices.append(Choice(sp.name, shape, "sparse" if faster else "masked", verdict, masked_ms, sparse_ms))
    return choices


def cpu_kernels(choices: Sequence[Choice], model: nn.Module) -> str | None:
    """Which kernels the sparse layers run on when they run on the CPU (``native (avx512)``, or
    ``torch (MKL): <why the compiled ones are not used>``); None when no layer runs sparse on it."""
    if not any(c.execution == "sparse" for c in choices):
        return None
    if all(p.device.type != "cpu" for p in model.parameters()):
        return None
    return native.status()


def _ms_per_call(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return 1000 * (time.perf_counter() - t0) / calls


@torch.no_grad()
def calibrate(sp: SparseParam, batch_size: int, reps: int = 5) -> tuple[float, float]:
    """(masked, sparse) milliseconds of one whole training step of this layer alone (forward,
    backward, SGD-momentum update, and for masked the mask re-applied), interleaved, medians."""
    w, mask = sp.param.detach(), sp.mask
    dense = nn.Linear(w.shape[1], w.shape[0], bias=sp.module.bias is not None).to(w.device, w.dtype)
    dense.weight.copy_(w)
    factor = mask.to(w.dtype)
    sparse = SparseLinear.from_dense(dense, mask)
    sparse.bias = None if dense.bias is None else nn.Parameter(dense.bias.detach().clone())
    x = torch.randn(batch_size, w.shape[1], device=w.device, dtype=w.dtype)

    def step(layer, opt, masked: bool):
        def run():
            with torch.enable_grad():
                opt.zero_grad(set_to_none=True)
                layer(x).square().mean().backward()
                opt.step()
            if masked:
                layer.weight.mul_(factor)
            if w.device.type == "cuda":
                torch.cuda.synchronize(w.device)
        return run

    runs = {"masked": step(dense, torch.optim.SGD(dense.parameters(), lr=1e-3, momentum=0.9), True),
            "sparse": step(sparse, torch.optim.SGD(sparse.parameters(), lr=1e-3, momentum=0.9), False)}
    # warm up, then as many calls per round as make it last about 5 ms (small layers are timed
    # over many steps, so that timer noise does not decide)
    calls = max(1, min(100, int(5.0 / max(1e-3, max(_ms_per_call(fn, 2) for fn in runs.values())))))
    times: dict[str, list[float]] = {"masked": [], "sparse": []}
    for _ in range(reps):   # interleaved rounds, so that a busy machine slows both alike
        for k, fn in runs.items():
            times[k].append(_ms_per_call(fn, calls))
    return statistics.median(times["masked"]), statistics.median(times["sparse"])


@torch.no_grad()
def match_layout(model: nn.Module, state: dict[str, Tensor], prefix: str = "") -> list[str]:
    """Make each Linear layer of ``model`` the form ``state`` (a state dict about to load) holds it
    in: a SparseLinear where it holds ``<layer>.values`` and its CSR structure, a masked nn.Linear
    where it holds ``<layer>.weight``. Before the optimizer exists (a resumed Lightning fit).
    Returns the weight names changed."""
    from ..core.csr import CSRStructure
    from ..core.masks import SparseParam, attach_mask

    changed = []
    for name, module in list(model.named_modules()):
        key = f"{prefix}{name}." if name else prefix
        parent_name, _, child = name.rpartition(".")
        if not child:
            continue
        parent = model.get_submodule(parent_name) if parent_name else model
        if type(module) is nn.Linear and isinstance(state.get(key + "values"), Tensor):
            shape = (module.out_features, module.in_features)
            st = CSRStructure(shape, *(state[key + k].to(module.weight.device)
                                       for k in ("crow", "col", "crow_t", "col_t", "perm")))
            values = state[key + "values"].to(module.weight.device, module.weight.dtype)
            setattr(parent, child, SparseLinear(module.in_features, module.out_features, values, st, module.bias))
        elif isinstance(module, SparseLinear) and isinstance(state.get(key + "weight"), Tensor):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.to(module.values.device, module.values.dtype)
            if module.bias is not None:
                linear.bias = module.bias
            setattr(parent, child, linear)
            mask = state.get(key + "weight" + MASK_SUFFIX)
            if isinstance(mask, Tensor):
                attach_mask(SparseParam(f"{name}.weight", linear, "weight"), mask)
        else:
            continue
        changed.append(f"{name}.weight")
    return changed


@torch.no_grad()
def to_compact(model: nn.Module, sp: SparseParam, optimizer: Any) -> CompactParam:
    """Replace ``sp``'s nn.Linear by a SparseLinear holding its active weights; in the optimizer,
    the dense weight becomes the values (its state compacted to the active positions)."""
    linear, mask = sp.module, sp.mask.bool()
    flat = mask.reshape(-1).nonzero().squeeze(1)
    sparse = SparseLinear.from_dense(linear, mask)   # keeps the layer's own bias Parameter
    weight = linear.weight
    if optimizer is not None:
        for group in optimizer.param_groups:
            group["params"] = [sparse.values if p is weight else p for p in group["params"]]
        state = optimizer.state.pop(weight, None)
        if state:
            optimizer.state[sparse.values] = {
                k: (v.reshape(-1).index_select(0, flat).clone() if isinstance(v, Tensor) and v.shape == weight.shape
                    else v) for k, v in state.items()}
    module_name = sp.name.rpartition(".")[0]
    parent_name, _, child = module_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not child:
        raise EntryPointRefused(f"{sp.name} is the model's own weight: the model itself would have to be replaced")
    setattr(parent, child, sparse)
    return CompactParam(sp.name, parent, child, sparse)
