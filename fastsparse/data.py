"""Data sets the command line trains on. ``digits`` (scikit-learn's bundled 8x8 digits) needs
no download; it is the default and the data of every end-to-end test."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["load_digits_split"]


def load_digits_split(seed: int = 0, test_fraction: float = 0.25) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Digits as float32 inputs in [0, 1] (64 features) and int64 labels, split 75/25,
    stratified by class, with a fixed ``seed``: (x_train, y_train, x_test, y_test)."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the digits data set needs scikit-learn: pip install 'fastsparse[data]'") from e
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, stratify=y, random_state=seed)
    f = lambda a: torch.tensor(a / 16.0, dtype=torch.float32)  # noqa: E731
    i = lambda a: torch.tensor(a, dtype=torch.int64)  # noqa: E731
    return f(x_tr), i(y_tr), f(x_te), i(y_te)
