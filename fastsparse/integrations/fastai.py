"""fastai callbacks over the engine (extra ``fastai``).

* :class:`DynamicSparseTrainingCallback`: the seed's prune-and-regrow callback (SET, SNFS,
  RigL through the presets, or custom keep/grow scores).
* :class:`SparsifyCallback`: fasterai's gradual pruning and in-fit lottery tickets, over
  :class:`fastsparse.SparsifyScheduler`.
* :class:`SparseTrainingCallback`: any engine algorithm (``"gmp"``, ``RigL(...)``, ...).

How a fit drives the engine:

* ``before_fit`` builds the engine over ``learn.model`` and ``learn.opt`` without a step
  hook (fastai's optimizer is not a torch one; an ``OptimWrapper``'s torch optimizer is used
  for its state).
* ``after_step`` re-applies the masks (exact zeros after every step), then sets the engine's
  clock to (optimizer steps done, fraction of training done) and updates masks when due.
  The update follows the optimizer step of its batch and precedes fastai's ``zero_grad``,
  so an update batch's gradients are cleared like any other's (fastsparse 0.0.5 cancelled
  the batch, and its gradients leaked into the next one).
* Only real optimizer steps count: a step cancelled with ``CancelStepException`` (a step
  MixedPrecision's scaler skips) changes nothing, and with ``GradientAccumulation`` a
  batch without a step is not counted, so ``batches_per_update`` counts optimizer steps
  (accumulated batches).
* ``after_epoch`` and ``after_fit`` write the engine's state into the optimizer's first
  parameter group under the key ``"fastsparse"``, so ``learn.save``/``save_model`` (with
  the optimizer) carry it; a fit resumed with ``start_epoch`` after ``learn.load`` continues
  the clock, the update history and the algorithm's state. The masks themselves are
  buffers of the model and travel with its ``state_dict``.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from fastai.callback.core import Callback
from fastai.callback.training import GradientAccumulation
from fastai.optimizer import OptimWrapper
from torch import nn

from ..algorithms.base import SparsityAlgorithm, create
from ..algorithms.dst import REDISTRIBUTIONS
from ..algorithms.sparsify import Sparsify
from ..recipes.sparsify import SparsifyScheduler
from ..core.scores import CRITERIA
from ..engine.execution import check_execution
from ..engine.optim import dst_algorithm
from ..core.schedules import PROGRESS_SCHEDULES, ProgressSchedule
from ..core.scores import gradient_magnitude, resolve_score, weight_magnitude
from ..engine.sparsifier import Sparsifier

__all__ = [
    "SparseTrainingCallback", "DynamicSparseTrainingCallback", "SparsifyCallback",
    "STATE_KEY", "saved_state", "batches_per_step",
]

STATE_KEY = "fastsparse"


# --- helpers (pure, or reading the learner) -------------------------------------------------
def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _engine_optimizer(opt: Any) -> Any:
    """What the engine reads optimizer state from: a wrapped torch optimizer, or fastai's own."""
    return opt.opt if isinstance(opt, OptimWrapper) else opt


def _first_group(opt: Any) -> dict | None:
    if opt is None:
        return None
    if isinstance(opt, OptimWrapper):
        return opt.opt.param_groups[0]
    hypers = getattr(opt, "hypers", None)
    return hypers[0] if hypers else None


def saved_state(opt: Any) -> dict | None:
    """What a callback left in ``opt`` (and ``learn.save`` stored with it): ``{"kind": ..., "state":
    ...}``, or None."""
    group = _first_group(opt)
    return None if group is None else group.get(STATE_KEY)


def _save_state(opt: Any, kind: str, state: dict) -> None:
    group = _first_group(opt)
    if group is not None:
        group[STATE_KEY] = {"kind": kind, "state": state}


def batches_per_step(learn) -> int:
    """Batches per optimizer step: ceil(n_acc / batch size) under GradientAccumulation, else 1."""
    for cb in learn.cbs:
        if isinstance(cb, GradientAccumulation):
            bs = getattr(learn.dls.train, "bs", None) or 1
            return max(1, math.ceil(cb.n_acc / bs))
    return 1


def _check_int(value: Any, what: str, low: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{what} must be an integer ≥ {low}{' or None' if allow_none else ''}, got {value!r}")


# --- the shell every callback shares ---------------------------------------------------------
class _EngineCallback(Callback):
    """Maps fastai's training clock to the engine's; subclasses build and step their engine."""

    run_valid = False
    state_kind = "engine"  # which callbacks can read each other's saved state

    def before_fit(self) -> None:
        self._cancelled = False
        self._started = False
        self._build()

    def before_train(self) -> None:
        if not self._started:
            self._started = True
            if self.epoch > 0:  # a fit resumed with start_epoch: continue the saved clock
                self._resume()

    def before_batch(self) -> None:
        self._cancelled = False

    def after_cancel_step(self) -> None:
        self._cancelled = True

    def before_step(self) -> None:
        self._before_step()

    def after_step(self) -> None:
        if not self._cancelled:
            self._step(self._progress())

    def after_epoch(self) -> None:
        if self._started:  # epochs skipped by start_epoch must not overwrite the loaded state
            _save_state(self.learn.opt, self.state_kind, self._state())

    def after_fit(self) -> None:
        if self._started:
            self._finish()
            _save_state(self.learn.opt, self.state_kind, self._state())

    def _progress(self) -> float:
        """Fraction of training done once this batch's step is taken."""
        return (self.epoch * self.n_iter + self.iter + 1) / (self.n_epoch * self.n_iter)

    def _steps_per_epoch(self) -> int:
        return max(1, len(self.learn.dls.train) // batches_per_step(self.learn))

    def _resume(self) -> None:
        saved = saved_state(self.learn.opt)
        if saved is not None and saved.get("kind") == self.state_kind:
            self._load(saved["state"])
            return
        warnings.warn(f"{type(self).__name__}: the fit resumes at epoch {self.epoch} but the optimizer holds no "
                      f"state of a {self.state_kind} callback (saved without the optimizer?); the step count is "
                      "estimated from the epoch", stacklevel=2)
        self._set_step_count(self.epoch * self._steps_per_epoch())

    def _before_step(self) -> None:
        """Before the optimizer step (the engine sets a recipe's learning rate)."""

    def _finish(self) -> None:
        """After the fit, before the state is saved (subclasses: ``_build``, ``_step``, ``_state``,
        ``_load``, ``_set_step_count``)."""


class SparseTrainingCallback(_EngineCallback):
    """Train with any engine algorithm: ``SparseTrainingCallback(RigL(sparsity=0.9, ...))`` or a name.

    The algorithm's schedules see ``step`` = optimizer steps done in this fit and
    ``progress`` = fraction of the fit done, so points given as fractions of training
    (``UpdateSchedule(freq=50, stop=0.75)``) follow fastai's epochs. The whole method runs: the
    engine's recipe sets the learning rate where the method owns it (before each optimizer step,
    over fastai's own schedule), rewinds, saves tickets, superposes at the end of the fit; the
    training data (``learn.dls.train``, or ``data``) gives the batch of methods that score weights
    at attach and Sup-tickets' BatchNorm statistics. A method that runs its own loop (a score
    search) is refused at ``before_fit``. After the fit, ``self.sparsifier`` holds the engine.

    ``execution="sparse"`` or ``"auto"`` trains Linear weights in compact form
    (:mod:`fastsparse.engine.execution`); it needs a torch optimizer,
    ``opt_func=partial(OptimWrapper, opt=torch.optim.SGD)``, and leaves the model's Linear
    layers as ``SparseLinear`` after the fit (``fastsparse.export``, ``dense_state_dict``).
    """

    def __init__(self, algorithm: SparsityAlgorithm | str, seed: int = 0, zero_grown_state: bool = True,
                 data: Any = None, execution: str | dict[str, str] = "masked"):
        if isinstance(algorithm, str):
            algorithm = create(algorithm)
        if not isinstance(algorithm, SparsityAlgorithm):
            raise TypeError(f"algorithm must be a SparsityAlgorithm or a registered name, got {algorithm!r}")
        self.algorithm, self.seed, self.zero_grown_state = algorithm, int(seed), zero_grown_state
        self.data = data
        self.execution = check_execution(execution)
        self.sparsifier: Sparsifier | None = None

    def make_algorithm(self, model: nn.Module) -> SparsityAlgorithm:
        return self.algorithm

    def _build(self) -> None:
        model = _unwrap(self.learn.model)
        total = self.n_epoch * self._steps_per_epoch()
        data = self.data if self.data is not None else (lambda: self.learn.dls.train)
        self.sparsifier = Sparsifier(model, _engine_optimizer(self.learn.opt), self.make_algorithm(model),
                                     total_steps=total, seed=self.seed, zero_grown_state=self.zero_grown_state,
                                     hook=False, data=data, steps_per_epoch=self._steps_per_epoch(),
                                     external_clock=True, execution=self.execution,
                                     execution_batch=getattr(self.learn.dls.train, "bs", None))

    def _before_step(self) -> None:
        if self.sparsifier is not None:
            self.sparsifier.before_step()

    def _step(self, progress: float) -> None:
        sp = self.sparsifier
        sp.set_clock(sp.step_count + 1, progress)
        sp.step()

    def _state(self) -> dict:
        return self.sparsifier.state_dict() if self.sparsifier is not None else {}

    def _load(self, state: dict) -> None:
        self.sparsifier.load_state_dict(state)

    def _set_step_count(self, n: int) -> None:
        self.sparsifier.step_count = int(n)


class DynamicSparseTrainingCallback(SparseTrainingCallback):
    """Prune and regrow during ``learn.fit`` (the seed's callback)::

        sparse_hooks = sparsify_model(learn.model, model_sparsity=0.9, sparse_f=erdos_renyi_sparsity)
        learn.fit_one_cycle(5, cbs=DynamicSparseTrainingCallback(**RigL_presets, batches_per_update=32))

    Every ``batches_per_update`` optimizer steps (``None``: once per epoch, that is every
    ``len(dls.train)`` steps, or ``len(dls.train) // ceil(n_acc / bs)`` under
    ``GradientAccumulation``) until ``stop_pct`` of training, each layer drops
    floor(f · n_active) active weights with the lowest ``keep_score_f`` and grows as many with
    the highest ``grow_score_f``, f = initial_drop_grow_pct/2 · (1 + cos(π · pct / stop_pct)).
    The layer keeps its exact count (SNFS's ``redistribution="momentum"`` moves growth between
    layers and keeps the model's exact count). Grown weights start at 0 with zeroed optimizer
    state. ``sparse_modules`` restricts updates to the masked weights of those modules. The
    model must carry masks already (``sparsify_model``).
    """

    def __init__(
        self,
        sparse_modules: Iterable[nn.Module] | None = None,
        batches_per_update: int | None = None,
        initial_drop_grow_pct: float = 0.3,
        stop_pct: float = 0.75,
        keep_score_f: Callable = weight_magnitude,
        grow_score_f: Callable = gradient_magnitude,
        redistribution: str = "none",
        seed: int = 0,
        zero_grown_state: bool = True,
        execution: str | dict[str, str] = "masked",
    ):
        _check_int(batches_per_update, "batches_per_update", 1, allow_none=True)
        if not 0.0 <= float(initial_drop_grow_pct) <= 1.0:
            raise ValueError(f"initial_drop_grow_pct must be a fraction in [0, 1], got {initial_drop_grow_pct}")
        if not 0.0 < float(stop_pct) <= 1.0:
            raise ValueError(f"stop_pct must be a fraction of training in (0, 1], got {stop_pct}")
        if str(redistribution).lower() not in REDISTRIBUTIONS:
            raise ValueError(f"unknown redistribution {redistribution!r}; valid: {list(REDISTRIBUTIONS)}")
        resolve_score(keep_score_f, "keep score")
        resolve_score(grow_score_f, "grow score")
        self.sparse_modules = None if sparse_modules is None else list(sparse_modules)
        self.batches_per_update = batches_per_update
        self.initial_drop_grow_pct, self.stop_pct = initial_drop_grow_pct, stop_pct
        self.keep_score_f, self.grow_score_f, self.redistribution = keep_score_f, grow_score_f, redistribution
        self.seed, self.zero_grown_state = int(seed), zero_grown_state
        self.execution = check_execution(execution)
        self.data, self.sparsifier = None, None

    def make_algorithm(self, model: nn.Module) -> SparsityAlgorithm:
        bpu = self.batches_per_update or self._steps_per_epoch()
        return dst_algorithm(model, self.sparse_modules, bpu, self.initial_drop_grow_pct, self.stop_pct,
                             self.keep_score_f, self.grow_score_f, self.redistribution)


@dataclass(frozen=True)
class _Window:
    """A custom schedule f(x), x ∈ [0, 1] the position between ``start`` and ``end``; 0 before start."""

    fn: Callable[[float], float]
    start: float
    end: float

    def __call__(self, progress: float) -> float:
        if progress < self.start:
            return 0.0
        if progress >= self.end or self.end <= self.start:
            return float(self.fn(1.0))
        return float(self.fn((progress - self.start) / (self.end - self.start)))


_SCHEDULE_NAMES = {fn: name for name, fn in PROGRESS_SCHEDULES.items()}
_CRITERIA_NAMES = {fn: name for name, fn in CRITERIA.items()}


def _percent(sparsity: float) -> float:
    s = float(sparsity)
    if 1.0 < s <= 100.0:
        warnings.warn(f"SparsifyCallback: sparsity {sparsity} read as {s:g}% (a fraction {s / 100:g}); "
                      "pass a fraction in [0, 1) to silence this", stacklevel=3)
        return s / 100.0
    return s


class SparsifyCallback(_EngineCallback):
    """fasterai's ``SparsifyCallback``: prune to ``sparsity`` along a schedule, optionally as
    in-fit lottery tickets. Both of fasterai's call forms work::

        SparsifyCallback(50, 'weight', 'global', large_final, iterative, start_epoch=5, lth=True)
        SparsifyCallback(sparsity=0.5, granularity='weight', context='global',
                         criteria=large_final, schedule=iterative, start_epoch=5, lth=True)

    ``sparsity`` is a fraction in [0, 1); a number in (1, 100] is read as a percent, with a
    warning. ``criteria`` and ``schedule`` are names or the functions of
    :mod:`fastsparse.core.scores` / :mod:`fastsparse.core.schedules` (a custom schedule is a function
    of the position x ∈ [0, 1] between the start and end epochs). Pruning runs between
    ``start_epoch`` (default: the schedule's own start, e.g. 20% of training for
    ``iterative``) and ``end_epoch`` (default: the end of the fit). With ``lth=True`` every
    pruning event rewinds all weights and buffers to their values at the start of
    ``rewind_epoch``; ``reset_end=True`` returns the ticket at those values after the fit.
    ``end_sparsity`` and ``method`` are accepted as the blog's spellings of ``sparsity`` and
    ``context``. After the fit, ``self.scheduler`` holds the scheduler and its ``events``.

    fasterai's other arguments pass to :class:`~fastsparse.SparsifyScheduler`: ``sparsity`` as
    a {module name: sparsity} dict, ``nm``, ``layer_type``, ``round_to``, ``start_sparsity``,
    ``save_tickets`` (True: the working folder, or a folder); ``model`` sparsifies that module
    instead of ``learn.model``.
    """

    state_kind = "sparsify"

    def __init__(
        self,
        sparsity: float | None = None,
        granularity: str = "weight",
        context: str | None = None,
        criteria: str | Callable = "large_final",
        schedule: str | Callable | ProgressSchedule = "agp",
        start_epoch: int | None = None,
        end_epoch: int | None = None,
        lth: bool = False,
        rewind_epoch: int = 0,
        reset_end: bool = False,
        n_steps: int = 3,
        distribution: str | Callable = "uniform",
        include: str | Iterable[str] | None = None,
        exclude: str | Iterable[str] | None = None,
        reset_optimizer: bool = False,
        seed: int = 0,
        *,
        end_sparsity: float | None = None,
        method: str | None = None,
        model: nn.Module | None = None,
        layer_type: type | tuple[type, ...] | None = None,
        nm: bool = False,
        round_to: int | None = None,
        start_sparsity: float = 0.0,
        save_tickets: bool | str = False,
    ):
        if (sparsity is None) == (end_sparsity is None):
            raise TypeError("give the target as sparsity= (or the blog's end_sparsity=), exactly once")
        if context is not None and method is not None:
            raise TypeError("context and method are two spellings of one argument; pass one of them")
        _check_int(start_epoch, "start_epoch", 0, allow_none=True)
        _check_int(end_epoch, "end_epoch", 1, allow_none=True)
        _check_int(rewind_epoch, "rewind_epoch", 0)
        if start_epoch is not None and end_epoch is not None and end_epoch < start_epoch:
            raise ValueError(f"end_epoch {end_epoch} comes before start_epoch {start_epoch}")
        if isinstance(schedule, ProgressSchedule) and (start_epoch is not None or end_epoch is not None):
            raise ValueError("a ProgressSchedule carries its own start and end: drop start_epoch/end_epoch")
        if not (isinstance(schedule, (str, ProgressSchedule)) or callable(schedule)):
            raise TypeError(f"schedule must be a name, a ProgressSchedule or a function, got {schedule!r}")
        target = sparsity if sparsity is not None else end_sparsity
        self.sparsity = {k: _percent(v) for k, v in target.items()} if isinstance(target, dict) else _percent(target)
        self.sparse_model, self.layer_type, self.nm, self.round_to = model, layer_type, nm, round_to
        self.start_sparsity = _percent(start_sparsity)
        self.save_tickets = "." if save_tickets is True else (save_tickets or None)
        self.granularity, self.context = granularity, (context or method or "local")
        self.criteria = _CRITERIA_NAMES.get(criteria, criteria) if callable(criteria) else criteria
        self.schedule = _SCHEDULE_NAMES.get(schedule, schedule) if callable(schedule) else schedule
        self.start_epoch, self.end_epoch, self.n_steps = start_epoch, end_epoch, n_steps
        self.lth, self.rewind_epoch, self.reset_end = lth, rewind_epoch, reset_end
        self.reset_optimizer = reset_optimizer
        self.distribution, self.include, self.exclude, self.seed = distribution, include, exclude, int(seed)
        # fail now, not at the first fit: build the schedule and a throwaway algorithm
        self._progress_schedule(n_epoch=max(1, (end_epoch or 0), (start_epoch or 0)))
        if not isinstance(self.sparsity, dict) and not nm:
            Sparsify(self.sparsity, granularity, self.context, self.criteria, "agp", n_steps=n_steps,
                     distribution=distribution, round_to=round_to, include=include, exclude=exclude)
        self.scheduler: SparsifyScheduler | None = None

    def _progress_schedule(self, n_epoch: int) -> Callable[[float], float]:
        if isinstance(self.schedule, ProgressSchedule):
            return self.schedule
        start = None if self.start_epoch is None else min(1.0, self.start_epoch / n_epoch)
        end = 1.0 if self.end_epoch is None else min(1.0, self.end_epoch / n_epoch)
        if isinstance(self.schedule, str):
            return ProgressSchedule(self.schedule, start, end, self.n_steps)
        return _Window(self.schedule, 0.0 if start is None else start, end)

    def _build(self) -> None:
        model = _unwrap(self.sparse_model if self.sparse_model is not None else self.learn.model)
        schedule = self._progress_schedule(self.n_epoch)
        if self.start_sparsity and isinstance(schedule, ProgressSchedule):
            top = max(self.sparsity.values()) if isinstance(self.sparsity, dict) else self.sparsity
            schedule = dataclasses.replace(schedule, start_val=self.start_sparsity / top)
        self.scheduler = SparsifyScheduler(
            model, _engine_optimizer(self.learn.opt), self.sparsity, self.granularity, self.context, self.criteria,
            schedule, n_steps=self.n_steps, lth=self.lth,
            rewind_epoch=self.rewind_epoch, reset_end=self.reset_end, reset_optimizer=self.reset_optimizer,
            distribution=self.distribution, include=self.include, exclude=self.exclude, seed=self.seed,
            layer_type=self.layer_type, nm=self.nm, round_to=self.round_to, save_tickets=self.save_tickets)

    def before_train(self) -> None:
        super().before_train()
        self.scheduler.before_epoch(self.epoch)

    def _step(self, progress: float) -> None:
        self.scheduler.step(progress)

    def _finish(self) -> None:
        self.scheduler.end()

    def _state(self) -> dict:
        return self.scheduler.state_dict() if self.scheduler is not None else {}

    def _load(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)

    def _set_step_count(self, n: int) -> None:
        self.scheduler.step_count = int(n)
