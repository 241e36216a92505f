"""Image folders read on the fly: the transforms on hand-made images (pixels, flip, crop bounds,
normalisation), seeded crops that differ between workers and images but not between worker counts,
a training run on a generated folder through the command line (and its bit-identical resume),
unreadable files, and peak memory that does not grow with the folder."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from fastsparse.experiments.cli import app
from fastsparse.experiments.data import check_dataset, load_dataset
from fastsparse.experiments.imagefolder import FileList, crop_seed
from fastsparse.experiments.transforms import (
    IMAGENET_MEAN, IMAGENET_STD, centre_crop, crop_box, normalise, random_flip, to_uint8, train_transform,
)

Image = pytest.importorskip("PIL.Image")   # pillow is in the dev extras
CPU = torch.device("cpu")
COLOURS = ((200, 30, 30), (30, 200, 30), (30, 30, 200))


def write_folder(root: Path, per_class: int, per_class_val: int, size: int = 32) -> None:
    """root/{train,val}/c<k>/: 32x32 images, class k red, green or blue under seeded noise (so that
    every crop and flip shows in the pixels); every third a JPEG."""
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", per_class), ("val", per_class_val)):
        for c, colour in enumerate(COLOURS):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True, exist_ok=True)
            noise = torch.randint(-50, 51, (n, size, size, 3), generator=g, dtype=torch.int16)
            pixels = (noise + torch.tensor(colour, dtype=torch.int16)).clamp(0, 255).to(torch.uint8)
            for i in range(n):
                Image.frombytes("RGB", (size, size), bytes(pixels[i].flatten().tolist())).save(
                    folder / f"{i}.{'jpg' if i % 3 == 0 else 'png'}")


def random_image(w: int, h: int, seed: int = 0):
    pixels = torch.randint(0, 256, (h, w, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return Image.frombytes("RGB", (w, h), bytes(pixels.flatten().tolist())), pixels


# --- the transforms --------------------------------------------------------------------------------
def test_eval_crop_without_resize_is_the_centre_pixels():
    img, pixels = random_image(8, 12)            # shorter side 8 = round(7 / 0.875): no resize
    out = to_uint8(centre_crop(img, 7))
    assert torch.equal(out, pixels[2:9, 0:7].permute(2, 0, 1))   # top (12 - 7) // 2 = 2, left 0


def test_eval_crop_resizes_the_shorter_side_to_size_over_0875():
    img = Image.new("RGB", (32, 16))
    for (x, y), colour in {(0, 0): (255, 0, 0), (16, 0): (0, 255, 0), (0, 8): (0, 0, 255), (16, 8): (9, 9, 9)}.items():
        img.paste(colour, (x, y, x + 16, y + 8))
    out = centre_crop(img, 7)                    # 32x16 -> 16x8, then the centre 7x7 from left 4, top 0
    assert out.size == (7, 7)
    t = to_uint8(out)
    assert t[:, 0, 0].tolist() == [255, 0, 0] and t[:, 0, 6].tolist() == [0, 255, 0]
    assert t[:, 6, 0].tolist() == [0, 0, 255] and t[:, 6, 6].tolist() == [9, 9, 9]


def test_flip_mirrors_half_the_time():
    img, pixels = random_image(5, 3)
    flips = 0
    for seed in range(400):
        out = to_uint8(random_flip(img, torch.Generator().manual_seed(seed)))
        mirrored = torch.equal(out, pixels.flip(1).permute(2, 0, 1))
        assert mirrored or torch.equal(out, pixels.permute(2, 0, 1))
        flips += mirrored
    assert 160 <= flips <= 240


def test_crop_boxes_keep_scale_and_ratio_bounds_over_many_draws():
    g = torch.Generator().manual_seed(0)
    w_img, h_img = 1000, 800
    fractions, log_ratios = [], []
    for _ in range(3000):
        left, top, w, h = crop_box(w_img, h_img, g)
        assert 0 <= left and left + w <= w_img and 0 <= top and top + h <= h_img
        fractions.append(w * h / (w_img * h_img))
        log_ratios.append(math.log(w / h))
    # w, h are rounded to pixels (at least 219 of them here): bounds hold within 0.5%
    assert 0.08 * 0.995 <= min(fractions) < 0.09 and 0.95 < max(fractions) <= 1.0
    assert math.log(3 / 4) - 0.005 <= min(log_ratios) and max(log_ratios) <= math.log(4 / 3) + 0.005
    assert min(log_ratios) < math.log(3 / 4) + 0.02 and max(log_ratios) > math.log(4 / 3) - 0.02   # both ends drawn


def test_a_crop_that_never_fits_takes_the_centre_at_the_nearest_ratio():
    # 1000 x 10: every box of >= 8% of the area is taller than 10 px at ratio <= 4/3
    assert crop_box(1000, 10, torch.Generator().manual_seed(0)) == (493, 0, 13, 10)
    assert crop_box(10, 1000, torch.Generator().manual_seed(0)) == (0, 493, 10, 13)


def test_normalisation_numbers():
    x = torch.tensor([255, 0, 51], dtype=torch.uint8).view(1, 3, 1, 1)
    got = normalise(x).flatten().tolist()
    want = [(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (0.2 - 0.406) / 0.225]
    assert got == pytest.approx(want, abs=1e-6) and (IMAGENET_MEAN, IMAGENET_STD) == ((0.485, 0.456, 0.406),
                                                                                        (0.229, 0.224, 0.225))


def test_train_transform_is_a_function_of_the_seed():
    img, _ = random_image(40, 30)
    a = train_transform(img, 16, torch.Generator().manual_seed(5))
    assert a.shape == (3, 16, 16) and a.dtype == torch.uint8
    assert torch.equal(a, train_transform(img, 16, torch.Generator().manual_seed(5)))
    assert not torch.equal(a, train_transform(img, 16, torch.Generator().manual_seed(6)))
    assert crop_seed(0, 3, 7) == crop_seed(0, 3, 7) and len({crop_seed(0, e, i) for e in range(5) for i in range(50)}) == 250


# --- the folder ------------------------------------------------------------------------------------
def test_the_file_list_holds_names_and_labels_only(tmp_path):
    write_folder(tmp_path, 4, 1)
    files = FileList.scan(tmp_path / "train", ["c0", "c1", "c2"])
    assert len(files) == 12 and files.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert [files.path(i).relative_to(tmp_path).as_posix() for i in (0, 1, 11)] == \
        ["train/c0/0.jpg", "train/c0/1.png", "train/c2/3.jpg"]
    assert files.names.numel() == sum(len(p.name) for p in (tmp_path / "train").rglob("*.*"))
    sub = files.select(torch.tensor([11, 0, 5]))
    assert [sub.path(i) for i in range(3)] == [files.path(11), files.path(0), files.path(5)]
    assert sub.labels.tolist() == [2, 0, 1]


def identical_images(root: Path, n: int) -> None:
    img, _ = random_image(48, 40, seed=1)
    for split in ("train", "val"):
        (root / split / "a").mkdir(parents=True)
        for i in range(n):
            img.save(root / split / "a" / f"{i:03d}.png")


def test_workers_draw_different_crops_and_the_worker_count_changes_none(tmp_path):
    identical_images(tmp_path, 32)                # the same picture 32 times: only the crops differ
    batches = list(torch.randperm(32, generator=torch.Generator().manual_seed(0)).split(8))
    runs = {}
    for workers in (0, 1, 2):
        data = load_dataset("imagefolder", root=str(tmp_path), image_size=16, workers=workers)
        runs[workers] = [x for x, _ in data.train_epoch(batches, CPU, seed=4, epoch=1)]
    for w in (1, 2):
        assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[w]))
    crops = torch.cat(runs[2])
    # batch 0 came from worker 0, batch 1 from worker 1: no crop repeats, within or across workers
    assert len({tuple(c.flatten().tolist()) for c in crops}) == 32
    again = [x for x, _ in data.train_epoch(batches, CPU, seed=4, epoch=2)]
    assert not any(torch.equal(a, b) for a, b in zip(runs[2], again))    # a new epoch, new crops


def test_no_images_and_bad_keys_are_one_clear_error(tmp_path):
    (tmp_path / "train" / "c0").mkdir(parents=True)
    (tmp_path / "val" / "c0").mkdir(parents=True)
    (tmp_path / "train" / "c0" / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"imagefolder: no images \(\.jpg, .*\) under .*train/<class>/"):
        load_dataset("imagefolder", root=str(tmp_path), workers=0)
    with pytest.raises(ValueError, match="workers must be a whole number"):
        check_dataset("imagefolder", root=str(tmp_path / "absent"), workers=True)


# --- a training run through the command line ---------------------------------------------------------
def config(root: Path, workers: int, epochs: int = 2, algorithm: str = "set") -> dict:
    return {"seed": 3, "epochs": epochs,
            "data": {"name": "imagefolder", "root": str(root), "image_size": 16, "batch_size": 64, "workers": workers},
            "model": {"name": "mlp", "sizes": [768, 32, 3]}, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
            "sparsity": {"algorithm": algorithm, "sparsity": 0.5, **({"update": {"freq": 10}} if algorithm == "set" else {})}}


def test_a_training_run_streams_a_generated_folder_through_the_cli(tmp_path):
    from fastsparse.experiments.runner import RunInterrupted, run

    write_folder(tmp_path / "images", 700, 40)    # 2100 training, 120 test images
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config(tmp_path / "images", workers=2)))
    result = CliRunner().invoke(app, ["train", str(path), "--out", str(tmp_path / "cli"), "-q"])
    assert result.exit_code == 0, result.output
    (run_dir,) = (tmp_path / "cli").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["test_accuracy"] >= 0.95 and summary["steps"] == 2 * 33

    # the same run with workers 0, interrupted after its first epoch and resumed: the same numbers, bit for bit
    def stop(epoch, metrics):
        if epoch == 1:
            raise RunInterrupted()
    with pytest.raises(RunInterrupted):
        run(config(tmp_path / "images", workers=0), tmp_path / "resumed", progress=False, on_epoch_end=stop)
    resumed = run(config(tmp_path / "images", workers=0), tmp_path / "resumed", progress=False, resume=True)
    lines = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (other,) = (tmp_path / "resumed").iterdir()
    again = [json.loads(s) for s in (other / "metrics.jsonl").read_text().splitlines()]
    drop = ("seconds",)
    assert [{k: v for k, v in m.items() if k not in drop} for m in lines] == \
        [{k: v for k, v in m.items() if k not in drop} for m in again]
    a, b = torch.load(run_dir / "model.pt", weights_only=True), torch.load(other / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a) and resumed["test_accuracy"] == summary["test_accuracy"]


@pytest.mark.parametrize("workers", [0, 2])
def test_an_unreadable_image_stops_training_with_one_line_naming_it(tmp_path, workers):
    write_folder(tmp_path / "images", 20, 2)
    bad = tmp_path / "images" / "train" / "c1" / "7.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config(tmp_path / "images", workers=workers, algorithm="static")))
    result = CliRunner().invoke(app, ["train", str(path), "--out", str(tmp_path / "runs"), "-q"])
    assert result.exit_code == 2
    lines = [s for s in result.output.splitlines() if s.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert lines[0].startswith(f"error: imagefolder: cannot read {bad} (") and "then continue the run with --resume" in lines[0]


def test_an_empty_folder_is_one_line_before_training(tmp_path):
    for split in ("train", "val"):
        (tmp_path / "images" / split / "c0").mkdir(parents=True)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config(tmp_path / "images", workers=0)))
    result = CliRunner().invoke(app, ["train", str(path), "--out", str(tmp_path / "runs"), "-q"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "data.root: imagefolder: no images" in result.output and not (tmp_path / "runs").exists()


# --- memory ---------------------------------------------------------------------------------------------
def test_peak_memory_does_not_grow_with_the_number_of_images(tmp_path):
    for name, per_class in (("warm", 10), ("small", 333), ("large", 1333)):   # 999 and 3999 training images
        write_folder(tmp_path / name, per_class, 10)
    script = Path(__file__).parent / "imagefolder_memory.py"
    # fixed malloc thresholds: glibc's adaptive ones move the peak by megabytes from run to run
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, str(script), *(str(tmp_path / n) for n in ("large", "small", "warm")), "32"],
                         capture_output=True, text=True, timeout=120, check=True, env=env)
    large, small, kept = map(int, out.stdout.split())
    # the control: holding the 999 decoded images (3 x 32 x 32 float32 each, 12 MB) shows in the measure
    assert kept - small > 0.8 * 999 * 3 * 32 * 32 * 4
    # streaming four times the images costs no more than the 3000 more names, labels and positions in
    # the shuffled order (~0.1 MB measured); a reader holding them would need 37 MB more
    assert large - small < 2**20, (large, small)


# --- two ranks --------------------------------------------------------------------------------------
@pytest.mark.distributed
def test_two_ranks_read_their_shares_with_the_same_crops_as_one_process(tmp_path):
    from fastsparse.experiments.runner import run

    write_folder(tmp_path / "images", 64, 4)      # 192 images: 3 global batches of 2 x 32
    cfg = {**config(tmp_path / "images", workers=1, epochs=1, algorithm="static"), "device": "cpu"}
    cfg["data"]["batch_size"] = 32
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           "29541", "-m", "fastsparse", "train", str(path), "--out", str(tmp_path / "two"), "--quiet"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one = run({**cfg, "data": {**cfg["data"], "batch_size": 64}}, tmp_path / "one", progress=False)
    (two_dir,) = (tmp_path / "two").iterdir()
    a = torch.load(two_dir / "model.pt", weights_only=True)
    b = torch.load(Path(one["run_dir"]) / "model.pt", weights_only=True)
    # each rank's half of a global batch, cropped as the one process crops it: the same step, up to rounding
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)
    assert json.loads((two_dir / "summary.json").read_text())["steps"] == one["steps"] == 3


def test_an_empty_share_of_a_batch_has_the_image_shape(tmp_path):
    write_folder(tmp_path, 2, 1)
    data = load_dataset("imagefolder", root=str(tmp_path), image_size=16, workers=0)
    (x, y), = data.train_epoch([torch.tensor([], dtype=torch.int64)], CPU)
    assert x.shape == (0, 3, 16, 16) and x.dtype == torch.float32 and y.shape == (0,)
