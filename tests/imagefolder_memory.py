"""Peak memory of listing an image folder and reading one epoch of it with ``workers: 0``, run in
its own process by tests/test_imagefolder.py: prints how far the peak resident set rose above the
resident set before, in bytes (Linux: the peak is reset through /proc/self/clear_refs, read as VmHWM).

    python tests/imagefolder_memory.py LARGE SMALL WARM IMAGE_SIZE

prints the growth for LARGE, for SMALL, and for SMALL again holding every batch it reads (what a
reader that keeps the decoded images in memory costs: the control). WARM is read first, so
imports and first-use allocations are not counted."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from fastsparse.experiments.data import load_dataset


def status_kb(key: str) -> int:
    line = next(s for s in Path("/proc/self/status").read_text().splitlines() if s.startswith(key + ":"))
    return int(line.split()[1])


def one_epoch(root: str, size: int, keep: list | None) -> None:
    data = load_dataset("imagefolder", root=root, image_size=size, workers=0)
    batches = list(torch.randperm(data.n_train, generator=torch.Generator().manual_seed(0)).split(64))
    for x, _ in data.train_epoch(batches, torch.device("cpu"), seed=0, epoch=0):
        if keep is not None:
            keep.append(x)
    for x, _ in data.test_batches(1000, torch.device("cpu")):
        if keep is not None:
            keep.append(x)


def growth(root: str, size: int, keep: bool = False) -> int:
    """Bytes the peak resident set rises above the resident set while ``root`` is listed and read."""
    kept: list | None = [] if keep else None
    Path("/proc/self/clear_refs").write_text("5")      # the peak starts again from here
    before = status_kb("VmRSS")
    one_epoch(root, size, kept)
    return (status_kb("VmHWM") - before) * 1024


if __name__ == "__main__":
    large, small, warm, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    one_epoch(warm, size, None)
    # the large folder first: the small one may reuse memory it freed, which can only hide growth
    print(growth(large, size), growth(small, size), growth(small, size, keep=True))
