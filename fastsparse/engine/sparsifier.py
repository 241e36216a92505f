"""The engine: binds a model, an optimizer and algorithm groups; enforces masks; runs updates.

One training step, as the engine sees it::

    loss.backward(); optimizer.step()
      -> post-step hook: weights *= mask            (exact zeros again)
      -> if an algorithm's schedule says so: new masks from scores (weights, gradients,
         optimizer state); grown weights and their optimizer state set to 0; masks checked
         identical on every rank.

A step that a GradScaler skips never calls ``optimizer.step()``, so it neither advances
the clock nor updates masks.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn

from .distributed import check_agreement
from ..algorithms.base import SparsityAlgorithm, create
from .handle import _ENGINE_OPTIMIZERS, mark_fresh
from ..core.masks import MaskSet, SparseParam, attach_mask, sparse_params
from ..core.schedules import Clock

__all__ = ["Sparsifier"]

log = logging.getLogger("fastsparse")


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def _pack_bits(mask: Tensor) -> bytes:
    """A bool tensor as bytes, 8 positions a byte, first position in the high bit
    (comparable with ==, 8x smaller than bools; torch only)."""
    flat = mask.detach().cpu().reshape(-1).to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % 8)])
    return bytes((flat.view(-1, 8) * _BIT_WEIGHTS).sum(1, dtype=torch.uint8).tolist())


def _unpack_bits(packed: bytes, like: Tensor) -> Tensor:
    if not packed:
        return torch.zeros_like(like, dtype=torch.bool)
    raw = torch.frombuffer(bytearray(packed), dtype=torch.uint8)
    bits = (raw.unsqueeze(1) & _BIT_WEIGHTS).ne(0).reshape(-1)[: like.numel()]
    return bits.view(like.shape).to(like.device)


class _Group:
    def __init__(self, algorithm: SparsityAlgorithm, params: list[SparseParam], targets: list[float]):
        self.algorithm, self.params, self.targets = algorithm, params, targets


class Sparsifier:
    """Sparse training engine.

    Args:
      model: the network (a DDP wrapper is looked through).
      optimizer: a ``torch.optim.Optimizer`` (a post-step hook then drives everything), or
        any object with a ``state`` dict (fastai); None if you call :meth:`step` yourself.
      algorithm: an algorithm, a registered name, or a list of algorithms acting on
        disjoint parameter sets.
      total_steps: training length, needed when schedule points are fractions of training.
      seed: seeds every random choice together with the step and the parameter name.
      zero_grown_state: zero the optimizer state of grown weights (default; RigL).
      check_ranks: under ``torch.distributed``, compare mask checksums across ranks after
        every update and raise if they differ.
      hook: register the optimizer post-step hook (default when the optimizer is a torch one).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Any = None,
        algorithm: SparsityAlgorithm | str | Sequence[SparsityAlgorithm | str] = "static",
        *,
        total_steps: int | None = None,
        seed: int = 0,
        zero_grown_state: bool = True,
        check_ranks: bool = True,
        hook: bool | None = None,
    ):
        self.model = _unwrap(model)
        self.optimizer = optimizer
        self.total_steps = total_steps
        self.seed = int(seed)
        self.zero_grown_state = zero_grown_state
        self.check_ranks = check_ranks
        self.step_count = 0
        self.history: list[dict[str, Any]] = []
        self._external_clock: Clock | None = None
        self._hook_handle = None

        algorithms = algorithm if isinstance(algorithm, (list, tuple)) else [algorithm]
        algorithms = [create(a) if isinstance(a, str) else a for a in algorithms]
        for a in algorithms:
            if not isinstance(a, SparsityAlgorithm):
                raise TypeError(f"algorithm must be a SparsityAlgorithm or a registered name, got {a!r}")
        if hook is None:
            hook = isinstance(optimizer, torch.optim.Optimizer)
        if hook and not isinstance(optimizer, torch.optim.Optimizer):  # checked before any mask is attached
            raise TypeError("hook=True needs a torch.optim.Optimizer; call sparsifier.step() yourself otherwise")
        self.groups = self._build_groups(algorithms)
        self._refresh()
        self.apply_masks()
        # ITOP: per sparse parameter, every position that has been active at some point
        self._union: dict[str, Tensor] = {sp.name: sp.mask.clone() for sp in self._sps}
        self._check_ranks()
        if hook:
            self._hook_handle = optimizer.register_step_post_hook(lambda opt, args, kwargs: self.step())
            _ENGINE_OPTIMIZERS.add(optimizer)

    # --- set-up ----------------------------------------------------------------------------
    def _build_groups(self, algorithms: list[SparsityAlgorithm]) -> list[_Group]:
        existing = {sp.name: sp for sp in sparse_params(self.model)}
        claimed: dict[str, str] = {}
        plans = []
        explicit = [a for a in algorithms if a.selects_explicitly]
        for alg in algorithms:
            if alg.selects_explicitly or not existing:
                params = alg.select(self.model)
            else:
                params = list(existing.values())
            if not alg.selects_explicitly and len(explicit) and len(algorithms) > 1:
                others = {sp.name for a in explicit for sp in a.select(self.model)}
                params = [sp for sp in params if sp.name not in others]
            for sp in params:
                if sp.name in claimed:
                    raise ValueError(f"parameter {sp.name} is selected by two algorithms "
                                     f"({claimed[sp.name]} and {alg.name}); their filters must not overlap")
                claimed[sp.name] = alg.name
            sparsities = alg.initial_sparsities(params)
            todo = [(sp, s) for sp, s in zip(params, sparsities) if sp.name not in existing]
            masks = alg.initial_masks([sp for sp, _ in todo], [s for _, s in todo], self.seed) if todo else []
            plans.append((alg, params, sparsities, todo, masks))
        # every check passed: now change state
        groups = []
        for alg, params, sparsities, todo, masks in plans:
            for (sp, _), m in zip(todo, masks):
                attach_mask(sp, m)
            targets = [s if sp.name not in existing else 1 - float(sp.mask.sum()) / sp.mask.numel()
                       for sp, s in zip(params, sparsities)]
            groups.append(_Group(alg, params, targets))
            log.info("%s: %d parameters, model sparsity %.4f", alg.name, len(params), self._sparsity_of(params))
        return groups

    def _refresh(self) -> None:
        self._sps = [sp for g in self.groups for sp in g.params]
        # Enforce every mask the model carries, also those outside the groups (e.g. the
        # wrapper's sparse_modules): a SparseHandle leaves enforcement to the engine.
        ours = {sp.name for sp in self._sps}
        self._enforcer = MaskSet(
            lambda: self._sps + [sp for sp in sparse_params(self.model) if sp.name not in ours])

    # --- the hot path ----------------------------------------------------------------------
    def apply_masks(self) -> None:
        """weights *= mask for every sparse parameter (one fused in-place multiply)."""
        self._enforcer.apply()
        mark_fresh(self.model)

    def clock(self) -> Clock:
        return self._external_clock or Clock(self.step_count, self.total_steps)

    def set_clock(self, step: int, progress: float | None = None) -> None:
        """Drive the schedules from outside (the wrapper's ``step(step, pct_train)``)."""
        self._external_clock = Clock(int(step), self.total_steps, progress)

    @torch.no_grad()
    def step(self) -> bool:
        """After an optimizer step: re-apply masks, advance the clock, update masks when due.

        Returns True if masks changed. Called by the optimizer hook; call it yourself only
        when the engine has no hook (``hook=False`` or a non-torch optimizer).
        """
        self.apply_masks()
        self.step_count += 1
        clock = self.clock()
        plans = []
        for g in self.groups:
            if g.algorithm.is_update(clock):
                new = g.algorithm.update_masks(g.params, self.optimizer, clock, self.seed)
                if new is not None:
                    self._check_new_masks(g, new)
                    plans.append((g, new))
        if not plans:
            return False
        record = {"step": clock.step, "changed": 0, "active": 0}
        for g, new in plans:
            for sp, m in zip(g.params, new):
                record["changed"] += self._set_mask(sp, m)
                record["active"] += int(m.count_nonzero())
        record["changed_fraction"] = record["changed"] / max(1, record["active"])
        record["exploration_rate"] = self.exploration_rate()
        self.history.append(record)
        self._check_ranks(clock.step)
        return True

    def _check_new_masks(self, g: _Group, new: Sequence[Tensor]) -> None:
        if len(new) != len(g.params):
            raise ValueError(f"{g.algorithm.name} returned {len(new)} masks for {len(g.params)} parameters")
        for sp, m in zip(g.params, new):
            if tuple(m.shape) != tuple(sp.param.shape) or m.dtype != torch.bool:
                raise ValueError(f"{g.algorithm.name} returned a mask of shape {tuple(m.shape)} and dtype "
                                 f"{m.dtype} for {sp.name}; expected bool {tuple(sp.param.shape)}")

    def _set_mask(self, sp: SparseParam, new: Tensor) -> int:
        """Install ``new``; zero dropped weights, and grown weights with their optimizer state."""
        old = sp.mask
        grown = new & ~old
        n_changed = int(grown.count_nonzero())  # not sum(): a bool sum widens to int64, ~50x slower
        old.copy_(new)
        union = self._union.get(sp.name)
        if union is not None:
            union |= old
        p = sp.param
        p.mul_(old)
        if self.zero_grown_state and n_changed:
            state = getattr(self.optimizer, "state", None)
            st = state.get(p) if state is not None and hasattr(state, "get") else None
            for value in (st or {}).values():
                if isinstance(value, Tensor) and value.shape == p.shape:
                    value.masked_fill_(grown, 0)
        return n_changed

    def _check_ranks(self, step: int = 0) -> None:
        if self.check_ranks:
            check_agreement([sp.name for sp in self._sps], [sp.mask for sp in self._sps], step)

    # --- reporting -------------------------------------------------------------------------
    @staticmethod
    def _sparsity_of(params: Iterable[SparseParam]) -> float:
        params = list(params)
        total = sum(sp.mask.numel() for sp in params)
        return 1.0 - sum(int(sp.mask.count_nonzero()) for sp in params) / max(1, total)

    def sparsity(self) -> float:
        """Actual sparsity over every parameter the engine masks."""
        return self._sparsity_of(self._sps)

    def exploration_rate(self) -> float:
        """ITOP's in-time over-parameterisation rate R_s = |union of all masks so far| / Σ N_l
        (Liu et al. 2021): the fraction of the sparse weights that have been active at some point."""
        total = sum(u.numel() for u in self._union.values())
        return sum(int(u.count_nonzero()) for u in self._union.values()) / total if total else 1.0

    def report(self) -> list[dict[str, Any]]:
        """Per parameter: name, shape, algorithm, target and actual sparsity, active count."""
        rows = []
        clock = self.clock()
        for g in self.groups:
            targets = g.algorithm.target_sparsities(g.params, clock) or g.targets
            for sp, t in zip(g.params, targets):
                active = int(sp.mask.sum())
                rows.append({"name": sp.name, "shape": tuple(sp.param.shape), "algorithm": g.algorithm.name,
                             "target_sparsity": float(t), "sparsity": 1 - active / sp.mask.numel(),
                             "active": active, "numel": sp.mask.numel(),
                             "explored": int(self._union[sp.name].sum()) if sp.name in self._union else active})
        return rows

    # --- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "step_count": self.step_count, "seed": self.seed, "total_steps": self.total_steps,
            "history": list(self.history),
            "masks": {sp.name: tuple(sp.mask.shape) for sp in self._sps},
            "algorithms": [g.algorithm.state_dict() for g in self.groups],
            "explored": {name: _pack_bits(u) for name, u in self._union.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the clock and algorithm state; the masks themselves come with the model's state_dict."""
        shapes = state.get("masks", {})
        ours = {sp.name: tuple(sp.mask.shape) for sp in self._sps}
        if shapes and {k: tuple(v) for k, v in shapes.items()} != ours:
            wrong = sorted(set(shapes) ^ set(ours)) or [k for k in ours if tuple(shapes[k]) != ours[k]]
            raise ValueError(f"this sparsifier state does not fit the model: masks differ at {wrong}")
        if len(state.get("algorithms", [])) != len(self.groups):
            raise ValueError(f"the state holds {len(state.get('algorithms', []))} algorithm groups, "
                             f"this sparsifier has {len(self.groups)}")
        self.step_count = int(state["step_count"])
        self.seed = int(state["seed"])
        self.total_steps = state.get("total_steps", self.total_steps)
        self.history = list(state.get("history", []))
        for g, s in zip(self.groups, state["algorithms"]):
            g.algorithm.load_state_dict(s)
        for name, packed in state.get("explored", {}).items():   # states saved before ITOP tracking have none
            if name in self._union:
                self._union[name].copy_(_unpack_bits(packed, self._union[name]))

    def remove(self) -> None:
        """Stop enforcing and updating; the masks stay on the model (and in its state_dict)."""
        if self._hook_handle is not None:
            self._hook_handle.remove()
            self._hook_handle = None
            _ENGINE_OPTIMIZERS.discard(self.optimizer)

    def __repr__(self) -> str:
        algs = ", ".join(g.algorithm.name for g in self.groups)
        return f"Sparsifier({algs}; {len(self._sps)} sparse parameters, sparsity {self.sparsity():.4f})"
