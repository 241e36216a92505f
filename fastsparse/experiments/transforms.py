"""The standard ImageNet transforms, written with Pillow and torch alone (no torchvision).

Training: a random resized crop (a box of 8%–100% of the image's area, aspect ratio w/h
log-uniform in [3/4, 4/3], at a uniform position) resized to ``size`` × ``size``, then a
horizontal flip with probability 1/2. Evaluation: the shorter side resized to
``round(size / 0.875)`` (256 for 224), then the centre ``size`` × ``size``. Both give uint8
(3, size, size) tensors; :func:`normalise` turns a batch of them into float inputs with
ImageNet's mean and std (done after the batch reaches its device: a quarter of the bytes to move).

Every random draw comes from the ``torch.Generator`` passed in, so a crop is a pure function
of the image and the generator's seed.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "CROP_FRACTION", "SCALE", "RATIO", "crop_box", "random_resized_crop",
           "random_flip", "centre_crop", "to_uint8", "normalise", "train_transform", "eval_transform"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_FRACTION = 0.875
SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)
_TRIES = 10


def crop_box(width: int, height: int, generator: torch.Generator, scale: tuple[float, float] = SCALE,
             ratio: tuple[float, float] = RATIO) -> tuple[int, int, int, int]:
    """(left, top, w, h) of a random crop of a width × height image.

    Up to ten draws of an area ``a = U(scale) · width · height`` and a ratio
    ``r = exp(U(log ratio))`` give ``w = round(sqrt(a r))``, ``h = round(sqrt(a / r))``; the first
    that fits the image is placed uniformly at random. When none fits (a very long or thin
    image), the whole image cut to the nearest allowed ratio, centred."""
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(_TRIES):
        u_area, u_ratio, u_left, u_top = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
        area = width * height * (scale[0] + u_area * (scale[1] - scale[0]))
        r = math.exp(log_lo + u_ratio * (log_hi - log_lo))
        w, h = round(math.sqrt(area * r)), round(math.sqrt(area / r))
        if 0 < w <= width and 0 < h <= height:
            return int(u_left * (width - w + 1)), int(u_top * (height - h + 1)), w, h
    w, h = width, height
    if width / height < ratio[0]:
        h = round(width / ratio[0])
    elif width / height > ratio[1]:
        w = round(height * ratio[1])
    return (width - w) // 2, (height - h) // 2, w, h


def random_resized_crop(img, size: int, generator: torch.Generator):
    """The box of :func:`crop_box`, resized (bilinear) to size × size."""
    from PIL import Image

    left, top, w, h = crop_box(img.width, img.height, generator)
    return img.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))


def random_flip(img, generator: torch.Generator):
    """The image mirrored left to right with probability 1/2."""
    from PIL import Image

    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if float(torch.rand((), generator=generator)) < 0.5 else img


def centre_crop(img, size: int, fraction: float = CROP_FRACTION):
    """The shorter side resized (bilinear) to ``round(size / fraction)``, then the centre size × size
    (left = (w - size) // 2, top = (h - size) // 2)."""
    from PIL import Image

    short = round(size / fraction)
    scale = short / min(img.width, img.height)
    w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
    if (w, h) != img.size:
        img = img.resize((w, h), Image.BILINEAR)
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def to_uint8(img) -> Tensor:
    """An RGB PIL image as a uint8 (3, h, w) tensor (the planes split by Pillow: no strided copy)."""
    data = torch.frombuffer(bytearray(b"".join(band.tobytes() for band in img.split())), dtype=torch.uint8)
    return data.view(3, img.height, img.width)


def normalise(x: Tensor, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD) -> Tensor:
    """uint8 images (N, C, H, W) as float32 ``(x / 255 - mean) / std`` per channel, on x's device."""
    shape = (1, -1, 1, 1)
    m = torch.tensor(mean, device=x.device).view(shape)
    s = torch.tensor(std, device=x.device).view(shape)
    return (x.float().div_(255.0) - m) / s


def train_transform(img, size: int, generator: torch.Generator) -> Tensor:
    """Random resized crop to size × size, random horizontal flip, as uint8 (3, size, size)."""
    return to_uint8(random_flip(random_resized_crop(img, size, generator), generator))


def eval_transform(img, size: int) -> Tensor:
    """Resize the shorter side to size / 0.875, centre crop size × size, as uint8 (3, size, size)."""
    return to_uint8(centre_crop(img, size))
