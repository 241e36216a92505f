"""The engine: binds a model, an optimizer and algorithm groups; enforces masks; runs updates
and the methods' recipes.

One training step, as the engine sees it::

    before_step(): the recipes' learning rate for the coming step (optimizer pre-step hook)
    loss.backward(); optimizer.step()
      -> post-step hook: weights *= mask            (exact zeros again)
      -> recipes' on_step (a ticket, a snapshot)
      -> if an algorithm's schedule says so: new masks from scores (weights, gradients,
         optimizer state); grown weights and their optimizer state set to 0; the algorithm
         commits; its recipe's after_update (rewind, reset); masks checked identical on every rank
      -> at the last step of training: the recipes' finish (superposition, ...)

A step that a GradScaler skips never calls ``optimizer.step()``, so it neither advances
the clock nor updates masks.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from ..algorithms.base import MaskUpdate, SparsityAlgorithm, create
from ..core.masks import MaskSet, SparseParam, n_keep, sparse_params, zero_outside_
from ..core.schedules import Clock
from ..core.sharded import count_like, local, total_like
from ._state import engine_state, load_engine_state
from .checks import HOOKED as _HOOKED, check_steps as _check_steps
from .data import DataSource
from .compact import arm, decide, install, lend, union
from .distributed import check_agreement
from .fsdp import check_sharded_agreement, sharded_update
from .execution import (OPTIMIZER_LATER, Choice, active_count, check_execution, check_plan, choose, cpu_kernels, numel_of,
                        to_compact)
from .groups import Group, build_groups, held_params, sparsity_of
from .handle import engine_hooks, mark_fresh
from .recipe import EntryPointRefused
from .reporting import final_targets, report_rows

__all__ = ["Sparsifier"]

log = logging.getLogger("fastsparse")


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class Sparsifier:
    """Sparse training engine.

    Args:
      model: the network (a DDP wrapper is looked through; a ``fully_shard``-ed one works on its
        shards, see :mod:`fastsparse.engine.fsdp`).
      optimizer: a ``torch.optim.Optimizer`` (hooks then drive everything), or any object with
        a ``state`` dict (fastai); None if you call :meth:`step` yourself.
      algorithm: an algorithm, a registered name, or a list of algorithms acting on
        disjoint parameter sets; None (the default): train the masks the model carries as they are.
        An algorithm given for a model that already carries masks must ask for the counts the
        masks hold (a fixed-count method), else it is refused: nothing is silently kept.
      total_steps: training length, needed when schedule points are fractions of training and
        by methods that plan over the whole run (IMP, Sup-tickets).
      seed: seeds every random choice together with the step and the parameter name.
      data: what the methods may need from the data: a batch ``(inputs, targets)``, an iterable
        of batches (a DataLoader) or a function returning one. Its first batch scores weights at
        attach (SNIP, GraSP, methods that regrow by gradient); Sup-tickets re-estimates
        BatchNorm statistics over it.
      steps_per_epoch: optimizer steps per epoch, for methods that count in epochs (Sup-tickets).
      loss_fn: the loss of a batch, ``loss_fn(outputs, targets)``, for gradients taken at attach
        (default cross-entropy).
      zero_grown_state: zero the optimizer state of grown weights (default; RigL).
      check_ranks: under ``torch.distributed``, compare masks across ranks after every update.
      hook: register the optimizer hooks (default when the optimizer is a torch one); without
        them call :meth:`before_step` before and :meth:`step` after every optimizer step.
      auto_finish: run the recipes' end of training (Sup-tickets' superposition) at the last step;
        a driver that evaluates first passes False and calls :meth:`finish` itself.
      attach_only: only attach the masks (e.g. so that a checkpoint's mask buffers load before
        training starts); such an engine has no recipes and cannot step.
      external_clock: the driver sets the clock (steps and the fraction of training done) with
        :meth:`set_clock` before every step (the seed wrapper), so fractions need no total_steps.
      execution: ``"masked"`` (dense weights and masks), ``"sparse"`` (every Linear weight that can:
        only its active values are stored, trained and updated) or ``"auto"`` (per layer, where a
        calibration measures it faster), or a dict {parameter name: "sparse" | "masked"}; see
        :mod:`fastsparse.engine.execution`. The optimizer's dense weights are swapped for the
        compact values in place. ``execution_batch``: the batch size the calibration times.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Any = None,
        algorithm: SparsityAlgorithm | str | Sequence[SparsityAlgorithm | str] | None = None,
        *,
        total_steps: int | None = None,
        seed: int = 0,
        data: Any = None,
        steps_per_epoch: int | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        zero_grown_state: bool = True,
        check_ranks: bool = True,
        hook: bool | None = None,
        auto_finish: bool = True,
        attach_only: bool = False,
        external_clock: bool = False,
        execution: str | dict[str, str] = "masked",
        execution_batch: int | None = None,
    ):
        self.model = _unwrap(model)
        self.optimizer = optimizer
        self.total_steps = _check_steps(total_steps, "total_steps")
        steps_per_epoch = _check_steps(steps_per_epoch, "steps_per_epoch")
        self.seed = int(seed)
        self.data = DataSource(data)
        self.steps_per_epoch = steps_per_epoch
        self.loss_fn = loss_fn or nn.functional.cross_entropy
        self.zero_grown_state = zero_grown_state
        self.check_ranks = check_ranks
        self.auto_finish = auto_finish
        self.attach_only = attach_only
        self.external_clock = external_clock
        self.execution = check_execution(execution)
        self.choices: list[Choice] = []
        self.step_count = 0
        self.history: list[dict[str, Any]] = []
        self.lr_used: float | None = None
        self._external_clock: Clock | None = None
        self._hook_handles: list[Any] = []
        self._prepared_for: int | None = None
        self._finished = False

        self._adopting = algorithm is None
        if self._adopting:
            if not held_params(self.model):
                raise ValueError("the model carries no masks: give an algorithm (a registered name such as "
                                 "'static' or 'rigl', or an instance) to choose them")
            algorithm = SparsityAlgorithm()
        algorithms = algorithm if isinstance(algorithm, (list, tuple)) else [algorithm]
        algorithms = [create(a) if isinstance(a, str) else a for a in algorithms]
        for a in algorithms:
            if not isinstance(a, SparsityAlgorithm):
                raise TypeError(f"algorithm must be a SparsityAlgorithm or a registered name, got {a!r}")
        if hook is None:
            hook = isinstance(optimizer, torch.optim.Optimizer) and not attach_only
        if hook and not isinstance(optimizer, torch.optim.Optimizer):  # checked before any mask is attached
            raise TypeError("hook=True needs a torch.optim.Optimizer; call sparsifier.step() yourself otherwise")
        if hook and _HOOKED.get(optimizer) is not None:
            raise ValueError(f"this optimizer already drives {_HOOKED[optimizer]!r}: call its remove() first (two "
                             "engines on one optimizer would both update at every step)")
        self.hooked = bool(hook)
        self.groups = self._build_groups(algorithms)
        self._refresh()
        self.apply_masks()
        for g in self.groups:   # the initial masks are installed: algorithms commit at step 0
            g.algorithm.commit(g.params, self.clock())
        if not attach_only:
            self._execute(execution_batch)
        # ITOP: per sparse parameter, every position that has been active at some point
        self._union: dict[str, Tensor] = {sp.name: sp.flat() if getattr(sp, "compact", False) else
                                          local(sp.mask).clone() for sp in self._sps}
        # sharded masks: the count each layer must hold, what the rank check compares
        self._expected = {sp.name: n_keep(numel_of(sp), t) for g in self.groups
                          for sp, t in zip(g.params, g.targets)} if self.sharded else {}
        if self.choices:
            self._arm(None if self.external_clock else self.clock().at(1))
        self._check_ranks()
        for g in self.groups:
            if g.recipe is not None:
                g.recipe.attached()
        if hook:
            self._hook_handles = [optimizer.register_step_post_hook(lambda opt, args, kwargs: self.step())]
            if self._recipes:   # only recipes act before a step (their learning rate): the hot path stays one hook
                self._hook_handles.append(
                    optimizer.register_step_pre_hook(lambda opt, args, kwargs: self.before_step()))
            engine_hooks(optimizer, True)
            _HOOKED[optimizer] = self

    # --- set-up (see .groups) ---------------------------------------------------------------
    def _build_groups(self, algorithms: list[SparsityAlgorithm]) -> list[Group]:
        return build_groups(self, algorithms)

    def _execute(self, batch_size: int | None) -> None:
        """Sparse execution: the chosen Linear weights become compact (see :mod:`.execution`)."""
        if self.execution == "masked" and not any(getattr(sp, "compact", False) for g in self.groups for sp in g.params):
            return
        if batch_size is None:
            batch = self.data.batch() if self.data.given else None
            batch_size = len(batch[0]) if batch is not None else 64
        optimizer = OPTIMIZER_LATER if self.attach_only else self.optimizer
        self.choices = choose(self.groups, self.execution, optimizer, int(batch_size))
        chosen = {c.name for c in self.choices if c.execution == "sparse"}
        for g in self.groups:
            g.params = [to_compact(self.model, sp, self.optimizer) if sp.name in chosen and
                        not getattr(sp, "compact", False) else sp for sp in g.params]
        self._refresh()
        for c in self.choices:
            if c.reason.startswith("cannot run sparse") and self.execution != "masked":
                log.warning("%s stays masked: %s", c.name, c.reason)
        kernels = cpu_kernels(self.choices, self.model)
        if kernels is not None and not kernels.startswith("native"):
            log.warning("the sparse layers run on %s; the compiled kernels are 2-3x faster", kernels)

    def compact(self, execution: str | dict[str, str], batch_size: int | None = None) -> list[Choice]:
        """Run the chosen Linear weights sparse now, before an optimizer exists (an attach-only
        engine: Lightning's ``setup``); the engine built later adopts the SparseLinear layers."""
        if not self.attach_only:
            raise RuntimeError("compact() is for attach-only engines; pass execution= to the engine instead")
        self.execution = check_execution(execution)
        check_plan(self.groups, self.execution, OPTIMIZER_LATER)
        self._execute(batch_size)
        return self.choices

    def _arm(self, next_clock: Clock | None) -> None:
        """Compact layers of a group that updates at ``next_clock`` keep what the backward needs for its
        dense gradient (None: the driver sets the clock later, so every step is armed)."""
        for g in self.groups:
            due = next_clock is None or g.algorithm.is_update(next_clock)
            arm(g.params, due)

    def _refresh(self) -> None:
        self._sps = [sp for g in self.groups for sp in g.params]
        # Enforce every mask the model carries, also those outside the groups (e.g. the
        # wrapper's sparse_modules): a SparseHandle leaves enforcement to the engine.
        ours = {sp.name for sp in self._sps}
        masked = [sp for sp in self._sps if not getattr(sp, "compact", False)]
        self._enforcer = MaskSet(
            lambda: masked + [sp for sp in sparse_params(self.model) if sp.name not in ours])

    # --- the hot path ----------------------------------------------------------------------
    def apply_masks(self) -> None:
        """weights *= mask for every sparse parameter (one fused in-place multiply)."""
        self._enforcer.apply()
        mark_fresh(self.model)

    def clock(self) -> Clock:
        if self._external_clock is not None:
            return self._external_clock
        return Clock(self.step_count, self.total_steps, epoch_steps=self.steps_per_epoch)

    def set_clock(self, step: int, progress: float | None = None) -> None:
        """Drive the schedules from outside (the wrapper's ``step(step, pct_train)``)."""
        self._external_clock = Clock(int(step), self.total_steps, progress, self.steps_per_epoch)

    def before_step(self) -> None:
        """Before an optimizer step: the recipes' learning rate for it (the pre-step hook calls this)."""
        self._prepared_for = self.step_count
        self.lr_used = None
        for r in self._recipes:
            lr = r.learning_rate(self.step_count)
            if lr is not None:
                self.set_learning_rate(lr)
                self.lr_used = lr if not isinstance(lr, (list, tuple)) else float(lr[0])

    @torch.no_grad()
    def step(self) -> bool:
        """After an optimizer step: re-apply masks, advance the clock, update masks when due.

        Returns True if masks changed. Called by the optimizer hook; call it yourself only
        when the engine has no hook (``hook=False`` or a non-torch optimizer).
        """
        if self.attach_only:
            raise RuntimeError("this engine only attached the masks (attach_only=True): build one to train with")
        if self._owns_lr and self._prepared_for != self.step_count:
            raise EntryPointRefused(
                "this method sets the learning rate of its steps, but sparsifier.before_step() was not called "
                "before this optimizer step: call it before every optimizer.step() (the fastai and Lightning "
                "callbacks do), or build the engine on a torch optimizer with hook=True")
        self.apply_masks()
        self.step_count += 1
        clock = self.clock()
        for r in self._recipes:
            r.on_step(clock)
        plans = []
        for g in self.groups:
            if g.algorithm.is_update(clock):
                if any(getattr(sp, "compact", False) for sp in g.params):
                    new = decide(g.algorithm, g.params, self.optimizer, clock, self.seed)
                    if new is not None:
                        plans.append((g, new))
                    continue
                if self.sharded:
                    new = sharded_update(g.algorithm, g.params, self.optimizer, clock, self.seed)
                    if new is not None:
                        plans.append((g, (new[0], new[2])))
                        if not g.algorithm.keeps_count:   # pruning: the count the rank check expects moves
                            self._expected.update((sp.name, c) for sp, c in zip(g.params, new[1]))
                    continue
                new = g.algorithm.update_masks(g.params, self.optimizer, clock, self.seed)
                if new is not None:
                    plans.append((g, self._checked(g, new)))
        changed = bool(plans)
        if plans:
            record = {"step": clock.step, "changed": 0, "active": 0}
            for g, (masks, grown) in plans:
                for i, (sp, m) in enumerate(zip(g.params, masks)):
                    again = None if grown is None else grown[i]
                    if getattr(sp, "compact", False):
                        restarted = install(sp, m, again, self.optimizer)
                        record["changed"] += restarted.numel()
                        self._union[sp.name] = union(self._union[sp.name], restarted)
                    else:
                        record["changed"] += self._install(sp, m, again)
                    record["active"] += active_count(sp)
                if type(g.algorithm).commit is not SparsityAlgorithm.commit:   # dense views only for one that reads them
                    g.algorithm.commit(lend(g.params), clock)
                if g.recipe is not None:
                    g.recipe.after_update(clock)
            if self.sharded:   # each rank counted the weights its shards grew
                record["changed"] = total_like(record["changed"], self._sps[0].mask)
            record["changed_fraction"] = record["changed"] / max(1, record["active"])
            record["exploration_rate"] = self.exploration_rate()
            self.history.append(record)
            self._check_ranks(clock.step)
        if self.choices:
            self._arm(None if self.external_clock else clock.at(clock.step + 1))
        if self.auto_finish and self.total_steps and clock.step >= self.total_steps and not self._finished:
            self.finish()
        return changed

    def _checked(self, g: Group, new: Any) -> tuple[list[Tensor], list[Tensor] | None]:
        masks, grown = (new.masks, new.grown) if isinstance(new, MaskUpdate) else (new, None)
        if len(masks) != len(g.params) or (grown is not None and len(grown) != len(g.params)):
            raise ValueError(f"{g.algorithm.name} returned {len(masks)} masks for {len(g.params)} parameters")
        for sp, m in zip(g.params, masks):
            if tuple(m.shape) != tuple(sp.param.shape) or m.dtype != torch.bool:
                raise ValueError(f"{g.algorithm.name} returned a mask of shape {tuple(m.shape)} and dtype "
                                 f"{m.dtype} for {sp.name}; expected bool {tuple(sp.param.shape)}")
        return list(masks), None if grown is None else list(grown)

    def _install(self, sp: SparseParam, new: Tensor, grown: Tensor | None = None) -> int:
        """Install ``new``; zero dropped weights and the optimizer state of grown weights
        (``new & ~old``, inactive until now, so already 0; or the positions the algorithm names,
        whose values are zeroed too). Returns the number of grown weights."""
        old = local(sp.mask)   # under FSDP: this rank's shard, like the new mask and the state below
        reset_values = grown is not None
        grown = (new & ~old) if grown is None else (grown.to(old.device) & new)
        n_changed = int(grown.count_nonzero())  # not sum(): a bool sum widens to int64, ~50x slower
        old.copy_(new)
        union = self._union.get(sp.name)
        if union is not None:
            union |= old
        p = local(sp.param)
        zero_outside_(p, old)
        if n_changed:
            if reset_values:
                p.masked_fill_(grown, 0)
            if self.zero_grown_state:
                state = getattr(self.optimizer, "state", None)
                st = state.get(sp.param) if state is not None and hasattr(state, "get") else None
                for value in (st or {}).values():
                    if isinstance(value, Tensor) and local(value).shape == p.shape:
                        local(value).masked_fill_(grown, 0)
        return n_changed

    # --- what recipes (and drivers) may do ---------------------------------------------------
    @torch.no_grad()
    def set_masks(self, params: Sequence[SparseParam], masks: Sequence[Tensor]) -> int:
        """Install ``masks`` on ``params`` outside the schedule (a recipe's prune-back): dropped
        weights become 0, newly active ones keep their values with zeroed optimizer state.
        Returns the number newly active."""
        n = sum(install(sp, m.reshape(-1).nonzero().squeeze(1), None, self.optimizer).numel()
                if getattr(sp, "compact", False) else self._install(sp, m.to(sp.mask.device))
                for sp, m in zip(params, masks))
        self.apply_masks()
        return n

    def _lr_groups(self) -> list[dict]:
        opt = self.optimizer
        groups = getattr(opt, "param_groups", None)
        if groups is None:
            groups = getattr(opt, "hypers", None)   # fastai's optimizer
        if groups is None:
            raise EntryPointRefused(f"this method sets the learning rate, but {type(opt).__name__} has neither "
                                    "param_groups nor hypers")
        return groups

    def learning_rates(self) -> list[float]:
        """The learning rate of every parameter group now."""
        return [float(g["lr"]) for g in self._lr_groups()]

    def set_learning_rate(self, lr: float | Sequence[float]) -> None:
        """Set the learning rate of every parameter group (one value, or one per group)."""
        groups = self._lr_groups()
        values = list(lr) if isinstance(lr, (list, tuple)) else [lr] * len(groups)
        if len(values) != len(groups):
            raise ValueError(f"{len(values)} learning rates for {len(groups)} parameter groups")
        for g, v in zip(groups, values):
            g["lr"] = v

    def reset_optimizer_state(self) -> None:
        """Forget the optimizer's state (momenta, Adam moments, step counts): a fresh optimizer."""
        state = getattr(self.optimizer, "state", None)
        if state is not None and hasattr(state, "clear"):
            state.clear()

    def schedule_steps(self) -> int | None:
        """Steps of one pass of the learning-rate schedule: the run, or less where a recipe
        replays it (IMP's levels)."""
        if not self.total_steps:
            return self.total_steps
        return min([r.schedule_steps(self.total_steps) for r in self._recipes] or [self.total_steps])

    def finish(self) -> list[str]:
        """The end of training: the recipes' last part (Sup-tickets' superposition). Runs once;
        returns the labels of what changed the model (``["superposed"]``)."""
        if self._finished:
            return []
        self._finished = True
        for r in self._recipes:
            r.finish()
        self.apply_masks()
        return [r.finish_label for r in self._recipes if r.finish_label]

    @property
    def finished(self) -> bool:
        return self._finished

    def _check_ranks(self, step: int = 0) -> None:
        if self.check_ranks and self.sharded:
            check_sharded_agreement([sp.name for sp in self._sps], [sp.mask for sp in self._sps],
                                    [self._expected[sp.name] for sp in self._sps], self.seed, step)
        elif self.check_ranks:   # sparse execution is not offered under torch.distributed
            masked = [sp for sp in self._sps if not getattr(sp, "compact", False)]
            check_agreement([sp.name for sp in masked], [sp.mask for sp in masked], step)

    # --- reporting -------------------------------------------------------------------------
    def sparsity(self) -> float:
        """Actual sparsity over every parameter the engine masks."""
        return sparsity_of(self._sps)

    def exploration_rate(self) -> float:
        """ITOP's in-time over-parameterisation rate R_s = |union of all masks so far| / Σ N_l
        (Liu et al. 2021): the fraction of the sparse weights that have been active at some point."""
        sizes = {sp.name: numel_of(sp) for sp in self._sps}
        total = sum(sizes.get(n, u.numel()) for n, u in self._union.items())
        masks = {sp.name: sp.mask for sp in self._sps if not getattr(sp, "compact", False)}
        explored = sum(count_like(u, masks[n]) if u.dtype == torch.bool else u.numel() for n, u in self._union.items())
        return explored / total if total else 1.0

    def report(self) -> list[dict[str, Any]]:
        """Per parameter: name, shape, algorithm, target and actual sparsity, active and explored counts."""
        return report_rows(self.groups, self.clock(), self._union)

    def final_targets(self) -> dict[str, float]:
        """What each algorithm aims at by the end of training, per parameter."""
        return final_targets(self.groups, self.total_steps, self.steps_per_epoch)

    # --- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return engine_state(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the clock, algorithm and recipe state; the masks come with the model's state_dict."""
        load_engine_state(self, state)

    def remove(self) -> None:
        """Stop enforcing and updating; the masks stay on the model (and in its state_dict)."""
        for h in self._hook_handles:
            h.remove()
        if self._hook_handles:
            engine_hooks(self.optimizer, False)
            if _HOOKED.get(self.optimizer) is self:
                del _HOOKED[self.optimizer]
        self._hook_handles = []

    def __repr__(self) -> str:
        if not hasattr(self, "_sps"):
            return "Sparsifier(<not built>)"
        algs = ", ".join(g.algorithm.name for g in self.groups)
        return f"Sparsifier({algs}; {len(self._sps)} sparse parameters, sparsity {self.sparsity():.4f})"
