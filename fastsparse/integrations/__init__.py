"""Callbacks for training frameworks: thin shells over :class:`fastsparse.Sparsifier`.

* :mod:`fastsparse.integrations.fastai` (extra ``fastai``): ``DynamicSparseTrainingCallback``,
  ``SparsifyCallback``, ``SparseTrainingCallback``.
* :mod:`fastsparse.integrations.lightning` (extra ``lightning``): ``SparseLightningCallback``.
* :mod:`fastsparse.integrations.huggingface` (extra ``huggingface``): ``SparseTrainerCallback``.

Importing this package imports neither framework. The top-level names
(``fastsparse.DynamicSparseTrainingCallback`` and the others) are :class:`LazyClass`
stand-ins: the framework is imported the first time one is called, subclassed or has an
attribute read, so ``import fastsparse`` and ``from fastsparse import *`` work (and stay
fast) without fastai, Lightning or transformers installed.
"""
from __future__ import annotations

import importlib
import sys
from typing import Any

__all__ = ["LazyClass", "LAZY_NAMES"]

# top-level name -> (module, pip extra)
LAZY_NAMES: dict[str, tuple[str, str]] = {
    "DynamicSparseTrainingCallback": ("fastsparse.integrations.fastai", "fastai"),
    "SparsifyCallback": ("fastsparse.integrations.fastai", "fastai"),
    "SparseLightningCallback": ("fastsparse.integrations.lightning", "lightning"),
    "SparseTrainerCallback": ("fastsparse.integrations.huggingface", "huggingface"),
}


class LazyClass:
    """Stands for the class ``name`` of ``module`` until it is used.

    Calling it builds an instance of the real class; ``class C(lazy)`` subclasses the real
    class; ``isinstance(x, lazy)`` is answered without importing anything when the module
    was never imported (then no instance can exist).
    """

    def __init__(self, name: str, module: str, extra: str):
        self._name, self._module, self._extra = name, module, extra
        self.__name__ = self.__qualname__ = name
        self.__doc__ = f"{name} from {module} (needs the '{extra}' extra); imported on first use."

    def resolve(self) -> type:
        """The real class (imports its module and framework)."""
        try:
            module = importlib.import_module(self._module)
        except ImportError as e:
            raise ImportError(f"{self._name} needs {self._extra}: pip install 'fastsparse[{self._extra}]' "
                              f"({e})") from e
        return getattr(module, self._name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.resolve()(*args, **kwargs)

    def __mro_entries__(self, bases: tuple) -> tuple:
        return (self.resolve(),)

    def __instancecheck__(self, obj: Any) -> bool:
        module = sys.modules.get(self._module)
        return module is not None and isinstance(obj, getattr(module, self._name))

    def __subclasscheck__(self, cls: type) -> bool:
        module = sys.modules.get(self._module)
        return module is not None and issubclass(cls, getattr(module, self._name))

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):  # copy/pickle/inspect probes must not import a framework
            raise AttributeError(attr)
        return getattr(self.resolve(), attr)

    def __repr__(self) -> str:
        return f"<lazy {self._module}.{self._name}>"
