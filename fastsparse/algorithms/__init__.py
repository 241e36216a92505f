"""Sparsity methods, one small class each, and the registry that names them."""
from .base import (
    INIT_METHODS, SparsityAlgorithm, create, generator_for, get_algorithm, list_algorithms, register,
)
from .dst import DST, SET, SNFS, RigL, drop_and_grow, redistribute

Static = SparsityAlgorithm

__all__ = [
    "SparsityAlgorithm", "Static", "DST", "SET", "SNFS", "RigL", "drop_and_grow", "redistribute",
    "register", "create", "list_algorithms", "get_algorithm", "generator_for", "INIT_METHODS",
]
