"""Errors that name the argument at fault, so that a config can point at the key."""
from __future__ import annotations

__all__ = ["ParameterError", "MaskDisagreement"]


class ParameterError(ValueError):
    """A value of the argument ``key`` that the method cannot work with (``str()`` says why)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


class MaskDisagreement(RuntimeError):
    """Ranks hold different masks: the replicas are no longer training the same network (or, with
    sharded masks, the ranks no longer agree on what the shards should hold together)."""
