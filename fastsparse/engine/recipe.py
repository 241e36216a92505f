"""Recipes: what a method does around its mask decisions, run by the engine at fixed points.

An algorithm decides masks; its recipe does the rest of the method (set the learning rate of
some steps, save tickets, rewind weights, superpose, re-estimate BatchNorm). The engine owns one
recipe per algorithm that names one (``SparsityAlgorithm.recipe``), so every entry point that
drives the engine (a plain loop, the seed wrapper, fastai, Lightning, ``from_config``, the CLI)
runs the whole method. What an entry point cannot host is refused with
:class:`EntryPointRefused` before anything changes, with what to use instead.

The points, within one optimizer step::

    before_step()        learning_rate(step): the recipe's learning rate for the coming step
                         (the engine's optimizer pre-step hook, or the callback's before-step)
    optimizer.step()
    engine.step():       masks re-applied, clock advanced
                         on_step(clock)            (before mask updates: save a ticket, snapshot)
                         mask updates, installed
                         after_update(clock)       (this group's masks changed: rewind, reset)
                         finish()                  once, at the last step of training

A recipe that cannot run inside someone else's loop at all (a score search trains other
parameters through another forward) sets ``own_loop`` to the sentence that says what to use
instead, and offers :meth:`phases` to the runner of ``fastsparse train``.
"""
from __future__ import annotations

import importlib
from typing import Any, ClassVar, Sequence

from ..algorithms.base import SparsityAlgorithm
from ..core.masks import SparseParam
from ..core.schedules import Clock

__all__ = ["Recipe", "EntryPointRefused", "recipe_class"]


class EntryPointRefused(ValueError):
    """This entry point cannot run the whole method; the message says what to use instead."""


class Recipe:
    """Base recipe: does nothing around the decisions. Subclasses override the hooks they need.

    ``algorithm``: the method; ``params``: its sparse parameters; ``engine``: the
    :class:`fastsparse.Sparsifier` that runs it (its model, optimizer, data, clock).
    """

    # set to a sentence (what to use instead) when the method cannot run in someone else's loop
    own_loop: ClassVar[str | None] = None
    # the recipe sets the learning rate of some steps (so the driver must call before_step)
    owns_lr: ClassVar[bool] = False
    # the recipe acts on the whole model (learning rate, superposition): the only group of its engine
    exclusive: ClassVar[bool] = False
    # what finish() makes of the model, for the run's records ("superposed"); None: nothing
    finish_label: ClassVar[str | None] = None

    def __init__(self, algorithm: SparsityAlgorithm, params: Sequence[SparseParam], engine: Any):
        self.algorithm, self.params, self.engine = algorithm, list(params), engine

    # --- before anything changes -----------------------------------------------------------------
    def check(self) -> None:
        """Raise (:class:`EntryPointRefused` or ValueError) if this engine cannot host the method;
        called before any mask is attached."""

    def schedule_steps(self, total_steps: int) -> int:
        """Steps of one pass of the learning-rate schedule (IMP: one level); the whole run by default."""
        return total_steps

    # --- the points of a step --------------------------------------------------------------------
    def attached(self) -> None:
        """The masks are attached (step 0)."""

    def learning_rate(self, step: int) -> float | None:
        """The learning rate of the step that follows ``step`` steps done, or None (the loop's own)."""
        return None

    def on_step(self, clock: Clock) -> None:
        """After the masks are re-applied at ``clock``, before this step's mask updates."""

    def after_update(self, clock: Clock) -> None:
        """This group's masks changed at ``clock`` (installed, weights masked)."""

    def finish(self) -> None:
        """The end of training (called once by the engine)."""

    # --- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    # --- the runner's phases (own-loop methods) --------------------------------------------------
    @classmethod
    def phases(cls, algorithm: SparsityAlgorithm, context: Any) -> list[Any] | None:
        """The phases ``fastsparse train`` runs instead of its single training phase (None: the
        standard phase). See :mod:`fastsparse.recipes.base`."""
        return None


def recipe_class(algorithm: SparsityAlgorithm) -> type[Recipe] | None:
    """The recipe class an algorithm names (a class, or ``"module:Class"`` imported here)."""
    spec = getattr(algorithm, "recipe", None)
    if spec is None:
        return None
    if isinstance(spec, str):
        module, _, name = spec.partition(":")
        spec = getattr(importlib.import_module(module), name)
    if not (isinstance(spec, type) and issubclass(spec, Recipe)):
        raise TypeError(f"{algorithm.name}.recipe must name a Recipe subclass, got {spec!r}")
    return spec
