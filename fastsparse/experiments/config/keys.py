"""The keys of one algorithm: its constructor's keyword arguments, validated against their
annotated types, so that a registered custom algorithm validates with no edit here; and the
keys of the data loader, the model builder and the optimizer, read from their signatures."""
from __future__ import annotations

import functools
import inspect
import typing
from typing import Any, Callable, Sequence

from pydantic import ConfigDict, PydanticSchemaGenerationError, TypeAdapter, ValidationError

from ...algorithms.base import get_algorithm, list_algorithms
from .errors import Problem, format_path, problem_at, problems_of, suggest
from .schema import RESERVED, VOCABULARY, DataSpec, ModelSpec, OptimizerSpec, OverlaySpec, SparsityBlock
from .specs import ScheduleSpec, UpdateField

__all__ = ["algorithm_parameters", "algorithm_types", "convert_value", "convert_nested", "nested_algorithm",
           "component_parameters", "check_keys", "raw_blocks"]


def _init_chain(cls: type):
    """(``__init__``, its signature) up the class hierarchy, as long as each forwards ``**kwargs``."""
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            sig = inspect.signature(init)
        except (TypeError, ValueError):
            return
        yield init, sig
        if not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
            return


def algorithm_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """Keyword arguments ``cls(...)`` accepts, following ``**kwargs`` up the class hierarchy."""
    found: dict[str, inspect.Parameter] = {}
    for _, sig in _init_chain(cls):
        for p in sig.parameters.values():
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name != "self":
                found.setdefault(p.name, p)
    return found


def _function_parameters(fn: Callable, skip: Sequence[str] = ()) -> dict[str, inspect.Parameter]:
    params = inspect.signature(fn).parameters
    return {k: p for k, p in params.items() if k not in skip and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def component_parameters(kind: str, name: str) -> dict[str, inspect.Parameter] | None:
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
            return [Problem(f"{kind}.name", f"unknown {kind} {name!r}{suggest(str(name), names)}; valid: {names}")]
    params = component_parameters(kind, name)
    if params is None:
        return []
    valid = sorted(set(params) | fixed)
    return [Problem(f"{kind}.{key}", f"unknown key for {kind} {name!r}{suggest(key, valid)}; valid keys: {valid}")
            for key in raw if key not in fixed and key not in params]


def nested_algorithm(params: dict[str, inspect.Parameter], key: str, block: dict[str, Any]) -> Any:
    """The convention for a wrapping algorithm's inner one (Sup-tickets over RigL): a parameter
    ``<name>_kwargs`` holds the keyword arguments of the algorithm named by ``<name>``."""
    if not key.endswith("_kwargs") or key[: -len("_kwargs")] not in params:
        return None
    inner = key[: -len("_kwargs")]
    return block.get(inner, _default(params[inner]))


def _default(p: inspect.Parameter) -> Any:
    return None if p.default is inspect.Parameter.empty else p.default


def convert_nested(values: dict[str, Any], inner: Any, path: str) -> tuple[dict[str, Any], list[Problem]]:
    """The keyword arguments of an inner algorithm, converted and checked as a block's own keys are."""
    try:
        cls = get_algorithm(inner) if isinstance(inner, str) else None
    except ValueError as e:
        return values, [Problem(path, str(e))]
    if cls is None:
        return values, []
    params, types = algorithm_parameters(cls), algorithm_types(cls)
    out, problems = {}, []
    for key, value in values.items():
        if key in params and key not in RESERVED:
            out[key], extra = convert_value(value, params[key], types.get(key), f"{path}.{key}")
            problems.extend(extra)
        else:
            valid = sorted(k for k in params if k not in RESERVED)
            problems.append(Problem(f"{path}.{key}", f"unknown key for {inner!r}{suggest(key, valid)}; "
                                                     f"valid keys: {valid}"))
    return out, problems


def algorithm_types(cls: type) -> dict[str, Any]:
    """The annotated type of every keyword argument of ``cls(...)`` that can be resolved."""
    out: dict[str, Any] = {}
    for init, _ in _init_chain(cls):
        try:
            hints = typing.get_type_hints(init)
        except (NameError, TypeError, AttributeError):   # an annotation that does not resolve: not type-checked
            hints = {}
        for name, tp in hints.items():
            out.setdefault(name, tp)
    return out


@functools.lru_cache(maxsize=256)
def _adapter(tp: Any) -> TypeAdapter:
    return TypeAdapter(tp, config=ConfigDict(arbitrary_types_allowed=True))


def convert_value(value: Any, param: inspect.Parameter, tp: Any, path: str) -> tuple[Any, list[Problem]]:
    """A YAML value as the constructor takes it (schedules and update schedules become objects),
    checked against the parameter's annotated type."""
    annotation = str(param.annotation)
    try:
        if "UpdateSchedule" in annotation and isinstance(value, (dict, list)):
            value = TypeAdapter(UpdateField).validate_python(value).build()
        elif isinstance(value, dict) and "type" in value:
            value = TypeAdapter(ScheduleSpec).validate_python(value).build()
    except ValidationError as e:
        return None, problems_of(e, path, VOCABULARY)
    if tp is None or value is None:
        return value, []
    try:
        adapter = _adapter(tp)
    except (PydanticSchemaGenerationError, TypeError):   # a type pydantic cannot check: the constructor does
        return value, []
    try:
        adapter.validate_python(value)
    except ValidationError as e:
        return value, [Problem(path, _type_message(e, value))]
    return value, []


def _type_message(e: ValidationError, value: Any) -> str:
    kinds = {err["type"].split("_")[0] for err in e.errors()}
    wanted = [k for k in ("int", "float", "bool", "string", "list", "dict") if k in kinds]
    names = {"int": "an integer", "float": "a number", "bool": "true or false", "string": "a string",
             "list": "a list", "dict": "a mapping"}
    if wanted:
        return f"must be {' or '.join(names[k] for k in wanted)}, got {value!r}"
    return f"{e.errors()[0]['msg']}, got {value!r}"


def _check_block_keys(raw: dict, algorithm: str | None, path: tuple, overlay: bool,
                      inherited: dict | None = None, build: bool = True) -> tuple[list[Problem], list[str]]:
    """Unknown keys (errors, with "did you mean"), values of the wrong type for the algorithm's
    own parameters (errors), generic keys this algorithm ignores (notes); then the algorithm is
    built from the keys alone, so that its own checks of their values report here too."""
    if algorithm is None:
        return [], []
    try:
        cls = get_algorithm(algorithm)
    except ValueError:
        return [], []
    params, types = algorithm_parameters(cls), algorithm_types(cls)
    fields = set(OverlaySpec.model_fields if overlay else SparsityBlock.model_fields)
    accepted = {k for k in params if k not in RESERVED}
    valid = sorted(fields | accepted)
    problems, notes = [], []
    kwargs: dict[str, Any] = {}
    merged = {**(inherited or {}), **raw}
    for key, value in raw.items():
        where = format_path(path + (key,))
        if key in fields:
            if key == "update" and key not in params and value is not None:
                nested = [k for k in params if nested_algorithm(params, k, merged) is not None]
                hint = f" (the update of its {nested[0][:-7]} goes in {nested[0]})" if nested else ""
                problems.append(Problem(where, f"{algorithm} decides itself when its masks change: it takes no "
                                               f"{key}; leave it out{hint}"))
        elif key not in accepted:
            if overlay and key in ("param_filter", "param_filters", "exclude"):
                problems.append(Problem(where, "an overlay cannot set its own filter: its pattern is the filter"))
            else:
                problems.append(Problem(where, f"unknown key for algorithm {algorithm!r}{suggest(key, valid)}; "
                                               f"valid keys: {valid}"))
        elif (inner := nested_algorithm(params, key, merged)) is not None and isinstance(value, dict):
            kwargs[key], extra = convert_nested(value, inner, where)
            problems += extra
        else:
            kwargs[key], extra = convert_value(value, params[key], types.get(key), where)
            problems += extra
    if build and not problems:
        for key in set(inherited or {}) - set(raw):
            if key in accepted and key not in fields and key not in kwargs:
                kwargs[key] = convert_value(inherited[key], params[key], types.get(key), "")[0]
        generic = _generic_kwargs(merged, params)
        if generic is not None:
            problems += _built(cls, {**generic, **kwargs}, path)
    return problems, notes


def _generic_kwargs(block: dict, params: dict[str, inspect.Parameter]) -> dict[str, Any] | None:
    """The block's generic keys as the constructor takes them, or None when one is a schedule or
    invalid (the plan builds those; the schema reports the invalid ones)."""
    out: dict[str, Any] = {}
    for key in ("sparsity", "distribution", "init_method", "update"):
        value = block.get(key)
        if value is None or key not in params:
            continue
        if key == "sparsity":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return None
            out[key] = float(value)
        elif key == "update":
            try:
                out[key] = TypeAdapter(UpdateField).validate_python(value).build()
            except (ValidationError, ValueError):
                return None
        else:
            out[key] = value
    return out


def _built(cls: type, kwargs: dict[str, Any], path: tuple) -> list[Problem]:
    """The algorithm's own checks of ``kwargs`` (without a model), each at the key it names."""
    try:
        cls(**kwargs)
    except (ValueError, TypeError) as e:
        return [problem_at(format_path(path), e, list(kwargs))]
    return []


def raw_blocks(raw: dict) -> list[tuple[tuple, dict]]:
    block = raw.get("sparsity")
    if isinstance(block, dict):
        return [(("sparsity",), block)]
    if isinstance(block, list):
        return [(("sparsity", i), b) for i, b in enumerate(block) if isinstance(b, dict)]
    return []


def check_keys(raw: dict, reported: set[str] = frozenset()) -> tuple[list[Problem], list[str]]:
    """The name-dependent part of validation, on the raw dict (so it runs even where types fail);
    a block with a problem already ``reported`` by the schema is not built again."""
    problems: list[Problem] = []
    notes: list[str] = []
    problems += _check_component(raw.get("data"), "data", set(DataSpec.model_fields))
    problems += _check_component(raw.get("model"), "model", set(ModelSpec.model_fields))
    problems += _check_component(raw.get("optimizer"), "optimizer", set(OptimizerSpec.model_fields))
    for path, block in raw_blocks(raw):
        alg = block.get("algorithm", "static")
        alg = alg if isinstance(alg, str) and alg.lower() in list_algorithms() else None
        built = not any(r == format_path(path) or r.startswith(format_path(path) + ".") for r in reported)
        p, n = _check_block_keys(block, alg, path, overlay=False, build=built)
        problems += p
        notes += n
        overlays = block.get("param_filters")
        if isinstance(overlays, dict):
            for pattern, over in overlays.items():
                if isinstance(over, dict):
                    o_alg = over.get("algorithm", alg)
                    o_alg = o_alg if isinstance(o_alg, str) and o_alg.lower() in list_algorithms() else None
                    inherited = {k: v for k, v in block.items() if k not in ("param_filters", "algorithm")} \
                        if o_alg == alg else {}
                    p, n = _check_block_keys(over, o_alg, path + ("param_filters", pattern), overlay=True,
                                             inherited=inherited, build=built)
                    problems += p
                    notes += n
    return problems, notes
