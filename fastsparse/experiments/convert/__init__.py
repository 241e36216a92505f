"""Translate another system's command line or config file into our experiment file.

    fastsparse convert --from suptickets "python3 main_suptickets.py --sparse ... --data cifar100"
    fastsparse convert --from rare-gems their.yaml

Each source system has a converter, ``convert(text) -> dict`` (an experiment config), in
:mod:`fastsparse.experiments.convert`; a converter may also offer ``convert_with_notes(text) -> (dict,
notes)``, the notes being options of the run environment (workers, ports, save paths) and
details where our behaviour differs, which the command line prints as YAML comments. An option
with no equivalent raises :class:`ConversionError` naming it and what is allowed; none is
dropped silently.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable

__all__ = ["ConversionError", "CONVERTERS", "convert", "convert_with_notes", "list_sources"]

# source name -> "module:function"; the module is imported only when that source is converted
CONVERTERS: dict[str, str] = {
    "suptickets": "fastsparse.experiments.convert.suptickets:convert",
    "rare-gems": "fastsparse.experiments.convert.rare_gems:convert",
}


class ConversionError(ValueError):
    """An option of the source system that has no equivalent here, or a malformed input."""


def list_sources() -> list[str]:
    return sorted(CONVERTERS)


def _converter(source: str, name: str | None = None) -> Callable[[str], Any] | None:
    key = source.lower().replace("_", "-")
    if key not in CONVERTERS:
        raise ConversionError(f"unknown source system {source!r}; valid: {list_sources()}")
    module, _, fn = CONVERTERS[key].partition(":")
    return getattr(importlib.import_module(module), name or fn, None)


def convert(source: str, text: str) -> dict[str, Any]:
    """Our experiment config (a dict, ready for :func:`fastsparse.experiments.config.parse_config`) for
    ``text``: a command line (``suptickets``) or the text of a YAML file (``rare-gems``)."""
    return _converter(source)(text)


def convert_with_notes(source: str, text: str) -> tuple[dict[str, Any], list[str]]:
    """(config, notes): the notes the converter keeps (none if it keeps none)."""
    with_notes = _converter(source, "convert_with_notes")
    if with_notes is not None:
        return with_notes(text)
    return _converter(source)(text), []
