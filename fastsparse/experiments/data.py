"""Data sets the command line trains on, with fixed, seeded splits: in memory, or (image folders)
read from disk batch by batch.

| name | what | files |
|---|---|---|
| ``digits`` | scikit-learn's bundled 8x8 digits (the default; no download) | none |
| ``mnist`` | MNIST from the four standard IDX files, gzipped or not | ``root`` |
| ``cifar10`` | CIFAR-10 from the standard python pickle batches | ``root`` |
| ``cifar100`` | CIFAR-100 from the python pickles ``train`` and ``test`` (fine labels) | ``root`` |
| ``imagefolder`` | ``root/train/<class>/*`` and ``root/val/<class>/*`` images (ImageNet's layout), decoded on the fly (:mod:`.imagefolder`) | ``root`` |
| ``synthetic`` | a sparse teacher–student task: labels from a random sparse MLP | none |
| ``pydoc_topics`` | Python's own ``pydoc_data.topics`` text as bytes, for language models (:mod:`.text`) | none |

Each in-memory loader returns a :class:`Dataset`: train and test inputs (float32, or uint8 images
normalised batch by batch by :meth:`Dataset.inputs`), int64 labels, the input shape and
the number of classes; ``imagefolder`` returns an :class:`.imagefolder.ImageFolderData` with the
same batch methods (``train_epoch``, ``test_batches``, ``train_in_order``), which is all a
training loop uses. scikit-learn is imported only by ``digits``.
"""
from __future__ import annotations

import gzip
import math
import io
import os
import pickle
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, Union

import torch
from torch import Tensor

from .imagefolder import IMAGE_EXTENSIONS, ImageFolderData, check_imagefolder, imagefolder_split, load_imagefolder
from .text import VOCAB, pydoc_splits

__all__ = [
    "Dataset", "Data", "ImageFolderData", "load_digits_split", "load_dataset", "check_dataset", "dataset_info", "DATASETS",
    "read_idx", "MNIST_FILES", "CIFAR10_FILES", "CIFAR100_FILES", "IMAGE_EXTENSIONS",
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

    @property
    def n_train(self) -> int:
        return len(self.x_train)

    @property
    def n_test(self) -> int:
        return len(self.x_test)

    @property
    def targets_per_example(self) -> int:
        """1 for a classifier, the tokens of a window for a language model."""
        return self.y_train[0].numel()

    @property
    def sequences(self) -> bool:
        """Targets per token (a language model: perplexity is reported)."""
        return self.y_train.dim() > 1

    def train_epoch(self, batches: Sequence[Tensor], device: torch.device, seed: int = 0, epoch: int = 0
                    ) -> Iterator[tuple[Tensor, Tensor]]:
        """The training examples at each index tensor of ``batches``, as inputs and labels on
        ``device`` (``seed`` and ``epoch`` draw nothing here: these sets are not augmented)."""
        for idx in batches:
            yield self.inputs(self.x_train[idx]).to(device), self.y_train[idx].to(device)

    def test_batches(self, batch_size: int, device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
        """The test set in order, ``batch_size`` examples a batch."""
        for i in range(0, len(self.x_test), batch_size):
            yield self.inputs(self.x_test[i:i + batch_size]).to(device), self.y_test[i:i + batch_size].to(device)

    def train_in_order(self, batch_size: int, device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
        """The training set in order, ``batch_size`` examples a batch."""
        for i in range(0, len(self.x_train), batch_size):
            yield self.inputs(self.x_train[i:i + batch_size]).to(device), self.y_train[i:i + batch_size].to(device)


Data = Union[Dataset, ImageFolderData]


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


def _latin1(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as numpy's pickles use it (a str of bytes, latin-1), and only so."""
    if encoding not in ("latin1", "latin-1") or errors != "strict" or not isinstance(obj, str):
        raise pickle.UnpicklingError(f"refusing _codecs.encode({type(obj).__name__}, {encoding!r}) in a CIFAR file")
    return obj.encode("latin-1")


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batch dicts (numpy arrays, lists, bytes) and nothing else: the only
    callables a file may name are numpy's array and dtype constructors and a latin-1 encoder."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        if (module, name) == ("_codecs", "encode"):
            return _latin1
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch file")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refusing a persistent id in a CIFAR batch file")


def _read_cifar_batch(path: Path, label_key: str = "labels") -> tuple[Tensor, Tensor]:
    import numpy as np

    what = "CIFAR-10 batch" if label_key == "labels" else "CIFAR-100 file"
    with open(path, "rb") as f:
        d = _BatchUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    if not isinstance(d, dict):
        raise ValueError(f"{path} is not a {what} (it holds a {type(d).__name__}, not a dict)")
    data = d.get(b"data", d.get("data"))
    labels = d.get(label_key.encode(), d.get(label_key))
    if data is None or labels is None:
        raise ValueError(f"{path} is not a {what} (no 'data' and '{label_key}' entries)")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.size % 3072:
        kind = f"a {data.dtype} array of {data.size} values" if isinstance(data, np.ndarray) else \
            f"a {type(data).__name__}"
        raise ValueError(f"{path}: 'data' is {kind}; a {what} holds a uint8 array of 3072 values per image")
    labels = list(labels) if isinstance(labels, (list, tuple, np.ndarray)) else None
    if labels is None or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in labels):
        raise ValueError(f"{path}: '{label_key}' must be a list of integer class labels")
    x = torch.as_tensor(data, dtype=torch.uint8).reshape(-1, 3, 32, 32)
    y = torch.as_tensor([int(v) for v in labels], dtype=torch.int64)
    if len(x) != len(y):
        raise ValueError(f"{path}: {len(x)} images but {len(y)} labels")
    return x, y


def _find_files(root: str | os.PathLike, what: str, sub: str, files: Sequence[str]) -> Path:
    """The folder, ``root`` or ``root/sub``, that holds all of ``files``; else an error saying
    what is missing and where it was looked for."""
    root = Path(root).expanduser()
    for folder in (root, root / sub):
        if all((folder / f).is_file() for f in files):
            return folder
    listed = ", ".join(files)
    if not root.is_dir():
        raise FileNotFoundError(f"{what}: the folder {root} does not exist. Put the python version's files "
                                f"({listed}) in it or in {root / sub}, or set data.root to the folder that "
                                f"holds them")
    folder = root / sub if (root / sub).is_dir() else root
    missing = [f for f in files if not (folder / f).is_file()]
    raise FileNotFoundError(f"{what}: {folder} lacks {missing}; expected the python files {listed}")


def _cifar_folder(root: str | os.PathLike) -> Path:
    return _find_files(root, "CIFAR-10", "cifar-10-batches-py", CIFAR10_FILES)


def _cifar10(root: str = "data/cifar10", train_size: int | None = None, split_seed: int = 0) -> Dataset:
    """CIFAR-10: 50000 train and 10000 test 3x32x32 uint8 images, normalised per channel."""
    folder = _cifar_folder(root)
    parts = [_read_cifar_batch(folder / f) for f in CIFAR10_FILES[:-1]]
    x_te, y_te = _read_cifar_batch(folder / "test_batch")
    ds = Dataset("cifar10", torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), x_te, y_te, 10,
                 (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    return _subsample(ds, train_size, split_seed)


# --- CIFAR-100: python pickles ``train`` and ``test`` ---------------------------------------------
CIFAR100_FILES = ["train", "test"]


def _cifar100_folder(root: str | os.PathLike) -> Path:
    return _find_files(root, "CIFAR-100", "cifar-100-python", CIFAR100_FILES)


def _cifar100(root: str = "data/cifar100", train_size: int | None = None, split_seed: int = 0) -> Dataset:
    """CIFAR-100: 50000 train and 10000 test 3x32x32 uint8 images, the 100 fine labels,
    normalised per channel."""
    folder = _cifar100_folder(root)
    x_tr, y_tr = _read_cifar_batch(folder / "train", "fine_labels")
    x_te, y_te = _read_cifar_batch(folder / "test", "fine_labels")
    ds = Dataset("cifar100", x_tr, y_tr, x_te, y_te, 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
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
               n_train: int = 2000, n_test: int = 1000, split_seed: int = 0,
               shape: Sequence[int] | None = None) -> Dataset:
    """Gaussian inputs labelled by the argmax of a random sparse teacher MLP
    (features → hidden → classes, a fraction ``teacher_density`` of its weights non-zero, each
    class's logit standardised over the samples so the classes are balanced): a task a sparse
    student can solve exactly.

    ``shape`` (e.g. ``[3, 32, 32]``): inputs of that shape instead (``features`` is then their
    size), to smoke-test an image model and config on data of the right shape."""
    if not 0 < teacher_density <= 1:
        raise ValueError(f"teacher_density must be in (0, 1], got {teacher_density}")
    if shape is not None:
        shape = _check_shape(shape)
        features = math.prod(shape)
    g = torch.Generator().manual_seed(split_seed)
    w1 = torch.randn(features, hidden, generator=g) * (torch.rand(features, hidden, generator=g) < teacher_density)
    w2 = torch.randn(hidden, classes, generator=g) * (torch.rand(hidden, classes, generator=g) < teacher_density)
    x = torch.randn(n_train + n_test, features, generator=g)
    logits = torch.relu(x @ w1) @ w2
    y = ((logits - logits.mean(0)) / (logits.std(0) + 1e-6)).argmax(1)  # standardised: balanced classes
    if shape is not None:
        x = x.view(-1, *shape)
    return Dataset("synthetic", x[:n_train], y[:n_train], x[n_train:], y[n_train:], classes)


def _pydoc_topics(context: int = 64, stride: int | None = None, test_fraction: float = 0.1,
                  train_size: int | None = None, test_size: int | None = None) -> Dataset:
    """Python's ``pydoc_data.topics`` as byte windows for a language model (:mod:`.text`)."""
    return Dataset("pydoc_topics", *pydoc_splits(context, stride, test_fraction, train_size, test_size), VOCAB)


def _check_shape(shape: Any) -> tuple[int, ...]:
    if (not isinstance(shape, (list, tuple)) or not shape
            or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape)):
        raise ValueError(f"shape must be a list of positive integers such as [3, 32, 32], got {shape!r}")
    return tuple(int(d) for d in shape)


DATASETS: dict[str, Callable[..., Data]] = {
    "digits": _digits, "mnist": _mnist, "cifar10": _cifar10, "cifar100": _cifar100, "imagefolder": load_imagefolder,
    "synthetic": _synthetic, "pydoc_topics": _pydoc_topics,
}
_SHAPES = {"digits": ((1, 8, 8), 10), "mnist": ((1, 28, 28), 10), "cifar10": ((3, 32, 32), 10),
           "cifar100": ((3, 32, 32), 100)}


def load_dataset(name: str, **kwargs) -> Data:
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
    elif name == "cifar100":
        _cifar100_folder(kwargs.get("root", "data/cifar100"))
    elif name == "imagefolder":
        check_imagefolder(**kwargs)


def dataset_info(name: str, assume: bool = False, **kwargs) -> tuple[tuple[int, ...], int]:
    """(input_shape, num_classes) of a data set without loading it. With ``assume``, an image folder
    that is absent counts ``num_classes`` classes (ImageNet's 1000 when not given)."""
    if name == "synthetic":
        if kwargs.get("shape") is not None:
            return _check_shape(kwargs["shape"]), int(kwargs.get("classes", 4))
        return (int(kwargs.get("features", 32)),), int(kwargs.get("classes", 4))
    if name == "pydoc_topics":
        return (int(kwargs.get("context", 64)),), VOCAB
    if name == "digits" and kwargs.get("flat"):
        return (64,), 10
    if name == "imagefolder":
        size = int(kwargs.get("image_size", 224))
        try:
            train, _, classes = imagefolder_split(kwargs.get("root", "data/imagenet"),
                                                  kwargs.get("train_dir", "train"), kwargs.get("test_dir", "val"))
        except FileNotFoundError:
            if not assume:
                raise
            return (3, size, size), int(kwargs.get("num_classes") or 1000)
        return (3, size, size), len(classes)
    shape, classes = _SHAPES[name]
    return shape, classes

