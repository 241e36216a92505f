"""fasterai-style sparsification on a progress schedule, with in-fit lottery tickets.

:class:`Sparsify` is the algorithm: at training progress p the target is
schedule(p) · sparsity (per layer: schedule(p) · s_l from the distribution), groups of the
chosen granularity are scored by the criterion (mean over the group) and selected per layer
(``local``) or over all layers (``global``). While the target rises, pruning is nested (only
active groups compete); when it falls (``dsd``), active groups stay and the best-scored
inactive ones return, at 0. With an ``"N:M"`` granularity the schedule moves from M:M to N:M,
keeping M − round(f · (M − N)) of every M.

:class:`SparsifyScheduler` drives it from a plain loop (and, later, from a fastai callback):
it owns a :class:`fastsparse.Sparsifier` without an optimizer hook, so call
``scheduler.step(progress)`` after every ``optimizer.step()``; with ``lth=True`` every
pruning event rewinds all weights and buffers to their values at ``rewind_epoch``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from ..core.criteria import UPDATING, criterion_scores, needs_init, resolve_criterion
from ..core.distributions import resolve_sparsities
from ..core.masks import SparseParam, n_keep
from ..core.progress import ProgressSchedule, ScheduleLike, as_progress_schedule
from ..core.schedules import Clock
from ..engine.sparsifier import Sparsifier
from ..core.structured import (
    check_nm, check_scope, input_dim, nm_keep_for, nm_mask, parse_nm, resolve_dims, select_masks,
)
from .base import SparsityAlgorithm, generator_for, register
from .lottery import restore_state, snapshot_state

__all__ = ["Sparsify", "SparsifyScheduler"]


@register
class Sparsify(SparsityAlgorithm):
    """Prune to ``sparsity`` along a progress schedule (fasterai's arguments).

    granularity: ``weight``, a structured granularity (``row``, ``column``, ``filter``,
      ``kernel``, ``channel``) or ``"N:M"`` (then ``sparsity`` must be 1 − N/M).
    context: ``local`` or ``global``. criteria: a name from :mod:`fastsparse.core.criteria` or
    ``f(w, w0) -> scores``. schedule: a name from :mod:`fastsparse.core.progress` (with ``start``,
    ``end`` as fractions of training, ``n_steps`` for ``iterative``), a
    :class:`~fastsparse.core.progress.ProgressSchedule` or a function of progress.
    round_to: ``local`` only: each layer keeps a multiple of ``round_to`` groups (rounded up,
      at least ``round_to``; fasterai's ``round_to``).
    lth / rewind_at: in-fit lottery tickets for the engine's own loop (a config, ``fastsparse
      train``): after every pruning event all weights and buffers of the model go back to their
      values at ``rewind_at`` (a step, or a fraction of training; 0 = initialisation), then the
      new masks apply. :class:`SparsifyScheduler` does the same with epochs.
    """

    name = "sparsify"
    keeps_count = False

    def __init__(
        self,
        sparsity: float = 0.5,
        granularity: str = "weight",
        context: str = "local",
        criteria: str | Callable = "large_final",
        schedule: ScheduleLike = "agp",
        start: float | None = None,
        end: float | None = None,
        n_steps: int = 3,
        distribution: str | Callable = "uniform",
        round_to: int | None = None,
        lth: bool = False,
        rewind_at: int | float = 0,
        **kwargs,
    ):
        if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
            raise ValueError(f"round_to must be an integer ≥ 1 or None, got {round_to!r}")
        if round_to is not None and context != "local":
            raise ValueError(f"round_to rounds each layer's kept groups, so it needs context 'local', got {context!r}")
        if isinstance(rewind_at, bool) or not isinstance(rewind_at, (int, float)) or rewind_at < 0:
            raise ValueError(f"rewind_at must be a step (integer ≥ 0) or a fraction of training in [0, 1], "
                             f"got {rewind_at!r}")
        super().__init__(sparsity, distribution, **kwargs)
        self.nm = parse_nm(granularity)
        if self.nm is not None and abs(self.sparsity - (1 - self.nm[0] / self.nm[1])) > 1e-9:
            n, m = self.nm
            raise ValueError(f"granularity {granularity!r} means sparsity {1 - n / m}; got sparsity {sparsity}")
        self.granularity = granularity
        self.context = check_scope(context)
        resolve_criterion(criteria)
        self.criteria = criteria
        self.schedule = as_progress_schedule(schedule, start, end, n_steps)
        if lth and isinstance(rewind_at, float) and isinstance(self.schedule, ProgressSchedule) \
                and rewind_at > float(self.schedule.start):
            raise ValueError(f"rewind_at {rewind_at} is after pruning starts ({self.schedule.start} of training): "
                             "rewind to a point before the first pruning event")
        self.round_to, self.lth, self.rewind_at = round_to, bool(lth), rewind_at
        self.init_weights: dict[str, Tensor] = {}
        self.applied = 0.0
        self.rewind_state: dict[str, Tensor] | None = None
        self._model: nn.Module | None = None

    def select(self, model: nn.Module) -> list[SparseParam]:
        if self.lth:
            self._model = model
            if self.rewind_at == 0:
                self.rewind_state = snapshot_state(model)
        return super().select(model)

    # --- set-up -------------------------------------------------------------------------------
    def _check_granularity(self, params: Sequence[SparseParam]) -> None:
        if self.nm is None:
            resolve_dims(params, self.granularity)
            return
        for sp in params:
            d = input_dim(sp.module, tuple(sp.param.shape))
            check_nm(*self.nm, size=sp.param.shape[d], where=f"the input dimension of {sp.name}")

    def initial_sparsities(self, params: Sequence[SparseParam]) -> list[float]:
        self._check_granularity(params)
        return [0.0] * len(params)

    def initial_masks(self, params, sparsities, seed) -> list[Tensor]:
        self.save_init_weights(params)
        return [torch.ones_like(sp.param, dtype=torch.bool) for sp in params]

    @torch.no_grad()
    def save_init_weights(self, params: Sequence[SparseParam]) -> None:
        """Remember the weights the init-based criteria compare against (done at set-up)."""
        self.init_weights = {sp.name: sp.param.detach().clone() for sp in params}

    # --- the schedule -------------------------------------------------------------------------
    def fraction(self, clock: Clock) -> float:
        return float(self.schedule(clock.fraction))

    def is_update(self, clock: Clock) -> bool:
        if self.lth and self.rewind_state is None and self._model is not None and clock.reached(self.rewind_at):
            self.rewind_state = snapshot_state(self._model)
        return self.fraction(clock) != self.applied

    def _rounded(self, dims: Sequence[tuple[int, ...]], params: Sequence[SparseParam],
                 sparsities: Sequence[float]) -> list[float]:
        """Per-layer sparsities whose kept group count is a multiple of ``round_to`` (rounded up)."""
        out = []
        for d, sp, s in zip(dims, params, sparsities):
            groups = sp.param.numel() // max(1, math.prod(sp.param.shape[i] for i in d))
            k = n_keep(groups, s)
            k = min(groups, max(self.round_to, self.round_to * math.ceil(k / self.round_to)))
            out.append(1.0 - k / groups)
        return out

    def _layer_sparsities(self, params: Sequence[SparseParam]) -> list[float]:
        return resolve_sparsities(self.distribution, [tuple(p.param.shape) for p in params], self.sparsity)

    def target_sparsities(self, params: Sequence[SparseParam], clock: Clock) -> list[float]:
        f = self.fraction(clock)
        if self.nm is not None:
            return [1 - nm_keep_for(f, *self.nm) / self.nm[1]] * len(params)
        if self.context == "global":
            return [f * self.sparsity] * len(params)
        return [f * s for s in self._layer_sparsities(params)]

    # --- the decision -------------------------------------------------------------------------
    @torch.no_grad()
    def update_masks(self, params, optimizer, clock: Clock, seed: int) -> list[Tensor] | None:
        self._check_granularity(params)
        if needs_init(self.criteria):
            missing = [sp.name for sp in params if sp.name not in self.init_weights]
            if missing:
                raise ValueError(f"criterion {self.criteria!r} compares with the weights saved at set-up, but none "
                                 f"were saved for {missing}: call save_init_weights(params) first")
        f = self.fraction(clock)
        masks = [sp.mask for sp in params]
        if self.lth and (self.rewind_state is None or self._model is None):
            raise RuntimeError(f"lth: nothing saved to rewind to at {self.rewind_at}: the first pruning event came "
                               "before rewind_at, or the algorithm was not set up on a model (Sparsifier)")
        scores = [criterion_scores(self.criteria, sp.param, self.init_weights.get(sp.name),
                                   generator_for(seed, clock.step, sp.name), sp.param.grad) for sp in params]
        if self.nm is not None:
            n, m = self.nm
            keep, before = nm_keep_for(f, n, m), nm_keep_for(self.applied, n, m)
            if keep == m:
                new = [torch.ones_like(mk) for mk in masks]
            else:
                new = [nm_mask(s, keep, m, input_dim(sp.module, tuple(sp.param.shape)), mk if keep <= before else None)
                       for s, sp, mk in zip(scores, params, masks)]
        else:
            dims = resolve_dims(params, self.granularity)
            if self.context == "global":
                new = select_masks(scores, dims, f * self.sparsity, "global", masks)
            else:
                layer = [f * s for s in self._layer_sparsities(params)]
                if self.round_to is not None and f > 0:
                    layer = self._rounded(dims, params, layer)
                new = select_masks(scores, dims, layer, "local", masks)
        self.applied = f
        if isinstance(self.criteria, str) and self.criteria in UPDATING:
            # the next event compares with the weights of this one, as pruned now
            self.init_weights = {sp.name: (sp.param.detach() * m).clone() for sp, m in zip(params, new)}
        if self.lth:
            restore_state(self._model, self.rewind_state)   # the engine then applies the new masks
        return new

    def state_dict(self) -> dict[str, Any]:
        rs = None if self.rewind_state is None else {k: v.clone() for k, v in self.rewind_state.items()}
        return {"applied": self.applied, "init_weights": {k: v.clone() for k, v in self.init_weights.items()},
                "rewind_state": rs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.applied = float(state.get("applied", 0.0))
        self.init_weights = {k: v.clone() for k, v in state.get("init_weights", {}).items()}
        rs = state.get("rewind_state")
        self.rewind_state = None if rs is None else {k: v.clone() for k, v in rs.items()}

    def __repr__(self) -> str:
        return (f"Sparsify(sparsity={self.sparsity}, granularity={self.granularity!r}, context={self.context!r}, "
                f"criteria={getattr(self.criteria, '__name__', self.criteria)!r}, schedule={self.schedule!r})")


class SparsifyScheduler:
    """fasterai's ``SparsifyCallback`` for a plain PyTorch loop::

        sched = SparsifyScheduler(model, opt, sparsity=0.5, granularity="weight", context="global",
                                  criteria="large_final", schedule="iterative", lth=True)
        for epoch in range(epochs):
            sched.before_epoch(epoch)
            for xb, yb in data:
                loss_fn(model(xb), yb).backward(); opt.step(); sched.step(progress); opt.zero_grad()
        sched.end()

    ``step(progress)`` re-applies the masks, prunes when the schedule moves (``progress`` is
    the fraction of training done), and with ``lth=True`` rewinds every weight, bias and
    buffer to their values at the start of ``rewind_epoch`` after each pruning event
    (``reset_optimizer=True`` also clears the optimizer's state then). ``end()`` rewinds the
    ticket to those values when ``reset_end=True``. Sparsity is a fraction in [0, 1).

    fasterai's further arguments: ``sparsity`` may be a dict {module name: sparsity} (those
    layers only, ``local``); ``nm=True`` is the 2:4 pattern (granularity ``"2:4"``, sparsity
    0.5); ``layer_type`` restricts pruning to the weights of modules of that type (fasterai
    defaults to ``nn.Conv2d``; here None keeps the default filter); ``round_to`` (see
    :class:`Sparsify`); ``start_sparsity`` is where the schedule starts (fasterai's old
    ``start_sparsity``; the value is start + (sparsity − start) · schedule); ``save_tickets``,
    a folder: at every pruning event with ``lth`` and at :meth:`end`, the ticket (masks and
    rewind weights, ``winning_ticket_<sparsity %>.pth``) is saved there (paths in ``tickets``).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Any = None,
        sparsity: float | dict[str, float] = 0.5,
        granularity: str = "weight",
        context: str = "local",
        criteria: str | Callable = "large_final",
        schedule: ScheduleLike = "agp",
        start: float | None = None,
        end: float | None = None,
        n_steps: int = 3,
        lth: bool = False,
        rewind_epoch: int = 0,
        reset_end: bool = False,
        reset_optimizer: bool = False,
        distribution: str | Callable = "uniform",
        include: str | Iterable[str] | None = None,
        exclude: str | Iterable[str] | None = None,
        seed: int = 0,
        *,
        layer_type: type | tuple[type, ...] | None = None,
        nm: bool = False,
        round_to: int | None = None,
        start_sparsity: float = 0.0,
        save_tickets: str | Path | None = None,
    ):
        if isinstance(rewind_epoch, bool) or not isinstance(rewind_epoch, int) or rewind_epoch < 0:
            raise ValueError(f"rewind_epoch must be an integer ≥ 0, got {rewind_epoch!r}")
        if layer_type is not None and not (isinstance(layer_type, type) or
                                           (isinstance(layer_type, tuple) and all(isinstance(t, type) for t in layer_type))):
            raise TypeError(f"layer_type must be a module class (e.g. nn.Conv2d) or a tuple of them, got {layer_type!r}")
        param_filter = None
        if isinstance(sparsity, dict):
            sparsity, distribution, include = _per_layer(model, sparsity, context, include)
        if layer_type is not None:
            param_filter = lambda name, p, m: isinstance(m, layer_type) and p.dim() > 1  # noqa: E731
        if nm:
            if granularity not in ("weight", "2:4"):
                raise ValueError(f"nm=True is the 2:4 pattern; it replaces granularity, got {granularity!r}")
            granularity, sparsity = "2:4", 0.5
        if start_sparsity:
            if not 0.0 <= float(start_sparsity) <= float(sparsity):
                raise ValueError(f"start_sparsity must be in [0, sparsity {sparsity}], got {start_sparsity}")
            if not isinstance(schedule, str):
                raise ValueError("start_sparsity goes with a schedule name; a schedule object carries its own start_val")
            schedule = ProgressSchedule(schedule, start, 1.0 if end is None else end, n_steps,
                                        start_val=float(start_sparsity) / float(sparsity))
            start = end = None
        self.algorithm = Sparsify(sparsity, granularity, context, criteria, schedule, start, end, n_steps,
                                  distribution, round_to, include=include, exclude=exclude, param_filter=param_filter)
        self.save_tickets = None if save_tickets is None else Path(save_tickets)
        self.tickets: list[Path] = []
        self.model, self.optimizer = model, optimizer
        self.lth, self.rewind_epoch, self.reset_end, self.reset_optimizer = bool(lth), rewind_epoch, reset_end, reset_optimizer
        self.engine = Sparsifier(model, optimizer, self.algorithm, seed=seed, hook=False)
        params = self.engine.groups[0].params
        if set(self.algorithm.init_weights) != {sp.name for sp in params}:
            self.algorithm.save_init_weights(params)
        self.rewind_state: dict[str, Tensor] | None = snapshot_state(model) if rewind_epoch == 0 else None
        self.step_count = 0
        self.events: list[dict[str, Any]] = []

    def before_epoch(self, epoch: int) -> None:
        """Call at the start of every epoch: saves the rewind weights at ``rewind_epoch``."""
        if epoch == self.rewind_epoch:
            self.rewind_state = snapshot_state(self.model)

    def step(self, progress: float) -> bool:
        """After each optimizer step. Returns True when the masks changed (a pruning event)."""
        self.step_count += 1
        self.engine.set_clock(self.step_count, float(progress))
        changed = self.engine.step()
        if changed:
            self.events.append({"step": self.step_count, "progress": float(progress), "sparsity": self.sparsity()})
            if self.lth:
                self.rewind()
                if self.save_tickets is not None:
                    self.save_ticket()
        return changed

    @torch.no_grad()
    def save_ticket(self) -> Path:
        """Save the ticket now: masks and the weights at ``rewind_epoch`` (or as they are, without any)."""
        state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        if self.rewind_state is not None:
            state.update({k: v.clone() for k, v in self.rewind_state.items()})
        for sp in self.engine.groups[0].params:
            state[sp.name] = state[sp.name] * sp.mask
        self.save_tickets.mkdir(parents=True, exist_ok=True)
        path = self.save_tickets / f"winning_ticket_{100 * self.sparsity():.2f}.pth"
        torch.save(state, path)
        self.tickets.append(path)
        return path

    @torch.no_grad()
    def rewind(self) -> None:
        """Every weight and buffer back to its value at ``rewind_epoch`` (masks kept and applied)."""
        if self.rewind_state is None:
            raise RuntimeError(f"no weights were saved at rewind_epoch {self.rewind_epoch}: call before_epoch(epoch) at "
                               "the start of every epoch, and rewind to an epoch before pruning starts")
        restore_state(self.model, self.rewind_state)
        if self.reset_optimizer and self.optimizer is not None:
            for p in self.model.parameters():
                self.optimizer.state.pop(p, None)

    def end(self) -> None:
        """After training: with ``reset_end`` the ticket goes back to its rewind values."""
        if self.reset_end:
            self.rewind()
        if self.save_tickets is not None:
            self.save_ticket()

    def sparsity(self) -> float:
        return self.engine.sparsity()

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count, "events": list(self.events), "engine": self.engine.state_dict(),
                "rewind_state": None if self.rewind_state is None else {k: v.clone() for k, v in self.rewind_state.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.engine.load_state_dict(state["engine"])
        self.step_count = int(state["step_count"])
        self.events = list(state.get("events", []))
        rs = state.get("rewind_state")
        self.rewind_state = None if rs is None else {k: v.clone() for k, v in rs.items()}


def _per_layer(model: nn.Module, sparsities: dict[str, float], context: str,
               include: Any) -> tuple[float, Callable, list[str]]:
    """fasterai's {module name: sparsity}: those modules' weights, each at its own sparsity."""
    if context != "local":
        raise ValueError(f"a per-layer sparsity dict needs context 'local', got {context!r}")
    if include is not None:
        raise ValueError("a per-layer sparsity dict selects its layers itself: drop include")
    modules = dict(model.named_modules())
    unknown = [k for k in sparsities if k not in modules or not isinstance(getattr(modules[k], "weight", None), Tensor)]
    if unknown:
        raise ValueError(f"no module with a weight is named {unknown}; module names: "
                         f"{[n for n, m in modules.items() if isinstance(getattr(m, 'weight', None), Tensor)]}")
    order = [n for n in modules if n in sparsities]
    values = [float(sparsities[n]) for n in order]

    def per_layer(params: Sequence, model_sparsity: float) -> list[float]:
        return list(values)

    return max(values), per_layer, [f"{n}.weight" for n in order]
