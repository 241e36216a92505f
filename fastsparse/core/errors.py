"""Errors that name the argument at fault, so that a config can point at the key."""
from __future__ import annotations

__all__ = ["ParameterError"]


class ParameterError(ValueError):
    """A value of the argument ``key`` that the method cannot work with (``str()`` says why)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key
