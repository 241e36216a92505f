"""The YAML/dict config of an experiment and of its ``sparsity`` block, and the dry run.

Modelled on the Cerebras sparsity config::

    sparsity:
      algorithm: rigl            # any registered name (a user's registered class too)
      sparsity: 0.9              # or a schedule {type: constant|linear|exp|power|cosine|cycling|cubic, ...}
      distribution: erk          # uniform | er | erk | first_layer_dense
      init_method: random        # random | topk | from_zeros
      param_filter: ["*.weight"] # globs; default: weights of Linear/Conv/attention, no embedding/norm/lm_head
      update: {freq: 100, start: 0, stop: 0.75}   # or {steps: [...]} or a list of steps
      drop_fraction: 0.3         # a key of the algorithm: any keyword argument of its constructor
      param_filters:             # overlays, pattern -> overrides; first match wins
        "*attn.[qkv].weight": {balance_out_groups: 4}

A list of blocks gives different algorithms to different parameters. The block's schema holds
only the keys every algorithm shares (:mod:`.schema`); every other key is a keyword argument of
the algorithm's constructor, validated against its annotated type (:mod:`.keys`), so a newly
registered algorithm validates with its own arguments. Every problem is reported at once, each
with its path (``sparsity[1].update.freq: must be ≥ 1``).

Flow: :func:`load_config` (file or dict, ``--set`` overrides) → :func:`parse_config`
(types, names, keys) → :func:`plan_sparsity` (against a model: filters, overlays, groups;
the dry run) → :func:`from_config` or :func:`fastsparse.experiments.runner.run`.
"""
from .errors import ConfigError, Problem, format_path, problem_at, problems_of, suggest
from .keys import algorithm_parameters, algorithm_types, component_parameters
from .load import apply_overrides, config_hash, load_config, load_yaml, parse_config, resolve_config, sparsity_blocks
from .plan import ParamRow, SparsityPlan, from_config, plan_sparsity
from .schema import (
    DataSpec, ExperimentConfig, LRScheduleSpec, ModelSpec, OptimizerSpec, OverlaySpec, SparsityBlock,
)
from .specs import SCHEDULE_TYPES, ScheduleSpec, UpdateSpec

__all__ = [
    "Problem", "ConfigError", "format_path", "suggest", "problems_of", "problem_at", "ExperimentConfig", "SparsityBlock",
    "OverlaySpec", "DataSpec", "ModelSpec", "OptimizerSpec", "LRScheduleSpec", "UpdateSpec", "ScheduleSpec",
    "SCHEDULE_TYPES", "load_config", "load_yaml", "apply_overrides", "parse_config", "resolve_config",
    "config_hash", "sparsity_blocks", "plan_sparsity", "SparsityPlan", "ParamRow", "from_config",
    "algorithm_parameters", "algorithm_types", "component_parameters",
]
