"""Data sets the command line trains on, as tensors in memory with fixed, seeded splits.

| name | what | files |
|---|---|---|
| ``digits`` | scikit-learn's bundled 8x8 digits (the default; no download) | none |
| ``mnist`` | MNIST from the four standard IDX files, gzipped or not | ``root`` |
| ``cifar10`` | CIFAR-10 from the standard python pickle batches | ``root`` |
| ``synthetic`` | a sparse teacher–student task: labels from a random sparse MLP | none |

Each loader returns a :class:`Dataset`: train and test inputs (float32, or uint8 images
normalised batch by batch by :meth:`Dataset.inputs`), int64 labels, the input shape and
the number of classes. scikit-learn is imported only by ``digits``.
"""
from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

__all__ = [
    "Dataset", "load_digits_split", "load_dataset", "check_dataset", "dataset_info", "DATASETS",
    "read_idx", "MNIST_FILES", "CIFAR10_FILES",
]


@dataclass
class Dataset:
    """Train/test tensors. Images stored as uint8 are scaled to [0, 1] and normalised by
    ``mean``/``std`` per channel in :meth:`inputs`, so a large set stays small in memory."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def inputs(self, x: Tensor) -> Tensor:
        if x.dtype != torch.uint8:
            return x
        x = x.float().div_(255.0)
        if self.mean is not None and self.std is not None:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            x = (x - torch.tensor(self.mean).view(shape)) / torch.tensor(self.std).view(shape)
        return x


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


def _digits(split_seed: int = 0, test_fraction: float = 0.25, flat: bool = False) -> Dataset:
    """The 1797 digits as 1x8x8 images (``flat``: 64 features), the split of :func:`load_digits_split`."""
    x_tr, y_tr, x_te, y_te = load_digits_split(split_seed, test_fraction)
    if not flat:
        x_tr, x_te = x_tr.view(-1, 1, 8, 8), x_te.view(-1, 1, 8, 8)
    return Dataset("digits", x_tr, y_tr, x_te, y_te, 10)


# --- MNIST: IDX files ----------------------------------------------------------------------------
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_TYPES = {0x08: torch.uint8, 0x09: torch.int8, 0x0B: torch.int16, 0x0C: torch.int32,
              0x0D: torch.float32, 0x0E: torch.float64}


def read_idx(path: str | os.PathLike) -> Tensor:
    """Read an IDX file (the MNIST format; ``.gz`` is decompressed): magic 0x0000TTDD, then
    D big-endian int32 sizes, then the data in big-endian type TT."""
    raw = Path(path).read_bytes()
    if str(path).endswith(".gz"):
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
    dtype, ndim = _IDX_TYPES[raw[2]], raw[3]
    dims = struct.unpack(f">{ndim}i", raw[4:4 + 4 * ndim])
    body = raw[4 + 4 * ndim:]
    itemsize = torch.empty((), dtype=dtype).element_size()
    count = 1
    for d in dims:
        count *= d
    if len(body) != count * itemsize:
        raise ValueError(f"{path}: the header says {dims} ({count * itemsize} bytes) but {len(body)} bytes follow")
    t = torch.frombuffer(bytearray(body), dtype=torch.uint8) if body else torch.empty(0, dtype=torch.uint8)
    if itemsize > 1 and sys.byteorder == "little":  # IDX is big-endian
        t = t.view(-1, itemsize).flip(1).reshape(-1)
    return t.view(dtype).reshape(dims).clone()


def _mnist_folder(root: str | os.PathLike) -> tuple[Path, dict[str, Path]]:
    root = Path(root).expanduser()
    expected = ", ".join(f"{f}[.gz]" for f in MNIST_FILES.values())
    best: tuple[Path, dict[str, Path]] = (root, {})
    for folder in (root, root / "MNIST" / "raw", root / "raw"):
        found = {}
        for key, base in MNIST_FILES.items():
            dotted = base.replace("-idx", ".idx")
            for name in (base, base + ".gz", dotted, dotted + ".gz"):
                if (folder / name).is_file():
                    found[key] = folder / name
                    break
        if len(found) == len(MNIST_FILES):
            return folder, found
        if len(found) > len(best[1]):
            best = (folder, found)
    if not root.is_dir():
        raise FileNotFoundError(f"MNIST: the folder {root} does not exist. Put the four standard IDX files "
                                f"({expected}) in it, or set data.root to the folder that holds them")
    folder, found = best
    missing = [f for k, f in MNIST_FILES.items() if k not in found]
    where = f"{folder}" if found else f"{root} (or {root / 'MNIST' / 'raw'})"
    raise FileNotFoundError(f"MNIST: {where} lacks {missing}; expected the four standard IDX files {expected}")


def _mnist(root: str = "data/mnist", train_size: int | None = None, split_seed: int = 0) -> Dataset:
    """MNIST: 60000 train and 10000 test 1x28x28 uint8 images (normalised to mean 0.1307, std 0.3081)."""
    _, files = _mnist_folder(root)
    x_tr, y_tr = read_idx(files["train_images"]), read_idx(files["train_labels"])
    x_te, y_te = read_idx(files["test_images"]), read_idx(files["test_labels"])
    for x, y, what in ((x_tr, y_tr, "train"), (x_te, y_te, "test")):
        if x.dim() != 3 or y.dim() != 1 or len(x) != len(y):
            raise ValueError(f"MNIST {what} files disagree: images {tuple(x.shape)}, labels {tuple(y.shape)}")
    ds = Dataset("mnist", x_tr.unsqueeze(1), y_tr.long(), x_te.unsqueeze(1), y_te.long(), 10,
                 (0.1307,), (0.3081,))
    return _subsample(ds, train_size, split_seed)


# --- CIFAR-10: python pickle batches -------------------------------------------------------------
CIFAR10_FILES = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batch dicts (numpy arrays, lists, bytes) and nothing else."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch file")


def _read_cifar_batch(path: Path) -> tuple[Tensor, Tensor]:
    with open(path, "rb") as f:
        d = _BatchUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    data = d.get(b"data", d.get("data"))
    labels = d.get(b"labels", d.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"{path} is not a CIFAR-10 batch (no 'data' and 'labels' entries)")
    x = torch.as_tensor(data, dtype=torch.uint8).reshape(-1, 3, 32, 32)
    y = torch.as_tensor(list(labels), dtype=torch.int64)
    if len(x) != len(y):
        raise ValueError(f"{path}: {len(x)} images but {len(y)} labels")
    return x, y


def _cifar_folder(root: str | os.PathLike) -> Path:
    root = Path(root).expanduser()
    for folder in (root, root / "cifar-10-batches-py"):
        if all((folder / f).is_file() for f in CIFAR10_FILES):
            return folder
    if not root.is_dir():
        raise FileNotFoundError(f"CIFAR-10: the folder {root} does not exist. Put the python version's batch "
                                f"files ({', '.join(CIFAR10_FILES)}) in it or in {root / 'cifar-10-batches-py'}, "
                                f"or set data.root to the folder that holds them")
    folder = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    missing = [f for f in CIFAR10_FILES if not (folder / f).is_file()]
    raise FileNotFoundError(f"CIFAR-10: {folder} lacks {missing}; expected the python batch files "
                            f"{', '.join(CIFAR10_FILES)}")


def _cifar10(root: str = "data/cifar10", train_size: int | None = None, split_seed: int = 0) -> Dataset:
    """CIFAR-10: 50000 train and 10000 test 3x32x32 uint8 images, normalised per channel."""
    folder = _cifar_folder(root)
    parts = [_read_cifar_batch(folder / f) for f in CIFAR10_FILES[:-1]]
    x_te, y_te = _read_cifar_batch(folder / "test_batch")
    ds = Dataset("cifar10", torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), x_te, y_te, 10,
                 (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    return _subsample(ds, train_size, split_seed)


def _subsample(ds: Dataset, train_size: int | None, seed: int) -> Dataset:
    """Keep a seeded random subset of ``train_size`` training examples (all when None)."""
    if train_size is None or train_size >= len(ds.x_train):
        return ds
    idx = torch.randperm(len(ds.x_train), generator=torch.Generator().manual_seed(seed))[:train_size]
    ds.x_train, ds.y_train = ds.x_train[idx], ds.y_train[idx]
    return ds


# --- synthetic teacher-student ---------------------------------------------------------------------
def _synthetic(features: int = 32, classes: int = 4, hidden: int = 64, teacher_density: float = 0.1,
               n_train: int = 2000, n_test: int = 1000, split_seed: int = 0) -> Dataset:
    """Gaussian inputs labelled by the argmax of a random sparse teacher MLP
    (features → hidden → classes, a fraction ``teacher_density`` of its weights non-zero, each
    class's logit standardised over the samples so the classes are balanced): a task a sparse
    student can solve exactly."""
    if not 0 < teacher_density <= 1:
        raise ValueError(f"teacher_density must be in (0, 1], got {teacher_density}")
    g = torch.Generator().manual_seed(split_seed)
    w1 = torch.randn(features, hidden, generator=g) * (torch.rand(features, hidden, generator=g) < teacher_density)
    w2 = torch.randn(hidden, classes, generator=g) * (torch.rand(hidden, classes, generator=g) < teacher_density)
    x = torch.randn(n_train + n_test, features, generator=g)
    logits = torch.relu(x @ w1) @ w2
    y = ((logits - logits.mean(0)) / (logits.std(0) + 1e-6)).argmax(1)  # standardised: balanced classes
    return Dataset("synthetic", x[:n_train], y[:n_train], x[n_train:], y[n_train:], classes)


DATASETS: dict[str, Callable[..., Dataset]] = {
    "digits": _digits, "mnist": _mnist, "cifar10": _cifar10, "synthetic": _synthetic,
}
_SHAPES = {"digits": ((1, 8, 8), 10), "mnist": ((1, 28, 28), 10), "cifar10": ((3, 32, 32), 10)}


def load_dataset(name: str, **kwargs) -> Dataset:
    """Load a data set of :data:`DATASETS` by name with its keyword arguments."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; valid names: {sorted(DATASETS)}")
    return DATASETS[name](**kwargs)


def check_dataset(name: str, **kwargs) -> None:
    """Raise the loader's error (missing folder or files) without reading the data."""
    if name == "mnist":
        _mnist_folder(kwargs.get("root", "data/mnist"))
    elif name == "cifar10":
        _cifar_folder(kwargs.get("root", "data/cifar10"))


def dataset_info(name: str, **kwargs) -> tuple[tuple[int, ...], int]:
    """(input_shape, num_classes) of a data set without loading it."""
    if name == "synthetic":
        return (int(kwargs.get("features", 32)),), int(kwargs.get("classes", 4))
    if name == "digits" and kwargs.get("flat"):
        return (64,), 10
    shape, classes = _SHAPES[name]
    return shape, classes

