"""The plan: which parameter gets which algorithm and target (the dry run), and
:func:`from_config`, the Python entry point from a config to an engine."""
from __future__ import annotations

import fnmatch
import inspect
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from pydantic import BaseModel
from torch import nn

from ...algorithms.base import SparsityAlgorithm, get_algorithm, list_algorithms
from ...core.distributions import resolve_sparsities
from ...core.masks import DENSE_NAME_PARTS, default_param_filter, select_params
from ...core.schedules import Constant, Cubic, Schedule
from .errors import ConfigError, Problem
from .keys import algorithm_parameters, algorithm_types, convert_nested, convert_value, nested_algorithm
from .load import load_yaml, parse_config, sparsity_blocks
from .schema import EXPERIMENT_ONLY, PASSED_AS_IS, RESERVED, ExperimentConfig, OverlaySpec, SparsityBlock

__all__ = ["ParamRow", "SparsityPlan", "plan_sparsity", "from_config"]


@dataclass
class ParamRow:
    """One parameter in the dry run."""

    name: str
    shape: tuple[int, ...]
    algorithm: str | None          # None: left dense
    target_sparsity: float         # at the end of training (0 for a dense parameter)
    block: str = ""                # config path of the block (or overlay) that sparsifies it
    note: str = ""                 # why it is dense, or what the overlay sets
    start_sparsity: float | None = None   # at the start, when it differs (gradual methods)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def target_density(self) -> float:
        return 1.0 - self.target_sparsity


@dataclass
class SparsityPlan:
    """Algorithms ready for :class:`fastsparse.Sparsifier`, and the dry-run table."""

    algorithms: list[SparsityAlgorithm]
    rows: list[ParamRow]
    notes: list[str] = field(default_factory=list)

    def target_sparsity(self) -> float:
        sparse = [r for r in self.rows if r.algorithm is not None]
        total = sum(r.numel for r in sparse)
        return sum(r.numel * r.target_sparsity for r in sparse) / total if total else 0.0


class _Names:
    """param_filter for an explicit set of parameter names."""

    def __init__(self, names: Sequence[str]):
        self.names = frozenset(names)

    def __call__(self, name: str, param, module) -> bool:
        return name in self.names

    def __repr__(self) -> str:
        return f"names({sorted(self.names)})"


class _SharedDistribution:
    """A block's distribution over all its parameters, restricted to one overlay group, so that
    overlays that change other settings keep the layer densities of the whole block."""

    def __init__(self, distribution: str, shapes: Sequence[tuple[int, ...]], indices: Sequence[int]):
        self.distribution, self.shapes, self.indices = distribution, list(shapes), list(indices)
        self.__name__ = f"{distribution} over the block"

    def __call__(self, params: Sequence, model_sparsity: float) -> list[float]:
        full = resolve_sparsities(self.distribution, self.shapes, model_sparsity)
        return [full[i] for i in self.indices]


def _dense_reason(name: str, param, module: nn.Module, explicit: bool) -> str:
    if param.dim() < 2:
        return "left dense: 1-D (bias, norm)"
    for part in DENSE_NAME_PARTS:
        if part in name.lower():
            return f"left dense: name contains {part!r}"
    if explicit:
        return "left dense: not matched by param_filter"
    if not default_param_filter(name, param, module):
        return "left dense: not a Linear/Conv/attention weight"
    return "left dense"


def _owner(model: nn.Module, name: str) -> nn.Module:
    module_name = name.rpartition(".")[0]
    return model.get_submodule(module_name) if module_name else model


def plan_sparsity(config: ExperimentConfig | dict | list, model: nn.Module) -> SparsityPlan:
    """Resolve the sparsity blocks against ``model``: filters, overlays, algorithm instances.

    Raises :class:`ConfigError` for filters or overlays that match nothing, blocks that
    claim the same parameter, and arguments
    the algorithm rejects. Changes nothing on the model.
    """
    if not isinstance(config, ExperimentConfig):
        raw = config if isinstance(config, dict) and not _looks_like_block(config) else {"sparsity": config}
        config, _ = parse_config(raw)
    problems: list[Problem] = []
    algorithms: list[SparsityAlgorithm] = []
    claimed: dict[str, tuple[str, ParamRow]] = {}
    blocks = sparsity_blocks(config)
    # explicit filters claim their parameters first; default-filter blocks take what is left
    order = sorted(range(len(blocks)), key=lambda i: blocks[i][1].param_filter is None)
    for i in order:
        path, block = blocks[i]
        try:
            selected = select_params(model, block.param_filter, block.exclude)
        except ValueError as e:
            problems.append(Problem(f"{path}.param_filter" if block.param_filter else path, str(e)))
            continue
        taken = [sp.name for sp in selected if sp.name in claimed]
        if block.param_filter is None:
            selected = [sp for sp in selected if sp.name not in claimed]
            if not selected:
                problems.append(Problem(path, "every parameter the default filter selects is already taken by "
                                              "another block; give this block a param_filter"))
                continue
        elif taken:
            problems.append(Problem(f"{path}.param_filter", f"selects {taken}, already sparsified by "
                                                            f"{claimed[taken[0]][0]}; blocks must not overlap"))
            continue
        block_algs, block_rows = _plan_block(path, block, selected, problems)
        algorithms += block_algs
        for row in block_rows:
            claimed[row.name] = (path, row)
    explicit = any(b.param_filter for _, b in blocks)
    rows = []
    for name, param in model.named_parameters():
        if name in claimed:
            rows.append(claimed[name][1])
        else:
            rows.append(ParamRow(name, tuple(param.shape), None, 0.0,
                                 note=_dense_reason(name, param, _owner(model, name), explicit)))
    if problems:
        raise ConfigError(problems)
    plan = SparsityPlan(algorithms, rows)
    if any(b.add_summaries for _, b in blocks):
        _log_summaries(plan)
    return plan


def _log_summaries(plan: SparsityPlan) -> None:
    """``add_summaries: true`` (Cerebras): log which weights are sparsified, at what density, and why
    the others stay dense (logger ``fastsparse.experiments.config``, level INFO)."""
    import logging

    log = logging.getLogger("fastsparse.config")
    for r in plan.rows:
        if r.algorithm is None:
            log.info("%s %s: dense (%s)", r.name, tuple(r.shape), r.note)
        else:
            log.info("%s %s: %s, target density %.4f (%s)", r.name, tuple(r.shape), r.algorithm,
                     r.target_density, r.block)




def _looks_like_block(d: dict) -> bool:
    """A sparsity block (``{algorithm: ..., sparsity: 0.9}``) rather than an experiment."""
    if "algorithm" in d:
        return True
    if set(d) & EXPERIMENT_ONLY:
        return False
    s = d.get("sparsity")
    return not (isinstance(s, list) or (isinstance(s, dict) and "type" not in s))


def _plan_block(path: str, block: SparsityBlock, selected,
                problems: list[Problem]) -> tuple[list[SparsityAlgorithm], list[ParamRow]]:
    names = [sp.name for sp in selected]
    shapes = [tuple(sp.param.shape) for sp in selected]
    groups: list[tuple[str, OverlaySpec | None, list[int]]] = []
    assigned: set[int] = set()
    for pattern, overlay in (block.param_filters or {}).items():
        where = f"{path}.param_filters[{json.dumps(pattern)}]"
        matches = [i for i, n in enumerate(names) if fnmatch.fnmatchcase(n, pattern)]
        fresh = [i for i in matches if i not in assigned]
        if not matches:
            problems.append(Problem(where, f"matches none of the parameters this block sparsifies: {names}"))
        elif not fresh:
            problems.append(Problem(where, "every parameter it matches is taken by an earlier pattern "
                                           "(the first matching pattern wins)"))
        else:
            groups.append((where, overlay, fresh))
            assigned.update(fresh)
    rest = [i for i in range(len(names)) if i not in assigned]
    if rest:
        groups.insert(0, (path, None, rest))
    algorithms, rows = [], []
    for where, overlay, idx in groups:
        settings = block.model_dump(exclude_none=True, exclude={"param_filter", "exclude", "param_filters"})
        specs = {key: getattr(block, key) for key in PASSED_AS_IS}
        if overlay is not None:
            settings.update(overlay.model_dump(exclude_none=True))
            specs.update({key: getattr(overlay, key) for key in PASSED_AS_IS if getattr(overlay, key) is not None})
        cls = get_algorithm(settings.pop("algorithm", block.algorithm))
        params, types = algorithm_parameters(cls), algorithm_types(cls)
        kwargs: dict[str, Any] = {}
        for key, value in settings.items():
            if key not in params or key in RESERVED:
                continue
            if key in PASSED_AS_IS:
                kwargs[key] = _build_value(specs[key])
            elif (inner := nested_algorithm(params, key, settings)) is not None and isinstance(value, dict):
                kwargs[key], extra = convert_nested(value, inner, f"{where}.{key}")
                problems.extend(extra)
            else:
                kwargs[key], extra = convert_value(value, params[key], types.get(key), f"{where}.{key}")
                problems.extend(extra)
        problem = _sparsity_schedule(kwargs, params, cls.name)
        if problem:
            problems.append(Problem(f"{where}.sparsity", problem))
            continue
        shared = len(groups) > 1 and not (overlay is not None and ({"sparsity", "distribution"} & overlay.model_fields_set))
        if shared and "distribution" in params:
            kwargs["distribution"] = _SharedDistribution(block.distribution or _default(params, "distribution"),
                                                        shapes, idx)
        kwargs["param_filter"] = _Names([names[i] for i in idx])
        try:
            alg = cls(**kwargs)
            sparsities = alg.initial_sparsities([selected[i] for i in idx])
        except (ValueError, TypeError) as e:
            if not any(p.path.startswith(where) for p in problems):
                problems.append(Problem(where, str(e)))
            continue
        algorithms.append(alg)
        note = ", ".join(f"{k}={v}" for k, v in (overlay.model_dump(exclude_none=True).items() if overlay else []))
        for i, s in zip(idx, sparsities):
            rows.append(ParamRow(names[i], shapes[i], alg.name, float(s), where, note))
    return algorithms, rows


def _sparsity_schedule(kwargs: dict[str, Any], params: dict[str, inspect.Parameter], name: str) -> str | None:
    """A sparsity schedule as the algorithm takes it: a constant is a number; the cubic form goes
    to a gradual method's ``initial_sparsity``, ``start``, ``end`` (GMP); any other schedule to an
    algorithm whose ``sparsity`` accepts one. Returns a problem, or None."""
    value = kwargs.get("sparsity")
    if not isinstance(value, Schedule):
        return None
    if isinstance(value, Constant):
        kwargs["sparsity"] = float(value.value)
        return None
    if isinstance(value, Cubic) and {"initial_sparsity", "start", "end"} <= set(params):
        kwargs.update(sparsity=value.final, initial_sparsity=value.init, start=value.start, end=value.end)
        return None
    if "Schedule" in str(params["sparsity"].annotation if "sparsity" in params else ""):
        return None
    gradual = [n for n in list_algorithms()
               if {"initial_sparsity", "start", "end"} <= set(algorithm_parameters(get_algorithm(n)))]
    hint = f"; the cubic form fits the gradual methods ({', '.join(gradual)})" if gradual else ""
    return f"{name} takes a constant sparsity, not a {type(value).__name__.lower()} schedule{hint}"


def _default(params: dict[str, inspect.Parameter], key: str) -> Any:
    p = params.get(key)
    return p.default if p is not None and p.default is not inspect.Parameter.empty else "uniform"


def _build_value(value: Any) -> Any:
    if isinstance(value, BaseModel) and hasattr(value, "build"):
        return value.build()
    return value


# --- the Python API -------------------------------------------------------------------------------
def from_config(model: nn.Module, optimizer: Any, config: str | Path | dict | list, *,
                total_steps: int | None = None, seed: int | None = None, **engine_kwargs: Any):
    """A :class:`fastsparse.Sparsifier` for ``model`` from a sparsity block, a list of blocks,
    an experiment dict (its ``sparsity``) or a YAML file::

        sparsifier = fastsparse.from_config(model, opt, {"algorithm": "rigl", "sparsity": 0.9,
                                                         "update": {"freq": 100, "stop": 0.75}},
                                            total_steps=10_000)

    ``engine_kwargs`` go to the engine (``data``, ``steps_per_epoch``, ``hook``, ``execution`` unless the
    experiment dict sets it, ...). The engine runs
    the whole method, its recipe included, or refuses it (:class:`fastsparse.EntryPointRefused`).
    """
    from ...engine.sparsifier import Sparsifier

    if isinstance(config, (str, Path)):
        config = load_yaml(config)
    if isinstance(config, list) or (isinstance(config, dict) and _looks_like_block(config)):
        config = {"sparsity": config}
    experiment, _ = parse_config(config)
    if experiment.sparsity is None:
        raise ConfigError([Problem("sparsity", "no sparsity block: nothing to sparsify")])
    if "execution" in experiment.model_fields_set:   # the config's own execution key, unless the caller's differs
        given = engine_kwargs.setdefault("execution", experiment.execution)
        if given != experiment.execution:
            raise ConfigError([Problem("execution", f"the config says {experiment.execution!r} and the caller "
                                                    f"execution={given!r}; keep one")])
    plan = plan_sparsity(experiment, model)
    return Sparsifier(model, optimizer, plan.algorithms, total_steps=total_steps,
                      seed=experiment.seed if seed is None else seed, **engine_kwargs)
