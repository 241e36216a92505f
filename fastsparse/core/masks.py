"""Masks: bool buffers ``<param>_mask`` on the module that owns each sparse parameter.

Keeping the mask as a persistent buffer next to its parameter means ``state_dict()``
carries it, ``load_state_dict()`` restores it into a model that was sparsified first,
``model.to(device)`` moves it and DDP can broadcast it. Everything else in the library
finds the sparse parameters again from these buffers (:func:`sparse_params`).

Selection is exact: :func:`topk_mask` keeps exactly ``k`` entries, chosen with
an unsorted ``topk`` from the nearer end (after bounding the threshold with a fixed sample on
large tensors), never a full sort, and ties at
the threshold go to the lowest flat index, so the result is the same on every device and
every rank.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from .sharded import is_sharded, local, shard_like

__all__ = [
    "MASK_SUFFIX", "SparseParam", "default_param_filter", "select_params", "sparse_params",
    "attach_mask", "detach_masks", "apply_masks", "n_keep", "topk_mask", "global_topk_masks",
    "sparsity_of", "MaskSet", "snapshot_state", "restore_state", "DENSE_NAME_PARTS", "zero_outside_",
    "check_not_empty",
]

MASK_SUFFIX = "_mask"

_SPARSIFIABLE_MODULES = (
    nn.Linear, nn.Bilinear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
)
_MHA_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
DENSE_NAME_PARTS = ("embed", "norm", "lm_head")


@dataclass(frozen=True)
class SparseParam:
    """A parameter that carries a mask: ``module.<attr>`` is the weight, ``module.<attr>_mask`` the mask."""

    name: str
    module: nn.Module
    attr: str

    @property
    def param(self) -> nn.Parameter:
        return getattr(self.module, self.attr)

    @property
    def mask(self) -> Tensor:
        return self.module._buffers[self.attr + MASK_SUFFIX]

    @property
    def mask_name(self) -> str:
        return self.name + MASK_SUFFIX


_INT_VIEWS = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


def _bits(mask: Tensor, like: Tensor) -> Tensor:
    """All-ones bits where ``mask`` is True, zero bits elsewhere, in the integer type of ``like``'s width."""
    dtype = _INT_VIEWS[like.element_size()]
    return torch.where(mask, torch.tensor(-1, dtype=dtype, device=mask.device),
                       torch.tensor(0, dtype=dtype, device=mask.device))


@torch.no_grad()
def zero_outside_(param: Tensor, mask: Tensor) -> Tensor:
    """Every weight outside ``mask`` becomes exactly +0.0, whatever it held (NaN and inf included);
    the weights inside keep their bits. (A multiply would leave NaN · 0 = NaN.)"""
    if param.is_floating_point():
        param.view(_INT_VIEWS[param.element_size()]).bitwise_and_(_bits(mask, param))
    else:
        param.mul_(mask)
    return param


def check_not_empty(names: Sequence[str], numels: Sequence[int], sparsities: Sequence[float], who: str) -> None:
    """The rule for empty layers: a sparse parameter keeps at least one weight. A sparsity that
    leaves a layer none (round((1 − s) · N) = 0) is refused, with the layers and what would fit."""
    empty = [(n, k) for n, k, s in zip(names, numels, sparsities) if n_keep(k, s) == 0 and s > 0]
    if empty:
        listed = ", ".join(f"{n} ({k} weights at sparsity {s:.6g})" for (n, k), s in
                           zip(empty, [s for n, k, s in zip(names, numels, sparsities) if (n, k) in empty]))
        worst = min(k for _, k in empty)
        raise ValueError(f"{who} would leave no weight in {listed}: a sparse layer keeps at least one; use a "
                         f"sparsity below {1 - 0.5 / worst:.6g} for these layers, a distribution that keeps "
                         f"small layers denser (erk), or leave them out of the filter")


def n_keep(numel: int, sparsity: float) -> int:
    """Number of weights a tensor of ``numel`` elements keeps at ``sparsity``: round((1 - s) * n)."""
    return int(round((1.0 - sparsity) * numel))


def sparsity_of(mask: Tensor) -> float:
    return 1.0 - float(mask.sum()) / mask.numel()


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_name, _, attr = name.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), attr


def default_param_filter(name: str, param: Tensor, module: nn.Module) -> bool:
    """Weights of Linear, Conv and MultiheadAttention projections; never biases, norms,
    embeddings, ``lm_head`` or 1-D parameters."""
    if param.dim() < 2 or any(part in name.lower() for part in DENSE_NAME_PARTS):
        return False
    attr = name.rpartition(".")[2]
    if isinstance(module, nn.MultiheadAttention):
        return attr in _MHA_WEIGHTS
    return isinstance(module, _SPARSIFIABLE_MODULES) and attr == "weight"


def _as_patterns(patterns: str | Iterable[str] | None) -> list[str]:
    if patterns is None:
        return []
    return [patterns] if isinstance(patterns, str) else list(patterns)


def select_params(
    model: nn.Module,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    param_filter: Callable[[str, Tensor, nn.Module], bool] | None = None,
) -> list[SparseParam]:
    """The parameters of ``model`` a sparsity method acts on, in ``named_parameters`` order.

    With no ``include`` globs, :func:`default_param_filter` decides (or ``param_filter``
    when given); with globs, any parameter of two or more dimensions whose name matches one
    of them. ``exclude`` globs remove names afterwards. A pattern list that selects nothing
    is an error: a filter that matches no parameter is almost always a typo.
    """
    inc, exc = _as_patterns(include), _as_patterns(exclude)
    chosen = []
    for name, param in model.named_parameters():
        module, attr = _owner(model, name)
        if inc:
            ok = param.dim() >= 2 and any(fnmatch.fnmatchcase(name, pat) for pat in inc)
        else:
            ok = (param_filter or default_param_filter)(name, param, module)
        if ok and not any(fnmatch.fnmatchcase(name, pat) for pat in exc):
            chosen.append(SparseParam(name, module, attr))
    if not chosen:
        names = [n for n, _ in model.named_parameters()]
        if inc or exc:
            raise ValueError(
                f"the parameter filter (include={inc}, exclude={exc}) matches no parameter of "
                f"two or more dimensions; the model's parameters are {names}")
        raise ValueError(
            "the model has no sparsifiable parameter (weights of Linear, Conv or "
            f"MultiheadAttention layers); its parameters are {names}. Pass include globs to choose some.")
    return chosen


def sparse_params(model: nn.Module) -> list[SparseParam]:
    """Every parameter of ``model`` that has a mask buffer, found from the buffers themselves."""
    found = []
    for module_name, module in model.named_modules():
        for buf_name in module._buffers:
            if not buf_name.endswith(MASK_SUFFIX):
                continue
            attr = buf_name[: -len(MASK_SUFFIX)]
            if isinstance(module._parameters.get(attr), nn.Parameter):
                name = f"{module_name}.{attr}" if module_name else attr
                found.append(SparseParam(name, module, attr))
    return found


@torch.no_grad()
def attach_mask(sp: SparseParam, mask: Tensor) -> None:
    """Register (or overwrite in place) the mask buffer of ``sp`` and zero the masked weights."""
    param = sp.param
    if tuple(mask.shape) != tuple(param.shape):
        raise ValueError(f"mask for {sp.name} has shape {tuple(mask.shape)}, the parameter {tuple(param.shape)}")
    if is_sharded(param) and not is_sharded(mask):   # a whole mask for an FSDP-sharded weight: keep our rows
        mask = shard_like(mask.to(dtype=torch.bool), param)
    else:
        mask = mask.to(device=param.device, dtype=torch.bool)
    existing = sp.module._buffers.get(sp.attr + MASK_SUFFIX)
    if existing is not None:
        local(existing).copy_(local(mask))
    else:
        sp.module.register_buffer(sp.attr + MASK_SUFFIX, mask.clone(), persistent=True)
    zero_outside_(local(param), local(sp.mask))


def detach_masks(model: nn.Module) -> None:
    """Remove every mask buffer (the weights keep their zeros)."""
    for sp in sparse_params(model):
        del sp.module._buffers[sp.attr + MASK_SUFFIX]


@torch.no_grad()
def apply_masks(params: Sequence[Tensor], masks: Sequence[Tensor]) -> None:
    """weights *= mask, in place, as one fused call where the tensors allow."""
    if not params:
        return
    for p, m in zip(params, masks):
        zero_outside_(p, m)


class MaskSet:
    """The (weight, mask) pairs of a model, enforced in place: every masked weight becomes
    exactly 0, whatever it held (a NaN or an inf from a bad step included).

    ``find`` lists the sparse parameters; it is called again only when the first one's
    buffer or parameter was replaced by a new tensor (``model.to(...)``,
    ``load_state_dict(assign=True)``). FSDP-sharded weights and masks (DTensors) are enforced on
    their local shards. Floating weights are enforced by a bitwise AND of their
    bits with a cached integer mask (all ones where active): as fast as a float multiply (about
    6x faster than a float-by-bool multiply on the CPU) and, unlike a multiply, NaN-safe. The
    cached masks are rebuilt whenever a mask's version counter shows an in-place change (an
    update, ``load_state_dict``, ``attach_mask``).
    """

    def __init__(self, find: Callable[[], list[SparseParam]]):
        self._find = find
        self.refresh()

    def refresh(self) -> None:
        self.sparse = self._find()
        first = self.sparse[0] if self.sparse else None
        self._first = (first.mask, first.param) if first is not None else None
        self.params = [local(sp.param) for sp in self.sparse]
        self.masks = [local(sp.mask) for sp in self.sparse]
        self._factors: tuple[list[int], list[Tensor]] | None = None

    def stale(self) -> bool:
        if not self.sparse:
            return False
        sp = self.sparse[0]
        return self._first[0] is not sp.module._buffers.get(sp.attr + MASK_SUFFIX) or \
            self._first[1] is not sp.module._parameters.get(sp.attr)

    def factors(self) -> list[Tensor] | None:
        """The integer bit masks (None for inference-mode masks, which have no version counter)."""
        try:
            versions = [m._version for m in self.masks]
        except RuntimeError:
            return None
        if self._factors is None or self._factors[0] != versions:
            self._factors = (versions, [_bits(m, p) if p.is_floating_point() else m
                                        for p, m in zip(self.params, self.masks)])
        return self._factors[1]

    @torch.no_grad()
    def apply(self) -> None:
        """Every masked weight to exactly 0 (see the class)."""
        if self.stale():
            self.refresh()
        factors = self.factors()
        for p, m, f in zip(self.params, self.masks, factors or self.masks):
            if factors is None:
                zero_outside_(p, m)
            elif p.is_floating_point():
                p.view(f.dtype).bitwise_and_(f)
            else:
                p.mul_(f)


def _check_scores(scores: Tensor, where: str = "scores") -> None:
    if torch.isnan(scores).any():
        raise ValueError(f"{where} contain NaN; a score function must return finite numbers or ±inf")


# Selections from tensors of at least _BOUNDED_FROM elements first bound the threshold with a
# sample of _SAMPLE scores, then select exactly among the scores beyond the bound (see _kth_largest).
_BOUNDED_FROM = 1 << 18
_SAMPLE = 1 << 15


def _kth_smallest(values: Tensor, q: int) -> Tensor:
    """The q-th smallest of 1-D ``values`` with an unsorted ``topk`` from the nearer end (its
    cost follows the smaller side; unlike CPU ``kthvalue`` it stays fast on sorted input)."""
    c = values.numel()
    if q <= c - q + 1:
        return values.topk(q, largest=False, sorted=False).values.max()
    return values.topk(c - q + 1, sorted=False).values.min()


def _kth_largest(flat: Tensor, k: int) -> Tensor:
    """The k-th largest value of the 1-D, NaN-free ``flat`` (0 < k < n), exactly.

    For a large tensor, a fixed pseudo-random sample gives a bound that the threshold very
    probably passes; the exact selection then runs only over the values beyond the bound. If
    at least k values reach a lower bound b, the k-th largest value is >= b, so it is the
    k-th largest of those values too (symmetrically from above when the threshold is in the
    lower half). A bound that misses only costs time: the full selection runs instead.
    """
    n = flat.numel()
    q = n - k + 1  # the k-th largest is the q-th smallest
    if n >= _BOUNDED_FROM:
        pick = torch.randint(n, (_SAMPLE,), generator=torch.Generator().manual_seed(0)).to(flat.device)
        sample = flat[pick]
        expected = min(k, q) * _SAMPLE / n
        j = min(_SAMPLE, int(expected + 4.0 * expected ** 0.5) + 16)
        if k <= q:  # the j-th largest of the sample as a lower bound
            candidates = flat[flat >= _kth_smallest(sample, _SAMPLE - j + 1)]
            if candidates.numel() >= k:
                return _kth_smallest(candidates, candidates.numel() - k + 1)
        else:  # the j-th smallest of the sample as an upper bound
            candidates = flat[flat <= _kth_smallest(sample, j)]
            if candidates.numel() >= q:
                return _kth_smallest(candidates, q)
    if k <= n // 64:
        return flat.topk(k, sorted=False).values.min()
    return _kth_smallest(flat, q)  # CPU kthvalue is quadratic on descending input


def topk_mask(scores: Tensor, k: int) -> Tensor:
    """Bool mask of ``scores``' shape with exactly ``k`` True at the largest scores.

    Ties at the threshold go to the lowest flat indices, so the answer is deterministic.
    """
    n = scores.numel()
    if not 0 <= k <= n:
        raise ValueError(f"cannot keep {k} of {n} entries")
    flat = scores.reshape(-1)
    if k == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k == n:
        return torch.ones_like(scores, dtype=torch.bool)
    _check_scores(flat)
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()
    threshold = _kth_largest(flat, k)
    # count_nonzero, not sum: a bool sum widens to int64 and is ~50x slower on the CPU
    keep = flat > threshold
    n_above = int(keep.count_nonzero())
    tied = flat == threshold
    if n_above + int(tied.count_nonzero()) == k:
        keep |= tied
    else:  # the first k - n_above tied positions (nonzero lists indices in increasing order)
        keep[tied.nonzero()[: k - n_above, 0]] = True
    return keep.view(scores.shape)


def global_topk_masks(scores: Sequence[Tensor], k: int) -> list[Tensor]:
    """Exactly ``k`` True over all tensors together, at the largest scores (one threshold)."""
    flat = torch.cat([s.reshape(-1).to(scores[0].device, torch.float32) for s in scores])
    keep = topk_mask(flat, k)
    out, start = [], 0
    for s in scores:
        out.append(keep[start:start + s.numel()].view(s.shape).to(s.device))
        start += s.numel()
    return out


def snapshot_state(model: nn.Module) -> dict[str, Tensor]:
    """A copy of every parameter and buffer of ``model`` except the masks (what rewinding restores)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith(MASK_SUFFIX)}


@torch.no_grad()
def restore_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy ``state`` back into ``model`` in place (optimizers keep their references), then re-apply
    the masks. Raises, before copying anything, if ``state`` names what the model has not."""
    own = model.state_dict(keep_vars=True)
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise ValueError(f"the saved state does not fit the model: it holds {unknown}, which the model has not")
    for k, v in state.items():
        own[k].copy_(v)
    for sp in sparse_params(model):
        zero_outside_(sp.param, sp.mask)
