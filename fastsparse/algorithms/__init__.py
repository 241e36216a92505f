"""Sparsity methods, one small class each, and the registry that names them."""
from .base import (
    INIT_METHODS, SparsityAlgorithm, create, generator_for, get_algorithm, list_algorithms, register,
)
from .dst import DST, SET, SNFS, RigL, drop_and_grow, redistribute
from .gmp import GMP, GraNet, PruneAndGrowGlobal, PruneAndGrowUniform, PruneGlobal, PruneInit, PruneUniform
from .lottery import IMP, Ticket, find_ticket, restore_state, snapshot_state
from .pai import (
    PaI, SNIP, GraSP, SynFlow, invert_scores, pai_masks, prune_at_init, reinit_weights, shuffle_masks,
    synflow_scores,
)
from .sparsify import Sparsify, SparsifyScheduler

Static = SparsityAlgorithm

__all__ = [
    "SparsityAlgorithm", "Static", "DST", "SET", "SNFS", "RigL", "drop_and_grow", "redistribute",
    "register", "create", "list_algorithms", "get_algorithm", "generator_for", "INIT_METHODS",
    "GMP", "GraNet", "PruneInit", "PruneUniform", "PruneGlobal", "PruneAndGrowUniform", "PruneAndGrowGlobal",
    "IMP", "Ticket", "find_ticket", "snapshot_state", "restore_state",
    "PaI", "SNIP", "GraSP", "SynFlow", "prune_at_init", "pai_masks", "synflow_scores",
    "shuffle_masks", "invert_scores", "reinit_weights",
    "Sparsify", "SparsifyScheduler",
]

from .suptickets import CyclePlan, SupTickets, SupTicketsTrainer, cyclic_lr, cyclic_plan, superpose  # noqa: E402
from .gems import EdgePopup, GemMiner, ScoredModel, finetune, search  # noqa: E402

__all__ += ["SupTickets", "SupTicketsTrainer", "CyclePlan", "cyclic_lr", "cyclic_plan", "superpose",
            "EdgePopup", "GemMiner", "ScoredModel", "search", "finetune"]
