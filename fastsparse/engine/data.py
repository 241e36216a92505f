"""What the engine may take from the data: one batch to score weights at attach, and the
training inputs for recipes that re-estimate statistics (BatchNorm after a superposition)."""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

__all__ = ["DataSource", "inputs_of"]


def inputs_of(batch: Any) -> Any:
    """The model's input in a batch: its first element (``(inputs, targets)``), or the batch itself."""
    return batch[0] if isinstance(batch, (list, tuple)) else batch


def _is_batch(data: Any) -> bool:
    return isinstance(data, (list, tuple)) and len(data) == 2 and isinstance(data[0], Tensor)


class DataSource:
    """``data`` as given to the engine: None, a batch ``(inputs, targets)``, an iterable of
    batches (a DataLoader), or a function returning one (read when first needed)."""

    def __init__(self, data: Any = None):
        if data is not None and not (_is_batch(data) or callable(data) or isinstance(data, Iterable)):
            raise TypeError(f"data must be a batch (inputs, targets), an iterable of batches or a function "
                            f"returning one, got {type(data).__name__}")
        self.data = data

    @property
    def given(self) -> bool:
        return self.data is not None

    def batches(self) -> Iterable:
        data = self.data() if callable(self.data) and not _is_batch(self.data) else self.data
        if data is None:
            return []
        return [data] if _is_batch(data) else data

    def batch(self) -> Any:
        """The first batch, or None without data."""
        if self.data is None:
            return None
        return next(iter(self.batches()), None)

    def inputs(self) -> Iterator:
        """Model inputs, batch by batch."""
        return (inputs_of(b) for b in self.batches())

    @staticmethod
    def gradients(model: nn.Module, batch: Any, loss_fn: Callable[[Tensor, Tensor], Tensor]) -> None:
        """Leave the gradients of one batch in ``.grad`` (eval mode: no BatchNorm statistics change).
        The first training step's ``zero_grad`` clears them."""
        training = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            model.zero_grad(set_to_none=True)
            x, y = batch
            device = next(model.parameters()).device
            with torch.enable_grad():
                loss_fn(model(x.to(device)), y.to(device)).backward()
        finally:
            for m, flag in training:
                m.training = flag
