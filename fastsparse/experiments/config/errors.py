"""Problems in a config: each with its path (``sparsity[1].update.freq: must be ≥ 1``), all
reported at once, worded so that a user can act on them."""
from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from typing import Any, Sequence

from pydantic import ValidationError

from ...core.schedules import SCHEDULES

__all__ = ["Problem", "ConfigError", "format_path", "suggest", "problems_of", "problem_at"]


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


def suggest(word: str, vocabulary: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(word), list(vocabulary), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _message(err: dict[str, Any], vocabulary: Sequence[str]) -> str:
    """A pydantic error as a sentence a user can act on."""
    kind, ctx, given = err["type"], err.get("ctx") or {}, err.get("input")
    got = f", got {given!r}" if not isinstance(given, (dict, list)) else ""
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        return "unknown key" + suggest(err["loc"][-1], vocabulary)
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
        return f"must be one of {ctx.get('expected')}{got}" + (suggest(given, _literal_words(ctx)) if isinstance(given, str) else "")
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    if kind in ("number_or_schedule", "sparsity_type"):
        return f"{err['msg']}{got}"
    if kind == "schedule_type":
        t = given.get("type") if isinstance(given, dict) else None
        types = list(SCHEDULES)
        head = f"unknown schedule type {t!r}{suggest(t, types)}" if t is not None else "a schedule needs a 'type'"
        return f"{head}; valid types: {types}"
    return err["msg"]


def _literal_words(ctx: dict[str, Any]) -> list[str]:
    return [w.strip(" '\"") for w in str(ctx.get("expected", "")).replace(" or ", ",").split(",")]


def _join(prefix: str, loc: Sequence[Any]) -> str:
    rest = format_path(loc)
    if not prefix or not rest:
        return prefix or rest
    return prefix + rest if rest.startswith("[") else f"{prefix}.{rest}"


def problems_of(e: ValidationError, prefix: str = "", vocabulary: Sequence[str] = ()) -> list[Problem]:
    """A pydantic error as problems, each with its path under ``prefix``."""
    return [Problem(_join(prefix, err["loc"]), _message(err, vocabulary)) for err in e.errors()]


def problem_at(path: str, error: Exception, keys: Sequence[str] = ()) -> Problem:
    """A method's refusal as a problem at the key it names: the error's own ``key`` (a
    :class:`fastsparse.core.errors.ParameterError`), else the first of ``keys`` the message starts
    with, else ``path`` itself."""
    message = str(error)
    key = getattr(error, "key", None) or next((k for k in keys if message.startswith(k)), None)
    return Problem(f"{path}.{key}" if key else path, message)
