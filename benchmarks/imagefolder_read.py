"""How fast ``data: {name: imagefolder}`` reads, and that its memory does not grow with the folder.

    python benchmarks/imagefolder_read.py [--images 2000] [--workers 0 2] [--size 224]

writes a folder of ImageNet-sized JPEGs (500 x 375, 3 classes) to a temporary directory, then
reads one training epoch (random resized crop and flip to ``--size``) per worker count and prints
images per second; then the peak memory of listing and reading folders of 1,000 and 4,000 small
images (tests/imagefolder_memory.py, the measure of tests/test_imagefolder.py).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def write_jpegs(root: Path, n: int) -> None:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, count in (("train", n), ("val", 30)):
        for i in range(count):
            folder = root / split / f"c{i % 3}"
            folder.mkdir(parents=True, exist_ok=True)
            # smooth noise (JPEG-friendly, like a photo), 500 x 375
            small = torch.randint(0, 256, (3, 24, 32), generator=g, dtype=torch.uint8).float()
            big = torch.nn.functional.interpolate(small[None], size=(375, 500), mode="bilinear")[0]
            pixels = big.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous()
            Image.frombytes("RGB", (500, 375), bytes(pixels.flatten().tolist())).save(folder / f"{i}.jpg", quality=90)


def read_speed(root: Path, workers: int, size: int) -> float:
    from fastsparse.experiments.data import load_dataset

    data = load_dataset("imagefolder", root=str(root), image_size=size, workers=workers)
    batches = list(torch.randperm(data.n_train, generator=torch.Generator().manual_seed(0)).split(64))
    start = time.perf_counter()
    for _ in data.train_epoch(batches, torch.device("cpu"), seed=0, epoch=0):
        pass
    return data.n_train / (time.perf_counter() - start)


def memory(tmp: Path) -> tuple[int, int, int]:
    from test_imagefolder import write_folder

    for name, per_class in (("warm", 10), ("small", 333), ("large", 1333)):
        write_folder(tmp / name, per_class, 10)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "imagefolder_memory.py"),
                          *(str(tmp / n) for n in ("large", "small", "warm")), "32"],
                         capture_output=True, text=True, check=True, env=env)
    large, small, kept = map(int, out.stdout.split())
    return large, small, kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        write_jpegs(Path(tmp) / "jpegs", args.images)
        print(f"| workers | images/s ({args.images} JPEGs 500x375 -> {args.size}, {os.cpu_count()} CPUs) |")
        print("|---|---|")
        for w in args.workers:
            print(f"| {w} | {read_speed(Path(tmp) / 'jpegs', w, args.size):.0f} |")
        large, small, kept = memory(Path(tmp) / "memory")
        mb = 2 ** 20
        print(f"\npeak memory above the start: 3999 images {large / mb:.2f} MB, 999 images {small / mb:.2f} MB; "
              f"999 images kept in memory (the control) {kept / mb:.2f} MB")


if __name__ == "__main__":
    main()
