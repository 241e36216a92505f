"""fastsparse: train sparse neural networks in PyTorch.

    import fastsparse as sparse
    hooks = sparse.sparsify_model(model, model_sparsity=0.9, sparse_f=sparse.erdos_renyi_sparsity)
    opt = sparse.DynamicSparseTrainingOptimizerWrapper(model, opt, **sparse.RigL_presets, batches_per_update=50)
"""
from .algorithms import (
    DST, SET, SNFS, MaskUpdate, RigL, Setup, SparsityAlgorithm, Static, create, drop_and_grow, generator_for,
    get_algorithm, list_algorithms, redistribute, register,
)
from .engine.handle import SparseHandle, sparsify_model
from .core.distributions import erdos_renyi_sparsity, first_layer_dense_uniform, uniform_sparsity
from .core.masks import (
    SparseParam, apply_masks, default_param_filter, global_topk_masks, select_params,
    sparse_params, topk_mask,
)
from .engine.optim import DynamicSparseTrainingOptimizerWrapper, RigL_presets, SET_presets, SNFS_presets
from .core.schedules import (
    Clock, Constant, Cosine, Cubic, Cyclic, Exponential, Linear, Power, UpdateSchedule,
)
from .core.scores import gradient_magnitude, gradient_momentum, random_score, weight_magnitude
from .engine.sparsifier import Sparsifier
from .engine.distributed import MaskDisagreement
from .engine.recipe import EntryPointRefused, Recipe
from .algorithms import (
    GMP, IMP, SNIP, GraNet, GraSP, PaI, PruneAndGrowGlobal, PruneAndGrowUniform, PruneGlobal,
    PruneUniform, Sparsify, SynFlow, invert_scores, prune_at_init, reinit_weights, shuffle_masks,
)
from .recipes import SparsifyScheduler, Ticket, find_ticket
from .core.scores import CRITERIA
from .core.schedules import ProgressSchedule
from .core.structured import nm_mask, prune_masks, select_masks, valid_granularities

__version__ = "0.1.0"

__all__ = [
    "sparsify_model", "SparseHandle", "sparse_params", "select_params", "default_param_filter",
    "apply_masks", "topk_mask", "global_topk_masks", "SparseParam",
    "uniform_sparsity", "erdos_renyi_sparsity", "first_layer_dense_uniform",
    "weight_magnitude", "random_score", "gradient_magnitude", "gradient_momentum",
    "SET_presets", "SNFS_presets", "RigL_presets", "DynamicSparseTrainingOptimizerWrapper",
    "Sparsifier", "SparsityAlgorithm", "Static", "DST", "SET", "SNFS", "RigL",
    "drop_and_grow", "redistribute", "register", "create", "list_algorithms", "get_algorithm", "generator_for",
    "Setup", "MaskUpdate",
    "Clock", "Constant", "Linear", "Exponential", "Power", "Cosine", "Cubic", "Cyclic", "UpdateSchedule",
    "MaskDisagreement", "EntryPointRefused", "Recipe",
    "GMP", "GraNet", "PruneUniform", "PruneGlobal", "PruneAndGrowUniform", "PruneAndGrowGlobal",
    "IMP", "Ticket", "find_ticket", "Sparsify", "SparsifyScheduler", "ProgressSchedule", "CRITERIA",
    "PaI", "SNIP", "GraSP", "SynFlow", "prune_at_init", "shuffle_masks", "invert_scores", "reinit_weights",
    "select_masks", "prune_masks", "nm_mask", "valid_granularities",
]

from .algorithms import EdgePopup, GemMiner, SupTickets  # noqa: E402
from .algorithms.itop import ITOP, ITOP_presets  # noqa: E402
from .recipes import SupTicketsTrainer  # noqa: E402

__all__ += ["ITOP", "ITOP_presets", "SupTickets", "SupTicketsTrainer", "EdgePopup", "GemMiner"]

from .experiments.models import create_model, list_models  # noqa: E402
from .core.flops import forward_flops, training_flops  # noqa: E402
from .deploy import load_sparse, plan_inference, read_sparse, save_sparse, size_report, to_inference  # noqa: E402

__all__ += ["save_sparse", "load_sparse", "read_sparse", "size_report", "to_inference", "plan_inference"]


def from_config(model, optimizer, config, **kwargs):
    """Build a :class:`Sparsifier` from a config dict, a list of blocks or a YAML path
    (needs the ``cli`` extra: pydantic and pyyaml are imported here, not by the core)."""
    from .experiments.config import from_config as build

    return build(model, optimizer, config, **kwargs)


__all__ += ["from_config", "create_model", "list_models", "forward_flops", "training_flops"]

# The fastai, Lightning and Trainer callbacks are stand-ins that import their framework on first use,
# so `import fastsparse` and `from fastsparse import *` work without either installed.
__all__ += ["DynamicSparseTrainingCallback", "SparsifyCallback", "SparseLightningCallback", "SparseTrainerCallback"]


def __getattr__(name: str):
    from .integrations import LAZY_NAMES, LazyClass

    if name in LAZY_NAMES:
        module, extra = LAZY_NAMES[name]
        value = globals()[name] = LazyClass(name, module, extra)
        return value
    raise AttributeError(f"module 'fastsparse' has no attribute {name!r}")
