"""Sparsity methods, one small class each, and the registry that names them.

The classes decide masks; what a method does around its decisions is its recipe
(:mod:`fastsparse.recipes`), named by the class and run by the engine.
"""
from .base import (
    INIT_METHODS, MaskUpdate, Setup, SparsityAlgorithm, create, generator_for, get_algorithm, list_algorithms,
    register,
)
from .dst import DST, SET, SNFS, RigL, drop_and_grow, redistribute
from .gmp import GMP, GraNet, PruneAndGrowGlobal, PruneAndGrowUniform, PruneGlobal, PruneInit, PruneUniform
from .itop import ITOP, ITOP_presets
from .lottery import IMP
from .pai import (
    PaI, SNIP, GraSP, SynFlow, invert_scores, pai_masks, prune_at_init, reinit_weights, shuffle_masks,
    synflow_scores,
)
from .sparsify import Sparsify
from .suptickets import CyclePlan, SupTickets, cyclic_plan
from .gems import EdgePopup, GemMiner, ScoreSearch

Static = SparsityAlgorithm

__all__ = [
    "SparsityAlgorithm", "Static", "Setup", "MaskUpdate", "DST", "SET", "SNFS", "RigL", "drop_and_grow",
    "redistribute", "register", "create", "list_algorithms", "get_algorithm", "generator_for", "INIT_METHODS",
    "GMP", "GraNet", "PruneInit", "PruneUniform", "PruneGlobal", "PruneAndGrowUniform", "PruneAndGrowGlobal",
    "ITOP", "ITOP_presets", "IMP",
    "PaI", "SNIP", "GraSP", "SynFlow", "prune_at_init", "pai_masks", "synflow_scores",
    "shuffle_masks", "invert_scores", "reinit_weights",
    "Sparsify", "SupTickets", "CyclePlan", "cyclic_plan", "EdgePopup", "GemMiner", "ScoreSearch",
]
