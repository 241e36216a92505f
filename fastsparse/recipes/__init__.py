"""What methods do around their mask decisions, and the drivers that run a method on its own.

* :mod:`~fastsparse.recipes.lottery`: IMP's rewinding and per-level learning rates
  (:class:`IMPRecipe`); :func:`find_ticket`, one training per level.
* :mod:`~fastsparse.recipes.sparsify`: fasterai's in-fit lottery tickets (:class:`SparsifyRecipe`)
  and :class:`SparsifyScheduler`, its callback for a plain loop.
* :mod:`~fastsparse.recipes.suptickets`: Sup-tickets' cycles, tickets and superposition
  (:class:`SupTicketsRecipe`) and :class:`SupTicketsTrainer`.
* :mod:`~fastsparse.recipes.score_search`: edge-popup and GEM-MINER's search and fine-tuning
  (:func:`search`, :func:`finetune`, and the phases of ``fastsparse train``).

The contract is :class:`fastsparse.engine.recipe.Recipe`; the runner's side, :mod:`.base`.
"""
from .base import Phase, PhaseParts, RunContext
from .lottery import IMPRecipe, Ticket, find_ticket
from .score_search import ScoredModel, ScoreSearchRecipe, finetune, sanity_variants, search
from .sparsify import SparsifyRecipe, SparsifyScheduler
from .suptickets import CheapTicket, SupTicketsRecipe, SupTicketsTrainer, Superposer, superpose

__all__ = [
    "Phase", "PhaseParts", "RunContext", "IMPRecipe", "Ticket", "find_ticket", "ScoredModel", "ScoreSearchRecipe",
    "finetune", "sanity_variants", "search", "SparsifyRecipe", "SparsifyScheduler", "CheapTicket",
    "SupTicketsRecipe", "SupTicketsTrainer", "Superposer", "superpose",
]
