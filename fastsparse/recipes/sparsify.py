"""fasterai-style sparsification around its decisions: in-fit lottery tickets, and fasterai's
``SparsifyCallback`` for a plain PyTorch loop.

:class:`SparsifyRecipe` snapshots every weight and buffer at ``rewind_at`` and, after each
pruning event of a :class:`fastsparse.Sparsify` with ``lth=True``, rewinds them (the new masks
stay applied), clearing the optimizer's state with ``reset_optimizer``.
:class:`SparsifyScheduler` drives the same engine from a loop counted in epochs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from ..algorithms.sparsify import Sparsify
from ..core.masks import restore_state, snapshot_state
from ..core.schedules import Clock, ProgressSchedule, ScheduleLike
from ..engine.recipe import Recipe
from ..engine.sparsifier import Sparsifier

__all__ = ["SparsifyRecipe", "SparsifyScheduler"]


class SparsifyRecipe(Recipe):
    """Rewinding for ``Sparsify(lth=True)``: the snapshot at ``rewind_at``, the rewind after each event."""

    def __init__(self, algorithm: Sparsify, params, engine):
        super().__init__(algorithm, params, engine)
        self.rewind_state: dict[str, Tensor] | None = None
        self.rewind_point = f"rewind_at {algorithm.rewind_at}"   # how the error names it

    def check(self) -> None:
        a = self.algorithm
        if a.lth and isinstance(a.rewind_at, float) and 0 < a.rewind_at <= 1 and not self.engine.total_steps:
            raise ValueError("lth with rewind_at as a fraction of training needs total_steps")

    def attached(self) -> None:
        if self.algorithm.lth and self.algorithm.rewind_at == 0 and self.rewind_state is None:
            self.snapshot()

    def snapshot(self) -> None:
        """Remember every weight and buffer now: the values each pruning event rewinds to."""
        self.rewind_state = snapshot_state(self.engine.model)

    def on_step(self, clock: Clock) -> None:
        at = self.algorithm.rewind_at
        if self.algorithm.lth and at and self.rewind_state is None and clock.reached(at):
            self.snapshot()

    def after_update(self, clock: Clock) -> None:
        if self.algorithm.lth:
            self.rewind()

    @torch.no_grad()
    def rewind(self) -> None:
        """Every weight and buffer back to the snapshot (masks kept and applied)."""
        if self.rewind_state is None:
            raise RuntimeError(f"lth: nothing saved to rewind to at {self.rewind_point}: the first pruning event came "
                               "before it; rewind to a point before pruning starts")
        restore_state(self.engine.model, self.rewind_state)
        if self.algorithm.reset_optimizer:
            self.engine.reset_optimizer_state()

    def state_dict(self) -> dict[str, Any]:
        rs = self.rewind_state
        return {"rewind_state": None if rs is None else {k: v.clone() for k, v in rs.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        rs = state.get("rewind_state")
        self.rewind_state = None if rs is None else {k: v.clone() for k, v in rs.items()}


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
                                  distribution, round_to, lth=lth, rewind_at=0 if rewind_epoch == 0 else None,
                                  reset_optimizer=reset_optimizer, include=include, exclude=exclude,
                                  param_filter=param_filter)
        self.save_tickets = None if save_tickets is None else Path(save_tickets)
        self.tickets: list[Path] = []
        self.model, self.optimizer = model, optimizer
        self.lth, self.rewind_epoch, self.reset_end, self.reset_optimizer = bool(lth), rewind_epoch, reset_end, reset_optimizer
        self.engine = Sparsifier(model, optimizer, self.algorithm, seed=seed, hook=False, external_clock=True)
        self.recipe: SparsifyRecipe = self.engine.groups[0].recipe
        self.recipe.rewind_point = f"rewind_epoch {rewind_epoch} (call before_epoch(epoch) at the start of every epoch)"
        if self.recipe.rewind_state is None and rewind_epoch == 0:   # reset_end without lth rewinds too
            self.recipe.snapshot()
        self.step_count = 0
        self.events: list[dict[str, Any]] = []

    @property
    def rewind_state(self) -> dict[str, Tensor] | None:
        return self.recipe.rewind_state

    def before_epoch(self, epoch: int) -> None:
        """Call at the start of every epoch: saves the rewind weights at ``rewind_epoch``."""
        if epoch == self.rewind_epoch and (epoch > 0 or self.recipe.rewind_state is None):
            self.recipe.snapshot()

    def step(self, progress: float) -> bool:
        """After each optimizer step. Returns True when the masks changed (a pruning event; with
        ``lth`` the engine's recipe has rewound the weights)."""
        self.step_count += 1
        self.engine.set_clock(self.step_count, float(progress))
        changed = self.engine.step()
        if changed:
            self.events.append({"step": self.step_count, "progress": float(progress), "sparsity": self.sparsity()})
            if self.lth and self.save_tickets is not None:
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
        if self.recipe.rewind_state is None:
            raise RuntimeError(f"no weights were saved at rewind_epoch {self.rewind_epoch}: call before_epoch(epoch) at "
                               "the start of every epoch, and rewind to an epoch before pruning starts")
        self.recipe.rewind()

    def end(self) -> None:
        """After training: with ``reset_end`` the ticket goes back to its rewind values."""
        if self.reset_end:
            self.rewind()
        if self.save_tickets is not None:
            self.save_ticket()

    def sparsity(self) -> float:
        return self.engine.sparsity()

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count, "events": list(self.events), "engine": self.engine.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.engine.load_state_dict(state["engine"])
        self.step_count = int(state["step_count"])
        self.events = list(state.get("events", []))


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
