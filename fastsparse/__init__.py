"""fastsparse: train sparse neural networks in PyTorch.

    import fastsparse as sparse
    hooks = sparse.sparsify_model(model, model_sparsity=0.9, sparse_f=sparse.erdos_renyi_sparsity)
    opt = sparse.DynamicSparseTrainingOptimizerWrapper(model, opt, **sparse.RigL_presets, batches_per_update=50)
"""
from .algorithms import (
    DST, SET, SNFS, RigL, SparsityAlgorithm, Static, create, drop_and_grow, get_algorithm,
    list_algorithms, redistribute, register,
)
from .api import SparseHandle, sparsify_model
from .distributions import erdos_renyi_sparsity, first_layer_dense_uniform, uniform_sparsity
from .masks import (
    SparseParam, apply_masks, default_param_filter, global_topk_masks, select_params,
    sparse_params, topk_mask,
)
from .optim import DynamicSparseTrainingOptimizerWrapper, RigL_presets, SET_presets, SNFS_presets
from .schedules import (
    Clock, Constant, Cosine, Cubic, Cyclic, Exponential, Linear, Power, UpdateSchedule,
)
from .scores import gradient_magnitude, gradient_momentum, random_score, weight_magnitude
from .sparsifier import Sparsifier
from ._distributed import MaskDisagreement

__version__ = "0.1.0"

__all__ = [
    "sparsify_model", "SparseHandle", "sparse_params", "select_params", "default_param_filter",
    "apply_masks", "topk_mask", "global_topk_masks", "SparseParam",
    "uniform_sparsity", "erdos_renyi_sparsity", "first_layer_dense_uniform",
    "weight_magnitude", "random_score", "gradient_magnitude", "gradient_momentum",
    "SET_presets", "SNFS_presets", "RigL_presets", "DynamicSparseTrainingOptimizerWrapper",
    "Sparsifier", "SparsityAlgorithm", "Static", "DST", "SET", "SNFS", "RigL",
    "drop_and_grow", "redistribute", "register", "create", "list_algorithms", "get_algorithm",
    "Clock", "Constant", "Linear", "Exponential", "Power", "Cosine", "Cubic", "Cyclic", "UpdateSchedule",
    "MaskDisagreement",
]
