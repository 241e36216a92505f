"""The seed's entry point: ``sparsify_model`` attaches masks and keeps them enforced."""
from __future__ import annotations

import weakref
import math
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..algorithms.base import Setup, SparsityAlgorithm
from ..core.distributions import check_sparsity, uniform_sparsity
from ..core.masks import MaskSet, attach_mask, check_not_empty, n_keep, sparse_params, topk_mask

__all__ = ["sparsify_model", "SparseHandle", "sparse_mask", "sparse_mask_like", "top_k_mask",
           "is_sparseable_module", "sparseable_modules", "mark_fresh", "engine_hooks"]

# Optimizers whose masks a Sparsifier already re-applies after each step (its own hook).
_ENGINE_OPTIMIZERS: "weakref.WeakSet" = weakref.WeakSet()


def engine_hooks(optimizer, on: bool) -> None:
    """Tell the handles that an engine's step hook on ``optimizer`` re-applies the masks (or no longer)."""
    if on:
        _ENGINE_OPTIMIZERS.add(optimizer)
    else:
        _ENGINE_OPTIMIZERS.discard(optimizer)
_HANDLES: "weakref.WeakKeyDictionary[nn.Module, SparseHandle]" = weakref.WeakKeyDictionary()


def _pick(name: str, values: dict):
    given = {k: v for k, v in values.items() if v is not None}
    if len({id(v) for v in given.values()}) > 1:
        raise TypeError(f"{name} given twice under different spellings: {sorted(given)}; pass one of them")
    return next(iter(given.values()), None)


class SparseHandle:
    """Keeps a model's masks enforced; ``remove()`` stops that (the masks stay in the state_dict).

    Enforcement: after every ``step()`` of any torch optimizer that holds the model's
    parameters, and before a forward pass whose weights were not masked since the last
    step (this covers optimizers that are not torch ones, such as fastai's).
    """

    def __init__(self, model: nn.Module, enforce: bool = True):
        self.model = model
        self._fresh = False
        self._hooks = []
        self._pairs = MaskSet(lambda: sparse_params(model))
        if enforce:
            self._hooks.append(model.register_forward_pre_hook(self._before_forward))
            self._hooks.append(register_optimizer_step_post_hook(self._after_step))
            _HANDLES[model] = self

    def apply(self) -> None:
        self._pairs.apply()
        self._fresh = True

    def _owns(self, optimizer) -> bool:
        if self._pairs.stale():
            self._pairs.refresh()
        ids = {id(p) for p in self._pairs.params}
        return any(id(p) in ids for g in optimizer.param_groups for p in g["params"])

    def _after_step(self, optimizer, args, kwargs) -> None:
        if optimizer in _ENGINE_OPTIMIZERS:
            self._fresh = True
        elif self._owns(optimizer):
            self.apply()

    def _before_forward(self, module, args) -> None:
        if self._fresh:
            self._fresh = False
        else:
            self.apply()
            self._fresh = False

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if _HANDLES.get(self.model) is self:
            del _HANDLES[self.model]

    def __len__(self) -> int:  # seed code treated the result as a list of hooks
        return len(self._hooks)

    def __iter__(self):
        return iter(self._hooks)


def mark_fresh(model: nn.Module) -> None:
    """Tell a model's handle that its masks were just applied (the engine's hot path calls this)."""
    handle = _HANDLES.get(model)
    if handle is not None:
        handle._fresh = True


@torch.no_grad()
def sparsify_model(
    model: nn.Module,
    model_sparsity: float,
    sparse_f: Callable | str | None = None,
    enforce_masks: bool | None = None,
    init_method: str = "random",
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    seed: int = 0,
    *,
    sparse_init_f: Callable | str | None = None,
    sparsify_method: Callable | str | None = None,
    enforce_mask: bool | None = None,
) -> SparseHandle:
    """Attach masks at ``model_sparsity`` with the layer distribution ``sparse_f`` and enforce them.

    ``sparse_f`` (also spelled ``sparse_init_f`` or ``sparsify_method``) is a name or a
    function ``f(params, model_sparsity) -> list of sparsities``; uniform by default.
    ``init_method`` is ``random``, ``topk`` or ``from_zeros``. Returns a handle whose
    ``remove()`` stops enforcement; the masks stay as buffers (``<param>_mask``). A fastai
    ``Learner`` (anything with a ``.model`` module) stands for its model, as in the seed.
    """
    if not isinstance(model, nn.Module) and isinstance(getattr(model, "model", None), nn.Module):
        model = model.model
    dist_f = _pick("the distribution", {"sparse_f": sparse_f, "sparse_init_f": sparse_init_f,
                                         "sparsify_method": sparsify_method}) or uniform_sparsity
    enforce = _pick("enforce_masks", {"enforce_masks": enforce_masks, "enforce_mask": enforce_mask})
    enforce = True if enforce is None else bool(enforce)
    static = SparsityAlgorithm(model_sparsity, dist_f, init_method, include, exclude)
    params = static.select(model)
    sparsities = static.initial_sparsities(params)
    check_not_empty([sp.name for sp in params], [sp.param.numel() for sp in params], sparsities, "sparsify_model")
    masks = static.initial_masks(params, sparsities, Setup(seed, model))
    for sp, m in zip(params, masks):
        attach_mask(sp, m)
    old = _HANDLES.get(model)
    if old is not None:
        old.remove()
    return SparseHandle(model, enforce)


# --- the seed's helpers (fastsparse 0.0.5), on the exact-count machinery -------------------------
_SPARSEABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
               nn.ConvTranspose3d, nn.MultiheadAttention, nn.RNNBase, nn.RNNCellBase)


def sparse_mask(sizes: Sequence[int], sparsity: float, generator: torch.Generator | None = None) -> Tensor:
    """A random bool mask of shape ``sizes`` with exactly round((1 − sparsity) · n) ones."""
    total = math.prod(sizes)
    keep = n_keep(total, check_sparsity(sparsity))
    mask = torch.zeros(total, dtype=torch.bool)
    mask[torch.randperm(total, generator=generator)[:keep]] = True
    return mask.view(*sizes)


def sparse_mask_like(param: Tensor, sparsity: float, generator: torch.Generator | None = None) -> Tensor:
    """:func:`sparse_mask` of ``param``'s shape, on its device."""
    return sparse_mask(tuple(param.shape), sparsity, generator).to(param.device)


def top_k_mask(t: Tensor, n_keep: int) -> Tensor:
    """The seed's name for :func:`fastsparse.topk_mask`: ``n_keep`` ones at the largest values of ``t``."""
    return topk_mask(t, n_keep)


def is_sparseable_module(m: nn.Module, additional_types: Sequence[type] = ()) -> bool:
    """Linear, convolution, attention and recurrent layers (and ``additional_types``), as in the seed."""
    return isinstance(m, _SPARSEABLE + tuple(additional_types))


def sparseable_modules(model: nn.Module, additional_types: Sequence[type] = ()) -> list[nn.Module]:
    """Every module of ``model`` that :func:`is_sparseable_module` accepts, in order."""
    return [m for m in model.modules() if is_sparseable_module(m, additional_types)]
