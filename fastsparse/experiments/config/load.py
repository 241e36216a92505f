"""Reading a config: YAML files, ``--set`` overrides, Cerebras's older spellings, validation
of every key at once (:func:`parse_config`), and the resolved config that names a run."""
from __future__ import annotations

import copy
import inspect
import json
from pathlib import Path
from typing import Any, Sequence

from pydantic import ValidationError

from ...algorithms.base import get_algorithm
from .errors import ConfigError, Problem, format_path, problems_of
from .keys import algorithm_parameters, check_keys, component_parameters, raw_blocks
from .schema import RESERVED, VOCABULARY, ExperimentConfig, SparsityBlock

__all__ = ["safe_yaml", "load_yaml", "apply_overrides", "load_config", "parse_config", "sparsity_blocks", "resolve_config",
           "config_hash"]

_BLOCK_ALIASES = {"type": "algorithm", "schedule": "update"}


def _cerebras_spellings(raw: dict[str, Any]) -> tuple[dict[str, Any], list[Problem]]:
    """The config with ``type``/``schedule`` in sparsity blocks renamed; a key given under both
    spellings is a problem. The input is not modified."""
    blocks = raw_blocks(raw)
    if not any(alias in b for _, b in blocks for alias in _BLOCK_ALIASES):
        return raw, []
    raw = copy.deepcopy(raw)
    problems = []
    for path, _ in raw_blocks(raw):
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


def _unique_key_loader():
    """yaml's SafeLoader, refusing a key given twice in one mapping (at any depth): the YAML spec
    forbids it and PyYAML would keep the last value silently. Keys merged with ``<<`` may be
    overridden, as YAML intends."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                seen: dict[Any, Any] = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue
                    key = self.construct_object(key_node, deep=True)
                    try:
                        first = seen.get(key)
                    except TypeError:   # an unhashable key: the base class reports it
                        continue
                    if first is not None:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"duplicate key {key!r} (first given at line {first.line + 1}); "
                            "each key may appear once in a mapping", key_node.start_mark)
                    seen[key] = key_node.start_mark
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def safe_yaml(text: str) -> Any:
    """``yaml.safe_load`` that refuses duplicate keys (a ``yaml.YAMLError`` with the line and the key)."""
    import yaml

    return yaml.load(text, Loader=_unique_key_loader())  # noqa: S506 - a SafeLoader subclass


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
        data = safe_yaml(text)
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
            value = safe_yaml(text)
        except yaml.constructor.ConstructorError as e:
            problems.append(Problem(key.strip(), f"--set {item!r}: {e.problem}"))
            continue
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
        problems += problems_of(e, "", VOCABULARY)
    key_problems, notes = check_keys(raw, {p.path for p in problems})
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
    if "update" in out and "update" not in params:
        del out["update"]
    if not overlay:
        for name, p in params.items():
            if name not in RESERVED and name not in out and _jsonable_default(p):
                out[name] = p.default
    return out


def resolve_config(config: ExperimentConfig) -> dict[str, Any]:
    """The config with every default filled in, as plain JSON data: what a run saves and hashes.
    Validating it again gives the same dict."""
    data = config.model_dump(mode="json", exclude_none=True)
    data.pop("batch_size", None)
    if data.get("execution") == "masked":
        data.pop("execution")   # the default, left out so that run folders of earlier versions keep their hash
    if data.get("parallel") == "ddp":
        data.pop("parallel")    # the same
    for name, kind in (("data", "data"), ("model", "model")):
        params = component_parameters(kind, data[name]["name"]) or {}
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
