"""The YAML/dict schema of an experiment and of its ``sparsity`` block, and the dry run.

Modelled on the Cerebras sparsity config::

    sparsity:
      algorithm: rigl            # any registered name (a user's registered class too)
      sparsity: 0.9              # or a schedule {type: constant|linear|exp|power|cosine|cycling|cubic, ...}
      distribution: erk          # uniform | er | erk | first_layer_dense
      init_method: random        # random | topk | from_zeros
      param_filter: ["*.weight"] # globs; default: weights of Linear/Conv/attention, no embedding/norm/lm_head
      update: {freq: 100, start: 0, stop: 0.75}   # or {steps: [...]} or a list of steps
      drop_fraction: 0.3         # or any schedule
      param_filters:             # overlays, pattern -> overrides; first match wins
        "*attn.[qkv].weight": {balance_out_groups: 4}

A list of blocks gives different algorithms to different parameters. Keys beyond the
schema's are checked against the algorithm's constructor (``inspect.signature``), so a
newly registered algorithm validates with its own arguments. Every problem is reported
at once, each with its path (``sparsity[1].update.freq: must be ≥ 1``).

Flow: :func:`load_config` (file or dict, ``--set`` overrides) → :func:`parse_config`
(types, names, keys) → :func:`plan_sparsity` (against a model: filters, overlays, groups;
the dry run) → :func:`from_config` or :func:`fastsparse.experiments.runner.run`.
"""
from __future__ import annotations

import copy
import difflib
import fnmatch
import inspect
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Sequence, Union

from pydantic import (
    BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, TypeAdapter, ValidationError,
    field_validator, model_validator,
)
from torch import nn

from ...algorithms.base import SparsityAlgorithm, get_algorithm, list_algorithms
from ...core.distributions import DISTRIBUTIONS, resolve_sparsities
from ...core.masks import _DENSE_NAME_PARTS, default_param_filter, select_params
from ...core.schedules import Constant, Cosine, Cubic, Cyclic, Exponential, Linear, Power, Schedule, UpdateSchedule

__all__ = [
    "Problem", "ConfigError", "ExperimentConfig", "SparsityBlock", "UpdateSpec", "SCHEDULE_TYPES",
    "load_config", "load_yaml", "apply_overrides", "parse_config", "resolve_config", "config_hash",
    "sparsity_blocks", "plan_sparsity", "SparsityPlan", "ParamRow", "from_config", "algorithm_parameters",
    "SuiteSpec", "load_suite", "DIGITS_BASE", "SUITE_BLOCK",
]


# --- problems ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config, at ``path`` (``sparsity[1].update.freq``)."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(ValueError):
    """Every problem found in a config; ``str()`` lists them one per line."""

    def __init__(self, problems: Sequence[Problem | str], source: str | None = None):
        self.problems = [p if isinstance(p, Problem) else Problem("", str(p)) for p in problems]
        self.source = source
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f" in {self.source}" if self.source else ""
        n = len(self.problems)
        head = f"{n} problem{'s' if n != 1 else ''}{where}:"
        return "\n".join([head] + [f"  {p}" for p in self.problems])


def format_path(loc: Sequence[Any]) -> str:
    """('sparsity', 1, 'update', 'freq') -> 'sparsity[1].update.freq'; tags (§...) are dropped."""
    out = ""
    for part in loc:
        if isinstance(part, str) and part.startswith("§"):
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and part.isidentifier():
            out += f".{part}" if out else part
        else:
            out += f"[{json.dumps(str(part))}]"
    return out


def _suggest(word: str, vocabulary: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(word), list(vocabulary), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _message(err: dict[str, Any]) -> str:
    """A pydantic error as a sentence a user can act on."""
    kind, ctx, given = err["type"], err.get("ctx") or {}, err.get("input")
    got = f", got {given!r}" if not isinstance(given, (dict, list)) else ""
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        return "unknown key" + _suggest(err["loc"][-1], _VOCABULARY)
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"must be an integer{got}"
    if kind in ("float_type", "float_parsing"):
        return f"must be a number{got}"
    if kind in ("bool_type", "bool_parsing"):
        return f"must be true or false{got}"
    if kind == "string_type":
        return f"must be a string{got}"
    if kind in ("list_type", "tuple_type"):
        return f"must be a list{got}"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"must be a mapping (key: value){got}"
    if kind in ("greater_than_equal", "greater_than", "less_than", "less_than_equal"):
        op, key = {"greater_than_equal": ("≥", "ge"), "greater_than": (">", "gt"),
                   "less_than": ("<", "lt"), "less_than_equal": ("≤", "le")}[kind]
        return f"must be {op} {ctx[key]}{got}"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}{got}" + (_suggest(given, _literal_words(ctx)) if isinstance(given, str) else "")
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    if kind in ("number_or_schedule", "sparsity_type"):
        return f"{err['msg']}{got}"
    if kind == "schedule_type":
        t = given.get("type") if isinstance(given, dict) else None
        head = f"unknown schedule type {t!r}{_suggest(t, SCHEDULE_TYPES)}" if t is not None else "a schedule needs a 'type'"
        return f"{head}; valid types: {list(SCHEDULE_TYPES)}"
    return err["msg"]


def _literal_words(ctx: dict[str, Any]) -> list[str]:
    return [w.strip(" '\"") for w in str(ctx.get("expected", "")).replace(" or ", ",").split(",")]


def _join(prefix: str, loc: Sequence[Any]) -> str:
    rest = format_path(loc)
    if not prefix or not rest:
        return prefix or rest
    return prefix + rest if rest.startswith("[") else f"{prefix}.{rest}"


def _problems(e: ValidationError, prefix: str = "") -> list[Problem]:
    return [Problem(_join(prefix, err["loc"]), _message(err)) for err in e.errors()]


# --- schedules --------------------------------------------------------------------------------
def _when(v: Any) -> Any:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and math.isnan(v)):
        raise ValueError(f"must be a step (an integer) or a fraction of training (a number in [0, 1]), got {v!r}")
    if v < 0:
        raise ValueError(f"must be ≥ 0, got {v!r}")
    return v


When = Annotated[Union[int, float], BeforeValidator(_when)]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ConstantSpec(_Spec):
    """value."""

    type: Literal["constant"]
    value: float

    def build(self) -> Schedule:
        return Constant(self.value)


class LinearSpec(_Spec):
    """init + slope · step; or from init at ``start`` to ``final`` at ``end``."""

    type: Literal["linear"]
    init: float
    slope: float = 0.0
    final: float | None = None
    start: When = 0
    end: When | None = None

    def build(self) -> Schedule:
        return Linear(self.init, self.slope, self.final, self.start, self.end)


class ExpSpec(_Spec):
    """final + (init − final) · gamma^step."""

    type: Literal["exp", "exponential"]
    init: float
    gamma: float = Field(gt=0)
    final: float = 0.0

    def build(self) -> Schedule:
        return Exponential(self.init, self.gamma, self.final)


class PowerSpec(_Spec):
    """init · (step + 1)^beta."""

    type: Literal["power"]
    init: float
    beta: float

    def build(self) -> Schedule:
        return Power(self.init, self.beta)


class CosineSpec(_Spec):
    """minimum + (init − minimum)/2 · (1 + cos(π t / half_period))."""

    type: Literal["cosine"]
    init: float
    half_period: When = 1.0
    minimum: float = 0.0

    def build(self) -> Schedule:
        return Cosine(self.init, self.half_period, self.minimum)


class CubicSpec(_Spec):
    """Zhu & Gupta: final + (init − final) · (1 − (t − start)/(end − start))³."""

    type: Literal["cubic", "gmp"]
    init: float = 0.0
    final: float
    start: When = 0
    end: When = 1.0

    def build(self) -> Schedule:
        return Cubic(self.init, self.final, self.start, self.end)


class CyclingSpec(_Spec):
    """A triangle between low and high with a period of ``period`` steps."""

    type: Literal["cycling", "cyclic"]
    low: float
    high: float
    period: int = Field(ge=1)

    def build(self) -> Schedule:
        return Cyclic(self.low, self.high, self.period)


_SCHEDULE_SPECS = {"constant": ConstantSpec, "linear": LinearSpec, "exp": ExpSpec, "power": PowerSpec,
                   "cosine": CosineSpec, "cubic": CubicSpec, "cycling": CyclingSpec}
_SCHEDULE_ALIASES = {"exponential": "exp", "cyclic": "cycling", "gmp": "cubic"}
SCHEDULE_TYPES = tuple(_SCHEDULE_SPECS)
_LEVEL_FIELDS = ("value", "init", "final", "minimum", "low", "high")


def _schedule_tag(v: Any) -> str | None:
    t = v.get("type") if isinstance(v, dict) else getattr(v, "type", None)
    t = _SCHEDULE_ALIASES.get(str(t).lower(), str(t).lower()) if t is not None else None
    return f"§{t}" if t in _SCHEDULE_SPECS else None


ScheduleSpec = Annotated[
    Union[tuple(Annotated[cls, Tag(f"§{name}")] for name, cls in _SCHEDULE_SPECS.items())],
    Discriminator(_schedule_tag, custom_error_type="schedule_type", custom_error_message="unknown schedule type"),
]


def _number_or_schedule(v: Any) -> str | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return "§number"
    return "§schedule" if isinstance(v, (dict, BaseModel)) else None


NumberOrSchedule = Annotated[
    Union[Annotated[float, Tag("§number")], Annotated[ScheduleSpec, Tag("§schedule")]],
    Discriminator(_number_or_schedule, custom_error_type="number_or_schedule",
                  custom_error_message="must be a number or a schedule {type: constant|linear|exp|power|cosine|"
                                       "cubic|cycling, ...}"),
]


def _check_levels(value: Any, low: float, high: float, closed: bool, what: str) -> Any:
    """A number (or each level of a schedule) within [low, high) or [low, high]."""
    def bad(x: float) -> bool:
        return math.isnan(x) or x < low or (x > high if closed else x >= high)

    interval = f"[{low:g}, {high:g}{']' if closed else ')'}"
    if isinstance(value, (int, float)):
        if bad(float(value)):
            hint = " (0 = dense, 0.9 = 90% zeros)" if what == "sparsity" else ""
            raise ValueError(f"{what} must be in {interval}{hint}, got {value}")
    elif isinstance(value, BaseModel):
        for name in _LEVEL_FIELDS:
            x = getattr(value, name, None)
            if x is not None and bad(float(x)):
                raise ValueError(f"the schedule's {name} is a {what} and must be in {interval}, got {x}")
    return value


# --- update -----------------------------------------------------------------------------------
class UpdateSpec(_Spec):
    """When masks change: every ``freq`` steps from ``start`` while before ``stop``, or at ``steps``.
    ``start``/``stop``: a step (integer) or a fraction of training (a float in [0, 1])."""

    freq: int = Field(100, ge=1)
    start: When = 0
    stop: When | None = None
    steps: list[Annotated[int, Field(ge=1)]] | None = None

    def build(self) -> UpdateSchedule:
        return UpdateSchedule(freq=self.freq, start=self.start, stop=self.stop, steps=self.steps)


def _update_before(v: Any) -> Any:
    return {"steps": v} if isinstance(v, (list, tuple)) else v


# --- the sparsity block -----------------------------------------------------------------------
def _globs(v: Any) -> Any:
    return [v] if isinstance(v, str) else v


class _BlockFields(BaseModel):
    """What a block and an overlay share. Other keys go to the algorithm's constructor."""

    model_config = ConfigDict(extra="allow")

    sparsity: NumberOrSchedule | None = None
    distribution: str | None = None
    init_method: Literal["random", "topk", "from_zeros"] | None = None
    update: Annotated[UpdateSpec | None, BeforeValidator(_update_before)] = None
    drop_fraction: NumberOrSchedule | None = None
    balance_out_groups: int | None = Field(None, ge=1)
    balance_in_groups: int | None = Field(None, ge=1)
    add_summaries: bool | None = None

    @field_validator("sparsity")
    @classmethod
    def _sparsity_range(cls, v):
        return _check_levels(v, 0.0, 1.0, False, "sparsity")

    @field_validator("drop_fraction")
    @classmethod
    def _drop_range(cls, v):
        return _check_levels(v, 0.0, 1.0, True, "drop_fraction")

    @field_validator("distribution")
    @classmethod
    def _known_distribution(cls, v):
        if v is not None and v.lower() not in DISTRIBUTIONS:
            raise ValueError(f"unknown distribution {v!r}{_suggest(v.lower(), DISTRIBUTIONS)}; "
                             f"valid: {sorted(DISTRIBUTIONS)}")
        return v

    @model_validator(mode="after")
    def _one_balance(self):
        if self.balance_out_groups is not None and self.balance_in_groups is not None:
            raise ValueError("give balance_out_groups or balance_in_groups, not both")
        return self


# Cerebras's older spellings of block keys (the R1.x sparsity optimizer): ``type`` for
# ``algorithm``, ``schedule`` (a mapping or a list of steps) for ``update``.
_BLOCK_ALIASES = {"type": "algorithm", "schedule": "update"}


def _cerebras_spellings(raw: dict[str, Any]) -> tuple[dict[str, Any], list[Problem]]:
    """The config with ``type``/``schedule`` in sparsity blocks renamed; a key given under both
    spellings is a problem. The input is not modified."""
    blocks = _raw_blocks(raw)
    if not any(alias in b for _, b in blocks for alias in _BLOCK_ALIASES):
        return raw, []
    raw = copy.deepcopy(raw)
    problems = []
    for path, _ in _raw_blocks(raw):
        block = raw["sparsity"] if len(path) == 1 else raw["sparsity"][path[1]]
        for alias, key in _BLOCK_ALIASES.items():
            # a schedule name (fasterai's sparsify takes ``schedule: iterative``) is not an update
            if alias not in block or (alias == "schedule" and not isinstance(block[alias], (dict, list))):
                continue
            if key in block:
                problems.append(Problem(format_path(path + (alias,)),
                                        f"{alias!r} is Cerebras's spelling of {key!r}, which is given too; keep one"))
            else:
                block[key] = block.pop(alias)
    return raw, problems


def _known_algorithm(v: Any) -> Any:
    if isinstance(v, str):
        try:
            get_algorithm(v)
        except ValueError as e:
            hint = " (for dense training, leave out the sparsity block)" if v.lower() == "dense" else ""
            raise ValueError(f"{e}{hint}") from None
        return v.lower()
    return v


class OverlaySpec(_BlockFields):
    """Overrides for the parameters one ``param_filters`` pattern matches."""

    algorithm: Annotated[str | None, BeforeValidator(_known_algorithm)] = None


class SparsityBlock(_BlockFields):
    """One algorithm (and its overlays) over the parameters its filter selects."""

    algorithm: Annotated[str, BeforeValidator(_known_algorithm)] = "static"
    param_filter: Annotated[list[str] | None, BeforeValidator(_globs)] = None
    exclude: Annotated[list[str] | None, BeforeValidator(_globs)] = None
    param_filters: dict[str, OverlaySpec] | None = None


def _block_or_list(v: Any) -> str | None:
    if isinstance(v, (dict, BaseModel)):
        return "§block"
    return "§list" if isinstance(v, list) else None


SparsityField = Annotated[
    Union[Annotated[SparsityBlock, Tag("§block")], Annotated[list[SparsityBlock], Tag("§list")]],
    Discriminator(_block_or_list, custom_error_type="sparsity_type",
                  custom_error_message="must be a sparsity block (a mapping) or a list of blocks"),
]


# --- the experiment ---------------------------------------------------------------------------
class DataSpec(BaseModel):
    """``name`` of a data set (:data:`fastsparse.experiments.data.DATASETS`), ``batch_size``, and the loader's keywords."""

    model_config = ConfigDict(extra="allow")
    name: str = "digits"
    batch_size: int = Field(64, ge=1)


class ModelSpec(BaseModel):
    """``name`` of a model (:data:`fastsparse.experiments.models.MODELS`) and the builder's keywords."""

    model_config = ConfigDict(extra="allow")
    name: str = "mlp"


class OptimizerSpec(BaseModel):
    """``sgd``, ``adam`` or ``adamw`` with ``lr``, ``weight_decay`` and the torch optimizer's keywords."""

    model_config = ConfigDict(extra="allow")
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0)
    weight_decay: float = Field(0.0, ge=0)


class LRScheduleSpec(_Spec):
    """Learning rate per step: ``constant``; ``cosine`` to ``minimum`` (a factor of lr) at the end;
    ``step``: times ``gamma`` at each of ``milestones`` (epochs). ``warmup_epochs``: linear warm-up."""

    name: Literal["constant", "cosine", "step"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)
    minimum: float = Field(0.0, ge=0, le=1)
    milestones: list[float] = []
    gamma: float = Field(0.1, gt=0)


class ExperimentConfig(_Spec):
    """An experiment file: what to train, on what, how long, and the sparsity block(s)."""

    seed: int = 0
    data: DataSpec = Field(default_factory=DataSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    lr_schedule: LRScheduleSpec = Field(default_factory=LRScheduleSpec)
    epochs: int = Field(100, ge=1)
    batch_size: int | None = Field(None, ge=1)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    device: str = "auto"
    sparsity: SparsityField | None = None

    @field_validator("device")
    @classmethod
    def _known_device(cls, v):
        import re
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
            raise ValueError(f"device must be auto (a GPU if there is one; under torchrun the rank's own), cpu, "
                             f"cuda or cuda:N, got {v!r}")
        return v

    @model_validator(mode="after")
    def _batch_size_once(self):
        if self.batch_size is not None:
            given = self.data.model_fields_set
            if "batch_size" in given and self.data.batch_size != self.batch_size:
                raise ValueError(f"batch_size is given twice, as {self.batch_size} and data.batch_size "
                                 f"{self.data.batch_size}; keep one")
            self.data.batch_size = self.batch_size
            self.batch_size = None
        return self


def _field_names(*models: type[BaseModel]) -> set[str]:
    return {name for m in models for name in m.model_fields}


_VOCABULARY = sorted(_field_names(ExperimentConfig, SparsityBlock, UpdateSpec, DataSpec, ModelSpec, OptimizerSpec,
                                  LRScheduleSpec, *_SCHEDULE_SPECS.values()))
_PASSED_AS_IS = ("sparsity", "distribution", "init_method", "update", "drop_fraction",
                 "balance_out_groups", "balance_in_groups")
# set by the config or the trainer, not by a key: filters come from param_filter/exclude globs,
# ``batch`` (a data batch for methods that score on data, e.g. SNIP) from the training data
_RESERVED = {"self", "include", "param_filter", "exclude", "params", "batch"}


# --- keyword arguments of named components ------------------------------------------------------
def algorithm_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """Keyword arguments ``cls(...)`` accepts, following ``**kwargs`` up the class hierarchy."""
    found: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            sig = inspect.signature(init)
        except (TypeError, ValueError):
            break
        forwards = False
        for p in sig.parameters.values():
            if p.kind is p.VAR_KEYWORD:
                forwards = True
            elif p.kind is not p.VAR_POSITIONAL and p.name != "self":
                found.setdefault(p.name, p)
        if not forwards:
            break
    return found


def _function_parameters(fn: Callable, skip: Sequence[str] = ()) -> dict[str, inspect.Parameter]:
    params = inspect.signature(fn).parameters
    return {k: p for k, p in params.items() if k not in skip and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def _component_parameters(kind: str, name: str) -> dict[str, inspect.Parameter] | None:
    """The keywords of the data loader / model builder / torch optimizer called ``name``."""
    if kind == "data":
        from ..data import DATASETS
        return _function_parameters(DATASETS[name]) if name in DATASETS else None
    if kind == "model":
        from ..models import MODELS
        return _function_parameters(MODELS[name], ("input_shape", "num_classes")) if name in MODELS else None
    import torch
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}.get(name)
    return _function_parameters(cls.__init__, ("self", "params")) if cls else None


def _check_component(raw: Any, kind: str, fixed: set[str]) -> list[Problem]:
    if not isinstance(raw, dict):
        return []
    name = raw.get("name", {"data": "digits", "model": "mlp", "optimizer": "sgd"}[kind])
    if kind in ("data", "model"):
        from ..data import DATASETS
        from ..models import MODELS
        names = sorted(DATASETS if kind == "data" else MODELS)
        if not isinstance(name, str) or name not in names:
            return [Problem(f"{kind}.name", f"unknown {kind} {name!r}{_suggest(str(name), names)}; valid: {names}")]
    params = _component_parameters(kind, name)
    if params is None:
        return []
    valid = sorted(set(params) | fixed)
    return [Problem(f"{kind}.{key}", f"unknown key for {kind} {name!r}{_suggest(key, valid)}; valid keys: {valid}")
            for key in raw if key not in fixed and key not in params]


def _convert_base_kwargs(values: dict[str, Any], base: Any, path: str) -> tuple[dict[str, Any], list[Problem]]:
    """The settings of a wrapping algorithm's ``base`` (Sup-tickets over RigL, ...), converted for
    the base's constructor as a block's own settings are: schedules and update schedules."""
    try:
        params = algorithm_parameters(get_algorithm(base)) if isinstance(base, str) else {}
    except ValueError as e:
        return values, [Problem(path, str(e))]
    out, problems = {}, []
    for key, value in values.items():
        if key in params:
            out[key], extra = _convert_extra(value, params[key], f"{path}.{key}")
            problems.extend(extra)
        elif params:
            valid = sorted(k for k in params if k not in _RESERVED)
            problems.append(Problem(f"{path}.{key}", f"unknown key for base {base!r}{_suggest(key, valid)}; "
                                                     f"valid keys: {valid}"))
        else:
            out[key] = value
    return out, problems


def _convert_extra(value: Any, param: inspect.Parameter, path: str) -> tuple[Any, list[Problem]]:
    """Turn a YAML value into what the constructor takes: schedules and update schedules become objects."""
    annotation = str(param.annotation)
    try:
        if "UpdateSchedule" in annotation and isinstance(value, (dict, list)):
            return TypeAdapter(Annotated[UpdateSpec, BeforeValidator(_update_before)]).validate_python(value).build(), []
        if isinstance(value, dict) and "type" in value:
            return TypeAdapter(ScheduleSpec).validate_python(value).build(), []
    except ValidationError as e:
        return None, _problems(e, path)
    return value, []


def _check_block_keys(raw: dict, algorithm: str | None, path: tuple, overlay: bool) -> tuple[list[Problem], list[str]]:
    """Unknown keys (errors, with "did you mean") and schema keys this algorithm ignores (notes)."""
    if algorithm is None:
        return [], []
    try:
        params = algorithm_parameters(get_algorithm(algorithm))
    except ValueError:
        return [], []
    fields = set(OverlaySpec.model_fields if overlay else SparsityBlock.model_fields)
    accepted = {k for k in params if k not in _RESERVED}
    valid = sorted(fields | accepted)
    problems, notes = [], []
    for key in raw:
        where = format_path(path + (key,))
        if key in fields:
            if key in ("balance_out_groups", "balance_in_groups") and key not in params and raw[key] is not None:
                takers = [n for n in list_algorithms() if key in algorithm_parameters(get_algorithm(n))]
                problems.append(Problem(where, f"{algorithm} has no {key}; the methods that have it: "
                                               f"{', '.join(takers) or 'none'}"))
            elif key in ("update", "drop_fraction") and key not in params and raw[key] is not None:
                notes.append(f"{where}: {algorithm} does not use {key}; ignored")
        elif key not in accepted:
            if overlay and key in ("param_filter", "param_filters", "exclude"):
                problems.append(Problem(where, "an overlay cannot set its own filter: its pattern is the filter"))
            else:
                problems.append(Problem(where, f"unknown key for algorithm {algorithm!r}{_suggest(key, valid)}; "
                                               f"valid keys: {valid}"))
    return problems, notes


def _raw_blocks(raw: dict) -> list[tuple[tuple, dict]]:
    block = raw.get("sparsity")
    if isinstance(block, dict):
        return [(("sparsity",), block)]
    if isinstance(block, list):
        return [(("sparsity", i), b) for i, b in enumerate(block) if isinstance(b, dict)]
    return []


def _check_keys(raw: dict) -> tuple[list[Problem], list[str]]:
    """The name-dependent part of validation, on the raw dict (so it runs even where types fail)."""
    problems: list[Problem] = []
    notes: list[str] = []
    problems += _check_component(raw.get("data"), "data", set(DataSpec.model_fields))
    problems += _check_component(raw.get("model"), "model", set(ModelSpec.model_fields))
    problems += _check_component(raw.get("optimizer"), "optimizer", set(OptimizerSpec.model_fields))
    for path, block in _raw_blocks(raw):
        alg = block.get("algorithm", "static")
        alg = alg if isinstance(alg, str) and alg.lower() in list_algorithms() else None
        p, n = _check_block_keys(block, alg, path, overlay=False)
        problems += p
        notes += n
        overlays = block.get("param_filters")
        if isinstance(overlays, dict):
            for pattern, over in overlays.items():
                if isinstance(over, dict):
                    o_alg = over.get("algorithm", alg)
                    o_alg = o_alg if isinstance(o_alg, str) and o_alg.lower() in list_algorithms() else None
                    p, n = _check_block_keys(over, o_alg, path + ("param_filters", pattern), overlay=True)
                    problems += p
                    notes += n
    return problems, notes


# --- loading ----------------------------------------------------------------------------------
def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing, unreadable, empty or non-mapping file is a ConfigError."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError([f"no such file: {path}"], str(path)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"cannot read {path}: {e}"], str(path)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ConfigError([f"not valid YAML: {where}{getattr(e, 'problem', None) or e}"], str(path)) from None
    if data is None:
        raise ConfigError(["the file is empty; see examples/digits_rigl.yaml for a complete experiment"], str(path))
    if not isinstance(data, dict):
        raise ConfigError([f"the file must hold a mapping (key: value), not a {type(data).__name__}"], str(path))
    return data


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``key.sub=value`` overrides (``sparsity.sparsity=0.9``, ``sparsity[1].update.freq=10``);
    values are read as YAML (numbers, lists, null)."""
    import yaml

    raw = copy.deepcopy(raw)
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            problems.append(Problem("--set", f"expected key=value, got {item!r}"))
            continue
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        parts: list[str | int] = []
        for piece in key.strip().replace("]", "").replace("[", ".").split("."):
            if piece:
                parts.append(int(piece) if piece.isdigit() else piece)
        node: Any = raw
        try:
            for part, nxt in zip(parts[:-1], parts[1:]):
                if isinstance(node, dict) and not isinstance(node.get(part), (dict, list)):
                    node[part] = [] if isinstance(nxt, int) else {}
                node = node[part]
            node[parts[-1]] = value
        except (IndexError, KeyError, TypeError):
            problems.append(Problem(key, f"--set cannot reach this path in the config (from {item!r})"))
    if problems:
        raise ConfigError(problems, "--set")
    return raw


def load_config(source: str | Path | dict[str, Any], overrides: Sequence[str] = ()) -> dict[str, Any]:
    """A raw config dict from a YAML file or a dict, with ``--set`` overrides applied."""
    raw = copy.deepcopy(source) if isinstance(source, dict) else load_yaml(source)
    return apply_overrides(raw, overrides) if overrides else raw


def parse_config(raw: dict[str, Any], source: str | None = None) -> tuple[ExperimentConfig, list[str]]:
    """Validate types, names and keys; return the config and notes (keys an algorithm ignores).
    Raises :class:`ConfigError` listing every problem found."""
    if not isinstance(raw, dict):
        raise ConfigError([f"the config must be a mapping (key: value), not a {type(raw).__name__}"], source)
    raw, problems = _cerebras_spellings(raw)
    config = None
    try:
        config = ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        problems += _problems(e)
    key_problems, notes = _check_keys(raw)
    problems += key_problems
    if problems:
        order = {key: i for i, key in enumerate(raw)}
        unique = {(p.path, p.message): p for p in problems}.values()
        top = lambda p: order.get(p.path.split(".")[0].split("[")[0], len(order))  # noqa: E731
        raise ConfigError(sorted(unique, key=lambda p: (top(p), p.path)), source)
    assert config is not None
    return config, notes


def sparsity_blocks(config: ExperimentConfig) -> list[tuple[str, SparsityBlock]]:
    """(path, block) for every sparsity block of the experiment."""
    s = config.sparsity
    if s is None:
        return []
    if isinstance(s, SparsityBlock):
        return [("sparsity", s)]
    return [(f"sparsity[{i}]", b) for i, b in enumerate(s)]


# --- the resolved config ------------------------------------------------------------------------
def _jsonable_default(p: inspect.Parameter) -> bool:
    d = p.default
    if d is inspect.Parameter.empty or d is None or callable(d):
        return False
    try:
        json.dumps(d)
    except TypeError:
        return False
    return True


def _resolve_block(block: dict[str, Any], algorithm: str | None, overlay: bool) -> dict[str, Any]:
    """Fill the algorithm's defaults; drop the keys it ignores and the keys left at None."""
    out = {k: v for k, v in block.items() if v is not None}
    if algorithm is None:
        return out
    params = algorithm_parameters(get_algorithm(algorithm))
    for key in ("update", "drop_fraction"):
        if key in out and key not in params:
            del out[key]
    if not overlay:
        for name, p in params.items():
            if name not in _RESERVED and name not in out and _jsonable_default(p):
                out[name] = p.default
    return out


def resolve_config(config: ExperimentConfig) -> dict[str, Any]:
    """The config with every default filled in, as plain JSON data: what a run saves and hashes.
    Validating it again gives the same dict."""
    data = config.model_dump(mode="json", exclude_none=True)
    data.pop("batch_size", None)
    for name, kind in (("data", "data"), ("model", "model")):
        params = _component_parameters(kind, data[name]["name"]) or {}
        for key, p in params.items():
            if key not in data[name] and _jsonable_default(p):
                data[name][key] = list(p.default) if isinstance(p.default, tuple) else p.default
    blocks = data.get("sparsity")
    if blocks is not None:
        as_list = blocks if isinstance(blocks, list) else [blocks]
        resolved = []
        for b in as_list:
            alg = b.get("algorithm", "static")
            rb = _resolve_block(b, alg, overlay=False)
            if "param_filters" in rb:
                rb["param_filters"] = {pat: _resolve_block(o, o.get("algorithm", alg), overlay=True)
                                       for pat, o in rb["param_filters"].items()}
            resolved.append(rb)
        data["sparsity"] = resolved if isinstance(blocks, list) else resolved[0]
    return json.loads(json.dumps(data))


def config_hash(resolved: dict[str, Any]) -> str:
    """A short, stable hash of a resolved config (names its run folder)."""
    import hashlib

    return hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:10]


# --- the plan: which parameter gets which algorithm ----------------------------------------------
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
    for part in _DENSE_NAME_PARTS:
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


def plan_sparsity(config: ExperimentConfig | dict | list, model: nn.Module, batch: Any = None) -> SparsityPlan:
    """Resolve the sparsity blocks against ``model``: filters, overlays, algorithm instances.

    ``batch``: (inputs, targets) handed to algorithms that take one (methods that score weights
    on data, such as SNIP and GraSP).

    Raises :class:`ConfigError` for filters or overlays that match nothing, blocks that
    claim the same parameter, balance groups that do not divide a parameter, and arguments
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
        block_algs, block_rows = _plan_block(path, block, selected, batch, problems)
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

    log = logging.getLogger("fastsparse.experiments.config")
    for r in plan.rows:
        if r.algorithm is None:
            log.info("%s %s: dense (%s)", r.name, tuple(r.shape), r.note)
        else:
            log.info("%s %s: %s, target density %.4f (%s)", r.name, tuple(r.shape), r.algorithm,
                     r.target_density, r.block)


_EXPERIMENT_ONLY = set(ExperimentConfig.model_fields) - set(SparsityBlock.model_fields)


def _looks_like_block(d: dict) -> bool:
    """A sparsity block (``{algorithm: ..., sparsity: 0.9}``) rather than an experiment."""
    if "algorithm" in d:
        return True
    if set(d) & _EXPERIMENT_ONLY:
        return False
    s = d.get("sparsity")
    return not (isinstance(s, list) or (isinstance(s, dict) and "type" not in s))


def _plan_block(path: str, block: SparsityBlock, selected, batch: Any,
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
        specs = {key: getattr(block, key) for key in _PASSED_AS_IS}
        if overlay is not None:
            settings.update(overlay.model_dump(exclude_none=True))
            specs.update({key: getattr(overlay, key) for key in _PASSED_AS_IS if getattr(overlay, key) is not None})
        cls = get_algorithm(settings.pop("algorithm", block.algorithm))
        params = algorithm_parameters(cls)
        kwargs: dict[str, Any] = {}
        for key, value in settings.items():
            if key not in params or key in _RESERVED:
                continue
            if key in _PASSED_AS_IS:
                kwargs[key] = _build_value(specs[key])
            elif key == "base_kwargs" and isinstance(value, dict):
                kwargs[key], extra = _convert_base_kwargs(value, settings.get("base", _default(params, "base")),
                                                          f"{where}.{key}")
                problems.extend(extra)
            else:
                kwargs[key], extra = _convert_extra(value, params[key], f"{where}.{key}")
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
        if batch is not None and "batch" in params:
            kwargs["batch"] = batch
        for key, dim, what in (("balance_out_groups", 0, "rows"), ("balance_in_groups", 1, "columns")):
            g = kwargs.get(key)
            if g is None:
                continue
            bad = [(names[i], shapes[i][dim] if len(shapes[i]) > dim else 0) for i in idx]
            bad = [(n, size) for n, size in bad if size % g]
            if bad:
                src = where if overlay is not None and getattr(overlay, key, None) is not None else path
                sizes = {size for _, size in bad}
                listed = ", ".join(n for n, _ in bad) if len(sizes) == 1 else \
                    ", ".join(f"{n} ({size})" for n, size in bad)
                count = f"{sizes.pop()} " if len(sizes) == 1 else ""
                problems.append(Problem(f"{src}.{key}", f"{g} does not divide the {count}{what} of {listed}"))
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
                total_steps: int | None = None, seed: int | None = None):
    """A :class:`fastsparse.Sparsifier` for ``model`` from a sparsity block, a list of blocks,
    an experiment dict (its ``sparsity``) or a YAML file::

        sparsifier = fastsparse.from_config(model, opt, {"algorithm": "rigl", "sparsity": 0.9,
                                                         "update": {"freq": 100, "stop": 0.75}},
                                            total_steps=10_000)
    """
    from ...engine.sparsifier import Sparsifier

    if isinstance(config, (str, Path)):
        config = load_yaml(config)
    if isinstance(config, list) or (isinstance(config, dict) and _looks_like_block(config)):
        config = {"sparsity": config}
    experiment, _ = parse_config(config)
    if experiment.sparsity is None:
        raise ConfigError([Problem("sparsity", "no sparsity block: nothing to sparsify")])
    plan = plan_sparsity(experiment, model)
    return Sparsifier(model, optimizer, plan.algorithms, total_steps=total_steps,
                      seed=experiment.seed if seed is None else seed)


# --- the compare suite ---------------------------------------------------------------------------
DIGITS_BASE: dict[str, Any] = {
    "seed": 0,
    "data": {"name": "digits", "batch_size": 64},
    "model": {"name": "mlp", "sizes": [64, 300, 100, 10]},
    "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0},
    "lr_schedule": {"name": "cosine"},
    "epochs": 100,
}
SUITE_BLOCK: dict[str, Any] = {"distribution": "erk", "update": {"freq": 50, "stop": 0.75}, "drop_fraction": 0.3}


class SuiteSpec(_Spec):
    """A comparison: ``base`` experiment (without ``sparsity``), the ``methods`` (``dense`` and
    registered names; default: every one that runs in the standard loop), the ``sparsities``,
    the number of ``seeds``, and the sparsity settings every method shares (``block``; the
    ones a method does not take are left out)."""

    base: dict[str, Any] = Field(default_factory=lambda: copy.deepcopy(DIGITS_BASE))
    methods: list[str] | None = None
    sparsities: list[float] = [0.9, 0.98]
    seeds: int = Field(3, ge=1)
    block: dict[str, Any] = Field(default_factory=lambda: copy.deepcopy(SUITE_BLOCK))

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, v):
        for m in v or []:
            if m != "dense":
                _known_algorithm(m)
        return v

    @field_validator("sparsities")
    @classmethod
    def _in_range(cls, v):
        for s in v:
            _check_levels(s, 0.0, 1.0, False, "sparsity")
        return v


def load_suite(path: str | Path | None = None) -> SuiteSpec:
    """The built-in digits suite (``path`` None) or a suite file; its base experiment and shared
    block are validated too, and every problem is reported at once."""
    if path is None:
        return SuiteSpec()
    raw = load_yaml(path)
    problems: list[Problem] = []
    spec = None
    try:
        spec = SuiteSpec.model_validate(raw)
    except ValidationError as e:
        problems += _problems(e)
    base, block = raw.get("base"), raw.get("block")
    if isinstance(base, dict):
        try:
            parse_config({k: v for k, v in base.items() if k != "sparsity"})
        except ConfigError as e:
            problems += [Problem(f"base.{p.path}", p.message) for p in e.problems]
    if isinstance(block, dict):
        schema = {k: v for k, v in block.items() if k in SparsityBlock.model_fields}
        try:
            parse_config({"sparsity": {"algorithm": "dst", **schema}})
        except ConfigError as e:
            problems += [Problem(p.path.replace("sparsity", "block", 1), p.message) for p in e.problems]
        known = set(SparsityBlock.model_fields).union(
            *(algorithm_parameters(get_algorithm(n)) for n in list_algorithms()))
        problems += [Problem(f"block.{k}", f"no registered algorithm takes this key{_suggest(k, sorted(known))}")
                     for k in block if k not in known or k in _RESERVED]
    if problems:
        raise ConfigError(problems, str(path))
    assert spec is not None
    return spec
