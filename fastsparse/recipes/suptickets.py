"""Sup-tickets around its decisions (Yin et al. 2022): the cyclic learning rate, a ticket per
cycle, the superposition, the prune back to the target count and BatchNorm re-estimation.

:class:`SupTicketsRecipe` runs inside the engine, so a plain loop, the fastai and Lightning
callbacks, ``from_config`` and ``fastsparse train`` all run the whole method:

* before each step of the cyclic phase, the learning rate of every parameter group is set to
  the cycle's triangle (the loop's own schedule rules the base phase);
* at the end of the base phase (with ``include_base``, the default, as the authors' code does)
  and at the end of every cycle, the state (masks applied, before the next cycle's
  re-exploration) joins the superposition: CAA, the running mean θ ← (1 − 1/(k+1)) · θ + θ_k/(k+1),
  or CIMA, θ ← λ · θ_k + (1 − λ) · θ (the authors' ``CIMA_average(decay)`` as released is called
  with three arguments and crashes; this is its evident intent: start from the first member,
  fold in each later one with weight λ);
* at the end of training (:meth:`finish`): the superposed state is loaded, pruned back to the
  last ticket's count by global magnitude (or per layer), and BatchNorm statistics are
  re-estimated over the engine's ``data``.

:class:`SupTicketsTrainer` is a plain-loop driver over the same engine.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from ..algorithms.suptickets import SupTickets, check_superposition, cyclic_plan
from ..core.masks import global_topk_masks, topk_mask
from ..core.schedules import Clock
from ..engine.data import inputs_of
from ..engine.recipe import EntryPointRefused, Recipe
from ..engine.sparsifier import Sparsifier

__all__ = ["SupTicketsRecipe", "SupTicketsTrainer", "Superposer", "superpose", "CheapTicket"]


class Superposer:
    """Running superposition of state dicts: CAA (running mean) or CIMA (λ · new + (1 − λ) · old).
    Floating-point entries are combined; the others (bool masks, BN batch counters) follow the
    latest member."""

    def __init__(self, method: str = "caa", cima_factor: float = 0.5):
        self.method = check_superposition(method, cima_factor)
        self.cima_factor = float(cima_factor)
        self.count = 0
        self.state: dict[str, Tensor] = {}

    @torch.no_grad()
    def add(self, state: dict[str, Tensor]) -> None:
        k = self.count
        for name, value in state.items():
            value = value.detach()
            if k == 0 or not value.is_floating_point():
                self.state[name] = value.clone()
            elif self.method == "caa":
                self.state[name].mul_(1 - 1 / (k + 1)).add_(value, alpha=1 / (k + 1))
            else:
                self.state[name].mul_(1 - self.cima_factor).add_(value, alpha=self.cima_factor)
        self.count += 1


def superpose(states: Sequence[dict[str, Tensor]], method: str = "caa", cima_factor: float = 0.5) -> dict[str, Tensor]:
    """The superposition of ``states`` in order (see :class:`Superposer`)."""
    if not states:
        raise ValueError("nothing to superpose: no ticket was saved")
    sup = Superposer(method, cima_factor)
    for s in states:
        sup.add(s)
    return sup.state


@dataclass
class CheapTicket:
    """One member of the superposition: its index, the step it was saved at, its masks, and (with
    ``keep_tickets``) its whole state. The base model, when included, is member 0."""

    index: int
    step: int
    masks: dict[str, Tensor]
    state: dict[str, Tensor] | None = field(default=None, repr=False)
    base: bool = False


class SupTicketsRecipe(Recipe):
    """The cyclic phase of :class:`~fastsparse.SupTickets` (see the module)."""

    owns_lr = True
    exclusive = True
    finish_label = "superposed"

    def __init__(self, algorithm: SupTickets, params, engine):
        super().__init__(algorithm, params, engine)
        self.keep_tickets = False
        self.tickets: list[CheapTicket] = []
        self.superposer = Superposer(algorithm.superposition, algorithm.cima_factor)

    def check(self) -> None:
        engine = self.engine
        self.plan = self.algorithm.plan(engine.total_steps, engine.steps_per_epoch)   # raises without them
        if not engine.auto_finish:
            return   # the driver calls finish() itself (and checks its data)
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in engine.model.modules())
        if has_bn and not engine.data.given:
            raise EntryPointRefused("suptickets re-estimates BatchNorm statistics after superposing its tickets: "
                                    "pass the training data to the engine (Sparsifier(..., data=train_loader))")

    def learning_rate(self, step: int) -> float | None:
        return self.plan.lr(step)

    @torch.no_grad()
    def on_step(self, clock: Clock) -> None:
        base_end = self.algorithm.include_base and clock.step == self.plan.pretrain_steps
        if base_end or self.plan.is_cycle_end(clock.step):
            self._add(clock.step, base=base_end)

    def _add(self, step: int, base: bool) -> None:
        state = self.engine.model.state_dict()
        self.superposer.add(state)
        masks = {sp.name: sp.mask.clone() for sp in self.params}
        kept = {k: v.detach().clone() for k, v in state.items()} if self.keep_tickets else None
        self.tickets.append(CheapTicket(len(self.tickets), step, masks, kept, base))

    @torch.no_grad()
    def finish(self) -> None:
        """Load the superposed state, prune it back to the last ticket's count (global magnitude,
        or per layer with ``prune_scope="local"``), and re-estimate BN statistics over the data."""
        if not any(not t.base for t in self.tickets):
            raise RuntimeError("suptickets: no ticket was saved; the training ended before its first cycle did")
        model = self.engine.model
        current = model.state_dict()
        for name, value in self.superposer.state.items():
            if value.is_floating_point():
                current[name].copy_(value)
        counts = [int(self.tickets[-1].masks[sp.name].sum()) for sp in self.params]
        scores = [sp.param.detach().abs() for sp in self.params]
        if self.algorithm.prune_scope == "global":
            masks = global_topk_masks(scores, sum(counts))
        else:
            masks = [topk_mask(s, c) for s, c in zip(scores, counts)]
        self.engine.set_masks(self.params, masks)
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            device = next(model.parameters()).device
            torch.optim.swa_utils.update_bn((x.to(device) for x in self.engine.data.inputs()), model)

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.superposer.count, "state": dict(self.superposer.state),
                "tickets": [(t.index, t.step, t.masks, t.base) for t in self.tickets]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.superposer.count = int(state["count"])
        self.superposer.state = {k: v.clone() for k, v in state["state"].items()}
        self.tickets = [CheapTicket(i, step, masks, None, base) for i, step, masks, base in state["tickets"]]


class SupTicketsTrainer:
    """Plain-loop driver: trains ``epochs`` epochs with a :class:`SupTickets` algorithm.

    Each iteration: ``optimizer.zero_grad(); loss_fn(model, batch).backward(); optimizer.step()``;
    the engine's hooks do the rest (the cyclic learning rate, masks, tickets, and at the end the
    superposition, the prune back and BN re-estimation over ``bn_data``, default ``train_data``;
    ``inputs(batch)`` picks the model's input, default ``batch[0]``). In the base phase
    ``scheduler.step()`` follows every iteration (if given). The same recipe runs in
    ``fastsparse train``, the callbacks and any loop driving a :class:`fastsparse.Sparsifier`.

    ``train_data`` is iterated once per epoch and must have a length (steps per epoch).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        algorithm: SupTickets,
        train_data: Iterable,
        loss_fn: Callable[[nn.Module, Any], Tensor],
        epochs: int,
        *,
        scheduler: Any = None,
        bn_data: Iterable | None = None,
        inputs: Callable[[Any], Any] = inputs_of,
        seed: int = 0,
        keep_tickets: bool = False,
    ):
        if not isinstance(algorithm, SupTickets):
            raise TypeError(f"algorithm must be a SupTickets instance, got {algorithm!r}")
        spe = len(train_data)  # type: ignore[arg-type]
        if spe < 1:
            raise ValueError("train_data is empty")
        if algorithm.steps_per_epoch is not None and algorithm.steps_per_epoch != spe:
            raise ValueError(f"the algorithm counts {algorithm.steps_per_epoch} steps per epoch, "
                             f"train_data has {spe} batches")
        cyclic_plan(epochs, algorithm.cycle, algorithm.cycle_rate)   # checks the cycle against the budget first
        self.model, self.optimizer, self.algorithm = model, optimizer, algorithm
        self.train_data, self.loss_fn, self.epochs = train_data, loss_fn, int(epochs)
        self.scheduler, self.inputs = scheduler, inputs
        source = bn_data if bn_data is not None else train_data
        self.sparsifier = Sparsifier(model, optimizer, algorithm, total_steps=epochs * spe, seed=seed,
                                     steps_per_epoch=spe, data=lambda: ((inputs(b), None) for b in source))
        self.recipe: SupTicketsRecipe = self.sparsifier.groups[0].recipe
        self.recipe.keep_tickets = keep_tickets
        self.plan = self.recipe.plan
        self.lrs: list[float] = []

    @property
    def tickets(self) -> list[CheapTicket]:
        return self.recipe.tickets

    def fit(self) -> nn.Module:
        model, opt, engine = self.model, self.optimizer, self.sparsifier
        model.train()
        for _ in range(self.epochs):
            for batch in self.train_data:
                opt.zero_grad()
                self.loss_fn(model, batch).backward()
                in_base = self.plan.lr(engine.step_count) is None
                opt.step()   # the engine sets the cyclic learning rate before, and updates masks after
                self.lrs.append(float(engine.lr_used if engine.lr_used is not None else opt.param_groups[0]["lr"]))
                if in_base and self.scheduler is not None:
                    self.scheduler.step()
        return model
