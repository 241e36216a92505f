"""Image folders (``root/train/<class>/*``, ``root/val/<class>/*``: ImageNet's layout) read on the fly.

Nothing per image is held but its file name and label, packed into two tensors (about 40 bytes
an image: ImageNet's 1.28M training images list in ~50 MB); each image is decoded with Pillow
in a DataLoader worker when its batch comes, and transformed there (:mod:`.transforms`:
random resized crop and flip for training, resize and centre crop for evaluation) to uint8;
the batch is normalised after it reaches its device.

Reproducible crops: image ``i`` of epoch ``e`` is cropped and flipped with a generator seeded
by a hash of (the run's ``seed``, ``e``, ``i``), whichever worker decodes it. The draws depend
neither on the number of workers nor on the order of the batches, so a resumed run, a run with
another ``workers``, and every rank of a distributed run see the same crop of the same image.

An image that cannot be decoded stops the run with one line naming the file
(:class:`UnreadableImage`); it is never skipped, which would change the batches silently.
"""
from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import Tensor

from .transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, normalise, train_transform

__all__ = ["IMAGE_EXTENSIONS", "ImageFolderData", "FileList", "UnreadableImage", "load_imagefolder",
           "imagefolder_split", "crop_seed", "EVAL_BATCH"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")
EVAL_BATCH = 250   # test images per batch: 1000 at 224 would be 600 MB a batch
_MARK = "imagefolder: cannot read "


class UnreadableImage(ValueError):
    """An image file Pillow cannot decode. Raised in a DataLoader worker, it reaches the training
    process with the worker's traceback around it; the one line of ours is kept."""

    def __init__(self, message: str):
        ours = [line[line.index(_MARK):] for line in message.splitlines() if _MARK in line]
        super().__init__(ours[-1] if ours else message)


def _classes(folder: Path) -> list[str]:
    return sorted(d.name for d in folder.iterdir() if d.is_dir())


def imagefolder_split(root: str | os.PathLike, train_dir: str = "train", test_dir: str = "val"
                      ) -> tuple[Path, Path, list[str]]:
    """(train folder, test folder, the sorted class names of the train folder); errors name the layout."""
    root = Path(root).expanduser()
    train, test = root / train_dir, root / test_dir
    for folder in (train, test):
        if not folder.is_dir():
            raise FileNotFoundError(f"imagefolder: {folder} does not exist; expected {root}/{train_dir}/<class>/<image> "
                                    f"and {root}/{test_dir}/<class>/<image> (ImageNet's layout), or set data.root")
    classes = _classes(train)
    if not classes:
        raise FileNotFoundError(f"imagefolder: {train} has no class folders")
    unknown = sorted(set(_classes(test)) - set(classes))
    if unknown:
        raise ValueError(f"imagefolder: {test} has classes that {train} lacks: {unknown[:5]}")
    return train, test, classes


def _image_names(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(e.name for e in os.scandir(folder) if e.is_file() and os.path.splitext(e.name)[1].lower()
                  in IMAGE_EXTENSIONS)


class FileList:
    """The images of a folder as file names packed in one uint8 tensor (``offsets[i]`` to
    ``offsets[i + 1]``) and int64 labels: no Python object per image, so forked workers share
    the list instead of copying it as they touch it."""

    def __init__(self, folder: Path, classes: Sequence[str], names: Tensor, offsets: Tensor, labels: Tensor):
        self.folder, self.classes = folder, list(classes)
        self.names, self.offsets, self.labels = names, offsets, labels

    @classmethod
    def scan(cls, folder: Path, classes: Sequence[str]) -> "FileList":
        """Every image under folder/<class>/, classes and files in sorted order."""
        parts, lengths, labels = [], [], []
        for label, name in enumerate(classes):
            files = [os.fsencode(f) for f in _image_names(folder / name)]
            if files:
                parts.append(torch.frombuffer(bytearray(b"".join(files)), dtype=torch.uint8))
                lengths.append(torch.tensor([len(f) for f in files], dtype=torch.int64))
                labels.append(torch.full((len(files),), label, dtype=torch.int64))
        if not parts:
            raise FileNotFoundError(f"imagefolder: no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}/<class>/")
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cat(lengths).cumsum(0)])
        return cls(folder, classes, torch.cat(parts), offsets, torch.cat(labels))

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, i: int) -> Path:
        name = os.fsdecode(bytes(self.names[int(self.offsets[i]):int(self.offsets[i + 1])]))
        return self.folder / self.classes[int(self.labels[i])] / name

    def select(self, idx: Tensor) -> "FileList":
        """The images at ``idx``, in that order."""
        starts, ends = self.offsets[idx], self.offsets[idx + 1]
        lengths = ends - starts
        owner = torch.repeat_interleave(torch.arange(len(idx)), lengths)
        within = torch.arange(int(lengths.sum())) - torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
        names = self.names[starts[owner] + within]
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        return FileList(self.folder, self.classes, names, offsets, self.labels[idx])


def crop_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of image ``index``'s crop and flip in ``epoch`` of a run seeded ``seed``: 63 bits of
    BLAKE2b over the three numbers."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class _Images(torch.utils.data.Dataset):
    """Map-style: key (i, seed) -> (uint8 image, label); a seed of None is the evaluation transform."""

    def __init__(self, files: FileList, size: int):
        self.files, self.size = files, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int | None]) -> tuple[Tensor, int]:
        from PIL import Image

        i, seed = key
        path = self.files.path(i)
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            why = (str(e).splitlines() or [""])[0][:120]
            raise UnreadableImage(f"{_MARK}{path} ({type(e).__name__}: {why}); "
                                  "replace it with a readable image (removing it changes the file list and so the "
                                  "batches), then continue the run with --resume") from None
        if seed is None:
            return eval_transform(img, self.size), int(self.files.labels[i])
        return train_transform(img, self.size, torch.Generator().manual_seed(seed)), int(self.files.labels[i])


def _collate(items: list[tuple[Tensor, int]], size: int) -> tuple[Tensor, Tensor]:
    if not items:   # a rank's empty share of a last global batch smaller than the world
        return torch.empty(0, 3, size, size, dtype=torch.uint8), torch.empty(0, dtype=torch.int64)
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items], dtype=torch.int64)


class _Keys:
    """A DataLoader's batch sampler: the keys of each batch, made when the batch is asked for."""

    def __init__(self, batches: Sequence[Tensor], seed: int | None, epoch: int):
        self.batches, self.seed, self.epoch = batches, seed, epoch

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[tuple[int, int | None]]]:
        for idx in self.batches:
            yield [(i, None if self.seed is None else crop_seed(self.seed, self.epoch, i)) for i in idx.tolist()]


class ImageFolderData:
    """Train and test file lists of an image folder, read batch by batch in ``workers`` processes
    (0: in the training process). The same batch methods as :class:`.data.Dataset`."""

    name = "imagefolder"
    mean, std = IMAGENET_MEAN, IMAGENET_STD

    def __init__(self, train: FileList, test: FileList, image_size: int, workers: int):
        self.train, self.test, self.image_size, self.workers = train, test, image_size, workers
        self.num_classes = len(train.classes)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (3, self.image_size, self.image_size)

    @property
    def n_train(self) -> int:
        return len(self.train)

    @property
    def n_test(self) -> int:
        return len(self.test)

    targets_per_example = 1   # a label per image
    sequences = False

    def _batches(self, files: FileList, keys: _Keys, device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
        loader = torch.utils.data.DataLoader(_Images(files, self.image_size), batch_sampler=keys,
                                             num_workers=self.workers,
                                             collate_fn=functools.partial(_collate, size=self.image_size),
                                             generator=torch.Generator().manual_seed(0))   # leaves torch's RNG alone
        batches = iter(loader)
        try:
            for x, y in batches:
                yield normalise(x.to(device), self.mean, self.std), y.to(device)
            return
        except UnreadableImage as e:
            message = str(e)
            e.__traceback__ = None   # it holds the loader in a reference cycle: cut it,
        del batches                  # so that the workers stop now, not when a collection finds the cycle
        raise UnreadableImage(message)

    def train_epoch(self, batches: Sequence[Tensor], device: torch.device, seed: int = 0, epoch: int = 0
                    ) -> Iterator[tuple[Tensor, Tensor]]:
        """The training images at each index tensor of ``batches``, randomly cropped and flipped
        (the draws of :func:`crop_seed`), as normalised inputs and labels on ``device``."""
        return self._batches(self.train, _Keys(batches, seed, epoch), device)

    def test_batches(self, batch_size: int, device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
        """The test images in order, centre-cropped, at most :data:`EVAL_BATCH` a batch."""
        return self._batches(self.test, _Keys(_ranges(self.n_test, min(batch_size, EVAL_BATCH)), None, 0), device)

    def train_in_order(self, batch_size: int, device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
        """The training images in order, centre-cropped (what a method scoring weights on data sees)."""
        return self._batches(self.train, _Keys(_ranges(self.n_train, batch_size), None, 0), device)


def _ranges(n: int, size: int) -> list[Tensor]:
    return list(torch.arange(n).split(size))


def _check_keys(image_size: object, workers: object) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be a whole number of DataLoader worker processes, 0 or more (0 reads "
                         f"in the training process), got {workers!r}")


def load_imagefolder(root: str = "data/imagenet", image_size: int = 224, train_dir: str = "train",
                     test_dir: str = "val", train_size: int | None = None, split_seed: int = 0,
                     num_classes: int | None = None, workers: int = 4) -> ImageFolderData:
    """Images in class folders (``root/train/<class>/*.JPEG``, ``root/val/<class>/*.JPEG``: the
    layout of ImageNet and of torchvision's ImageFolder), listed now and decoded when trained on,
    by ``workers`` DataLoader processes. ``train_size``: a seeded subset of the training images
    (``split_seed``). ``num_classes``, when given, is checked against the folder (and lets a dry
    run without the folder check the model's output size). Results do not depend on ``workers``."""
    _check_keys(image_size, workers)
    train, test, classes = imagefolder_split(root, train_dir, test_dir)
    if num_classes is not None and num_classes != len(classes):
        raise ValueError(f"imagefolder: data.num_classes is {num_classes}, but {train} has {len(classes)} class folders")
    train_files, test_files = FileList.scan(train, classes), FileList.scan(test, classes)
    if train_size is not None and train_size < len(train_files):
        idx = torch.randperm(len(train_files), generator=torch.Generator().manual_seed(split_seed))[:train_size]
        train_files = train_files.select(idx)
    return ImageFolderData(train_files, test_files, image_size, workers)


def check_imagefolder(root: str = "data/imagenet", image_size: int = 224, train_dir: str = "train",
                      test_dir: str = "val", workers: int = 4, **_: object) -> None:
    """The errors of :func:`load_imagefolder` about its keys and the folder, without listing the images."""
    _check_keys(image_size, workers)
    imagefolder_split(root, train_dir, test_dir)
