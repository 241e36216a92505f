"""The contract every sparsity method keeps, and the registry of methods by name.

An algorithm decides; the engine (:class:`fastsparse.Sparsifier`) applies. An algorithm
says which parameters it acts on, their initial masks, when masks change and what the new
masks are; every decision is a pure function of what it is given (weights, gradients,
optimizer state, the clock), testable on a handful of numbers. It never touches weights,
optimizer state or hooks itself.

The life cycle the engine drives::

    select(model)                              which parameters (pure)
    initial_sparsities(params)                 per-layer targets at attach
    initial_masks(params, sparsities, setup)   first masks; ``setup`` brings the model, the
                                               optimizer, a data batch and the seed explicitly
    every optimizer step:
      is_update(clock) -> update_masks(params, optimizer, clock, seed)   new masks (pure)
      commit(params, clock)                    the engine installed them: advance own state
    state_dict() / load_state_dict()

What a method does *around* its decisions (set the learning rate, save tickets, rewind
weights, superpose, run a search phase) is its recipe: ``recipe`` names a
:class:`fastsparse.engine.recipe.Recipe` class (or its import path), which every entry
point runs through the engine, or refuses.
"""
from __future__ import annotations

import difflib
import zlib
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Sequence

import torch
from torch import Tensor, nn

from ..core.distributions import check_sparsity, resolve_sparsities
from ..core.masks import SparseParam, n_keep, select_params, topk_mask
from ..core.schedules import Clock, UpdateSchedule

__all__ = [
    "SparsityAlgorithm", "Setup", "MaskUpdate", "register", "create", "list_algorithms", "get_algorithm",
    "generator_for", "INIT_METHODS",
]

INIT_METHODS = ("random", "topk", "from_zeros")


def generator_for(seed: int, step: int, name: str) -> torch.Generator:
    """A CPU generator seeded from (seed, step, crc32(name)): the same on every rank and rerun."""
    key = zlib.crc32(f"{int(seed)}:{int(step)}:{name}".encode())
    return torch.Generator().manual_seed(key)


@dataclass(frozen=True)
class Setup:
    """What the initial-mask step may use, handed over explicitly by the engine: the ``model``
    (methods that score through it: SNIP, GraSP, SynFlow), the ``optimizer``, one data ``batch``
    ``(inputs, targets)`` (or None when the entry point has no data) and the ``seed``."""

    seed: int = 0
    model: nn.Module | None = None
    optimizer: Any = None
    batch: Any = None


@dataclass(frozen=True)
class MaskUpdate:
    """New masks, with the positions whose weights and optimizer state start again at 0 when
    that is more than ``new & ~old`` (a weight pruned and regrown in the same update: GraNet)."""

    masks: list[Tensor]
    grown: list[Tensor] | None = None


class SparsityAlgorithm:
    """Base class: a static mask, chosen once at attach and never changed.

    Arguments shared by every method:
      sparsity: the model's target sparsity in [0, 1).
      distribution: layer densities: ``"uniform"``, ``"erk"``, ``"er"``, ``"first_layer_dense"``
        or a function ``f(params, model_sparsity) -> list of sparsities``.
      init_method: ``"random"`` (default), ``"topk"`` (largest magnitude) or ``"from_zeros"``
        (the weights' existing zeros are the mask).
      include / exclude: glob patterns on parameter names; ``param_filter`` a predicate
        ``(name, param, module) -> bool``. Without them, the default filter (or, if the model
        already carries masks, exactly the masked parameters).
    """

    name: ClassVar[str] = "static"
    keeps_count: ClassVar[bool] = True  # the number of active weights per layer never changes
    # what the method does around its decisions: a Recipe class or "module:Class" (None: nothing)
    recipe: ClassVar[Any] = None
    # what the initial masks need beyond the weights: "batch" (a data batch), "gradients"
    # (``.grad`` of the selected weights on a batch, computed by the engine when absent),
    # "shape" (a batch if the engine has data, for an input shape)
    needs: ClassVar[frozenset] = frozenset()
    # set to the reason a comparison of methods at fixed sparsities leaves this one out
    comparison_note: ClassVar[str | None] = None

    def __init__(
        self,
        sparsity: float = 0.9,
        distribution: str | Callable = "uniform",
        init_method: str = "random",
        include: str | Iterable[str] | None = None,
        exclude: str | Iterable[str] | None = None,
        param_filter: Callable[[str, Tensor, nn.Module], bool] | None = None,
        update: UpdateSchedule | None = None,
    ):
        self.sparsity = check_sparsity(sparsity)
        if not (isinstance(distribution, str) or callable(distribution)):
            raise TypeError(f"distribution must be a name or a function, got {distribution!r}")
        if init_method not in INIT_METHODS:
            raise ValueError(f"unknown init_method {init_method!r}; valid: {list(INIT_METHODS)}")
        self.distribution = distribution
        self.init_method = init_method
        self.include, self.exclude, self.param_filter = include, exclude, param_filter
        self.update = update

    # --- which parameters, and their first masks -------------------------------------------
    @property
    def selects_explicitly(self) -> bool:
        return bool(self.include or self.exclude or self.param_filter)

    def select(self, model: nn.Module) -> list[SparseParam]:
        return select_params(model, self.include, self.exclude, self.param_filter)

    def initial_sparsities(self, params: Sequence[SparseParam]) -> list[float]:
        return resolve_sparsities(self.distribution, [tuple(p.param.shape) for p in params], self.sparsity)

    @torch.no_grad()
    def initial_masks(self, params: Sequence[SparseParam], sparsities: Sequence[float], setup: Setup) -> list[Tensor]:
        seed = setup.seed
        masks = []
        for sp, s in zip(params, sparsities):
            w = sp.param.detach()
            if self.init_method == "from_zeros":
                masks.append(w != 0)
                continue
            if self.init_method == "topk":
                score = w.abs()
            else:
                score = torch.rand(w.shape, generator=generator_for(seed, 0, sp.name)).to(w.device)
            masks.append(topk_mask(score, n_keep(w.numel(), s)))
        return masks

    # --- how masks change ---------------------------------------------------------------------
    def is_update(self, clock: Clock) -> bool:
        return self.update is not None and self.update.is_update(clock)

    def update_masks(self, params: Sequence[SparseParam], optimizer, clock: Clock, seed: int
                     ) -> list[Tensor] | MaskUpdate | None:
        """New masks for ``params`` (same order), or None to leave them. Must not modify anything:
        the algorithm's own state advances in :meth:`commit`."""
        return None

    def commit(self, params: Sequence[SparseParam], clock: Clock) -> None:
        """Called by the engine after it installed the masks :meth:`update_masks` returned at
        ``clock`` (weights already masked): the one place where the algorithm's state advances."""

    def target_sparsities(self, params: Sequence[SparseParam], clock: Clock) -> list[float] | None:
        """What the method aims at now, for reports; None means 'what the masks hold'."""
        return None

    def compact_reason(self) -> str | None:
        """Why this method cannot decide on sparse-executed layers (None: it can), e.g. it reads a
        state of inactive weights that sparse execution does not keep."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sparsity={self.sparsity}, distribution={getattr(self.distribution, '__name__', self.distribution)!r})"


_REGISTRY: dict[str, type[SparsityAlgorithm]] = {}


def register(cls: type[SparsityAlgorithm] | None = None, *, name: str | None = None):
    """Register an algorithm class under ``name`` (default: its ``name`` attribute). Usable as a decorator."""

    def add(c: type[SparsityAlgorithm]) -> type[SparsityAlgorithm]:
        if not (isinstance(c, type) and issubclass(c, SparsityAlgorithm)):
            raise TypeError(f"only SparsityAlgorithm subclasses can be registered, got {c!r}")
        _REGISTRY[(name or c.name).lower()] = c
        return c

    return add(cls) if cls is not None else add


def list_algorithms() -> list[str]:
    return sorted(_REGISTRY)


def get_algorithm(name: str) -> type[SparsityAlgorithm]:
    key = str(name).lower()
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key, _REGISTRY, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown algorithm {name!r}{hint}; valid names: {list_algorithms()}")
    return _REGISTRY[key]


def create(name: str, **kwargs) -> SparsityAlgorithm:
    """Build a registered algorithm by name: ``create("rigl", sparsity=0.9)``."""
    return get_algorithm(name)(**kwargs)


register(SparsityAlgorithm)
