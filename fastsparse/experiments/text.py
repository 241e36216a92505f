"""A text corpus that ships with Python, for language models with nothing to download.

``pydoc_topics``: the help texts of Python's ``pydoc_data.topics`` (about 466 kB of English and
code), read as UTF-8 bytes: a vocabulary of 256 tokens. The topics are joined in the order of
their names; the first ``1 - test_fraction`` of the bytes train, the rest is held out (contiguous,
so no window of the held-out text is seen in training). Each split is cut into windows of
``context + 1`` bytes (every ``stride`` bytes; default ``context``, no overlap): the input is a
window's first ``context`` bytes, the targets are its last ``context`` (the next byte at every
position). Perplexity is exp(mean cross-entropy per held-out byte).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["VOCAB", "corpus_bytes", "windows", "pydoc_splits"]

VOCAB = 256


def corpus_bytes() -> bytes:
    """Every ``pydoc_data.topics`` text, in the order of the topic names, as UTF-8."""
    from pydoc_data.topics import topics

    return "".join(topics[name] for name in sorted(topics)).encode("utf-8")


def windows(tokens: Tensor, context: int, stride: int) -> tuple[Tensor, Tensor]:
    """(inputs, targets), each (N, context): windows of ``context + 1`` tokens every ``stride``."""
    if len(tokens) < context + 1:
        raise ValueError(f"a split of {len(tokens)} tokens is shorter than one window of context {context} + 1")
    w = tokens.unfold(0, context + 1, stride)
    return w[:, :-1].clone(), w[:, 1:].clone()


def pydoc_splits(context: int = 64, stride: int | None = None, test_fraction: float = 0.1,
                 train_size: int | None = None, test_size: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_train, y_train, x_test, y_test): byte windows of the corpus (``train_size`` / ``test_size``:
    keep the first so many windows of each split, e.g. for a quick run)."""
    for what, value, low in (("context", context, 1), ("stride", stride, 1), ("train_size", train_size, 1),
                             ("test_size", test_size, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ValueError(f"{what} must be an integer ≥ {low}, got {value!r}")
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    data = torch.frombuffer(bytearray(corpus_bytes()), dtype=torch.uint8).long()
    cut = int(len(data) * (1.0 - float(test_fraction)))
    x_train, y_train = windows(data[:cut], context, stride or context)
    x_test, y_test = windows(data[cut:], context, context)
    return x_train[:train_size], y_train[:train_size], x_test[:test_size], y_test[:test_size]
