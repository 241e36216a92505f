"""The runner's side of a recipe: phases.

``fastsparse train`` trains in phases, each an ordinary loop over epochs (forward, loss,
backward, optimizer step, learning-rate schedule, metrics, checkpoints). Most methods have one
phase, the standard one, with the engine on the model. A method whose recipe runs its own
loop (a score search trains scores through another forward, then fine-tunes) gives the runner
its phases through ``Recipe.phases(algorithm, context)``; the runner drives them all the same
way, resumes inside any of them, and knows no method by name.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from torch import Tensor, nn

from ..core.schedules import Schedule

__all__ = ["RunContext", "Phase", "PhaseParts"]


@dataclass
class RunContext:
    """What the runner offers the phases of a recipe."""

    model: nn.Module
    seed: int
    epochs: int                                             # the config's epochs
    steps_per_epoch: int
    make_optimizer: Callable[..., Any]                      # (params, lr=None) -> the config's optimizer
    lr_schedule: Callable[[int], Schedule]                  # the config's schedule over n steps (a factor)
    evaluate: Callable[[nn.Module], tuple[float, float]]    # (loss, accuracy) on the test set
    save: Callable[[str, Any], None]                        # a file in the run folder (tensors, atomically)
    write_json: Callable[[str, Any], None]                  # a JSON file in the run folder
    train_inputs: Callable[[], Iterable[Tensor]]            # the training inputs, batch by batch


@dataclass
class PhaseParts:
    """What the standard loop needs to run a phase."""

    net: nn.Module                                          # called on each batch's inputs
    optimizer: Any
    schedule: Schedule                                      # learning-rate factor of the phase's steps
    sparsifier: Any = None                                  # the engine, when masks are trained
    extra_loss: Callable[[], Tensor] | None = None          # added to each batch's loss
    after_step: Callable[[], None] | None = None            # after each optimizer step
    after_epoch: Callable[[int], dict[str, Any]] | None = None   # epoch of the phase (1-based) -> metrics
    end: Callable[[], None] | None = None                   # when the phase's last epoch is done
    state: Callable[[], dict[str, Any]] = field(default=lambda: {})   # phase state for checkpoints


class Phase(ABC):
    """A stretch of training: ``name`` (in the metrics), ``epochs``, and :meth:`start`."""

    name = "train"
    epochs = 0

    @abstractmethod
    def start(self, ctx: RunContext, state: dict[str, Any] | None = None) -> PhaseParts:
        """Build the phase on ``ctx.model`` (``state``: the phase state of a checkpoint to resume
        from; the runner then loads the model, optimizer and schedule states)."""
