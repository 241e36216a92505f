"""Data sets: digits, MNIST from IDX files and CIFAR-10 from pickle batches (small files written here in
the real formats), the synthetic teacher-student task, and the errors for missing files."""
from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from fastsparse.experiments.data import (
    CIFAR10_FILES, MNIST_FILES, Dataset, check_dataset, dataset_info, load_dataset, load_digits_split, read_idx,
)


def write_idx(path, array: np.ndarray, compress: bool = False) -> None:
    """The IDX format: 0, 0, type code, number of dimensions, big-endian int32 sizes, big-endian data."""
    codes = {np.uint8: 0x08, np.int32: 0x0C, np.float32: 0x0D}
    code = codes[array.dtype.type]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    body = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(body) if compress else body)


def write_mnist(folder, n_train=12, n_test=5, compress=False, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train).astype(np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test).astype(np.uint8),
    }
    for key, base in MNIST_FILES.items():
        write_idx(folder / (base + (".gz" if compress else "")), arrays[key], compress)
    return arrays


def write_cifar(folder, per_batch=4, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name in CIFAR10_FILES:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [b"x.png"] * per_batch}, f, protocol=2)
        batches[name] = (data, labels)
    return batches


def test_digits_split_is_fixed_stratified_and_images():
    ds = load_dataset("digits")
    again = load_dataset("digits")
    assert ds.input_shape == (1, 8, 8) and ds.num_classes == 10
    assert len(ds.x_train) == 1347 and len(ds.x_test) == 450
    assert torch.equal(ds.x_train, again.x_train) and torch.equal(ds.y_test, again.y_test)
    assert float(ds.x_train.min()) == 0.0 and float(ds.x_train.max()) == 1.0
    test, total = torch.bincount(ds.y_test, minlength=10), torch.bincount(torch.cat([ds.y_train, ds.y_test]))
    assert ((test - 0.25 * total).abs() <= 1).all()                   # stratified: a quarter of each class
    x_tr, y_tr, _, _ = load_digits_split()
    assert torch.equal(x_tr.view(-1, 1, 8, 8), ds.x_train) and torch.equal(y_tr, ds.y_train)
    other = load_dataset("digits", split_seed=1)
    assert not torch.equal(other.y_train, ds.y_train)
    assert load_dataset("digits", flat=True).input_shape == (64,) == dataset_info("digits", flat=True)[0]


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_reads_the_standard_idx_files(tmp_path, compress):
    arrays = write_mnist(tmp_path / "mnist", compress=compress)
    ds = load_dataset("mnist", root=str(tmp_path / "mnist"))
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    assert torch.equal(ds.x_train[:, 0], torch.from_numpy(arrays["train_images"]))
    assert torch.equal(ds.y_test, torch.from_numpy(arrays["test_labels"]).long())
    x = ds.inputs(ds.x_train[:2])
    expected = (torch.from_numpy(arrays["train_images"][:2]).float() / 255 - 0.1307) / 0.3081
    assert x.dtype == torch.float32 and torch.allclose(x[:, 0], expected)


def test_mnist_in_torchvisions_layout_and_a_seeded_subset(tmp_path):
    write_mnist(tmp_path / "MNIST" / "raw", n_train=20)
    a = load_dataset("mnist", root=str(tmp_path), train_size=8, split_seed=3)
    b = load_dataset("mnist", root=str(tmp_path), train_size=8, split_seed=3)
    assert len(a.x_train) == 8 and torch.equal(a.x_train, b.x_train)
    assert len(a.x_test) == 5


def test_read_idx_handles_wider_big_endian_types(tmp_path):
    values = np.array([[1, -2, 70000], [3, 4, -5]], dtype=np.int32)
    write_idx(tmp_path / "x.idx", values)
    assert read_idx(tmp_path / "x.idx").tolist() == values.tolist()
    (tmp_path / "bad.idx").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad.idx")
    (tmp_path / "short.idx").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">i", 10) + b"\x00" * 3)
    with pytest.raises(ValueError, match="header says"):
        read_idx(tmp_path / "short.idx")


def test_a_missing_mnist_folder_says_which_files_go_where(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("mnist", root=str(tmp_path / "nowhere"))
    message = str(info.value)
    assert "does not exist" in message and str(tmp_path / "nowhere") in message
    assert all(f in message for f in MNIST_FILES.values())
    folder = tmp_path / "partial"
    write_mnist(folder)
    (folder / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="lacks \\['t10k-labels-idx1-ubyte'\\]"):
        check_dataset("mnist", root=str(folder))


def test_cifar10_reads_the_python_batches(tmp_path):
    batches = write_cifar(tmp_path / "cifar-10-batches-py")
    ds = load_dataset("cifar10", root=str(tmp_path))
    assert ds.input_shape == (3, 32, 32) and len(ds.x_train) == 20 and len(ds.x_test) == 4
    data, labels = batches["data_batch_1"]
    # each row is 1024 red, then 1024 green, then 1024 blue values, row-major 32x32
    assert torch.equal(ds.x_train[0, 0], torch.from_numpy(data[0, :1024].reshape(32, 32)))
    assert torch.equal(ds.x_train[0, 2], torch.from_numpy(data[0, 2048:].reshape(32, 32)))
    assert ds.y_train[:4].tolist() == labels
    x = ds.inputs(ds.x_test)
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32


def test_cifar10_refuses_pickles_that_hold_code(tmp_path):
    write_cifar(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        load_dataset("cifar10", root=str(tmp_path))


def test_a_missing_cifar_folder_names_the_batch_files(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("cifar10", root=str(tmp_path / "none"))
    assert all(f in str(info.value) for f in CIFAR10_FILES)


def test_synthetic_teacher_student_is_seeded_and_balanced():
    a = load_dataset("synthetic", features=16, classes=3, n_train=600, n_test=300, split_seed=1)
    b = load_dataset("synthetic", features=16, classes=3, n_train=600, n_test=300, split_seed=1)
    c = load_dataset("synthetic", features=16, classes=3, n_train=600, n_test=300, split_seed=2)
    assert a.input_shape == (16,) and a.num_classes == 3 and len(a.x_test) == 300
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    assert not torch.equal(a.y_train, c.y_train)
    counts = torch.bincount(a.y_train, minlength=3)
    assert int(counts.min()) > 100                       # no class is starved
    assert dataset_info("synthetic", features=16, classes=3) == ((16,), 3)


def test_unknown_data_set_lists_the_valid_ones():
    with pytest.raises(ValueError, match="valid names"):
        load_dataset("imagenet")


def test_float_inputs_pass_through_unchanged():
    ds = Dataset("x", torch.rand(3, 4), torch.zeros(3, dtype=torch.long), torch.rand(2, 4),
                 torch.zeros(2, dtype=torch.long), 2)
    assert ds.inputs(ds.x_train) is ds.x_train


def write_cifar100(folder, n_train=6, n_test=3, seed=0):
    """The python version's two pickles: ``data`` (N, 3072) uint8, ``fine_labels`` 0..99, ``coarse_labels`` 0..19."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, n).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({b"filenames": [b"x.png"] * n, b"batch_label": name.encode(), b"fine_labels": fine,
                         b"coarse_labels": [x // 5 for x in fine], b"data": data}, f, protocol=2)
        out[name] = (data, fine)
    return out


def test_cifar100_reads_the_python_pickles_with_fine_labels(tmp_path):
    # what Sup-tickets' --data cifar100 reads: cifar-100-python/{train,test}
    files = write_cifar100(tmp_path / "cifar-100-python")
    ds = load_dataset("cifar100", root=str(tmp_path))
    assert ds.input_shape == (3, 32, 32) and ds.num_classes == 100
    assert len(ds.x_train) == 6 and len(ds.x_test) == 3
    data, fine = files["train"]
    assert torch.equal(ds.x_train[1, 1], torch.from_numpy(data[1, 1024:2048].reshape(32, 32)))
    assert ds.y_train.tolist() == fine and ds.y_test.tolist() == files["test"][1]
    assert dataset_info("cifar100") == ((3, 32, 32), 100)
    assert len(load_dataset("cifar100", root=str(tmp_path), train_size=4).x_train) == 4


def test_cifar100_missing_files_are_named(tmp_path):
    write_cifar100(tmp_path)
    (tmp_path / "test").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks \['test'\]"):
        check_dataset("cifar100", root=str(tmp_path))
    with open(tmp_path / "test", "wb") as f:
        pickle.dump({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]}, f)
    with pytest.raises(ValueError, match="not a CIFAR-100 file .*'fine_labels'"):
        load_dataset("cifar100", root=str(tmp_path))


def write_image_folder(root, sizes=((40, 30), (20, 50)), classes=("n01", "n02")):
    """root/{train,val}/<class>/<i>.png: solid-colour RGB images of the given (width, height)."""
    from PIL import Image

    for split in ("train", "val"):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i, size in enumerate(sizes):
                Image.new("RGB", size, (10 * c + i, 100, 200)).save(folder / f"{i}.png")


def test_imagefolder_lists_class_folders_and_reads_them_centre_cropped(tmp_path):
    write_image_folder(tmp_path)
    ds = load_dataset("imagefolder", root=str(tmp_path), image_size=16, workers=0)
    assert ds.input_shape == (3, 16, 16) and ds.num_classes == 2 and ds.n_train == 4 and ds.n_test == 4
    # sorted classes -> labels; the colour of each file survives the resize and crop
    assert ds.train.labels.tolist() == [0, 0, 1, 1]
    (x, y), = ds.test_batches(1000, torch.device("cpu"))
    assert y.tolist() == [0, 0, 1, 1] and x.shape == (4, 3, 16, 16) and x.dtype == torch.float32
    pixels = (x * torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
              + torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) * 255
    assert pixels.round()[:, 0, 8, 8].tolist() == [0, 1, 10, 11] and pixels.round()[3, 2].unique().tolist() == [200]
    assert x[0, 2, 0, 0].item() == pytest.approx((200 / 255 - 0.406) / 0.225, abs=1e-5)
    assert dataset_info("imagefolder", root=str(tmp_path), image_size=16) == ((3, 16, 16), 2)


def test_imagefolder_errors_say_what_layout_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"expected .*/train/<class>/<image>"):
        check_dataset("imagefolder", root=str(tmp_path))
    write_image_folder(tmp_path)
    (tmp_path / "val" / "n99").mkdir()
    with pytest.raises(ValueError, match=r"classes that .* lacks: \['n99'\]"):
        load_dataset("imagefolder", root=str(tmp_path), image_size=8)
    with pytest.raises(ValueError, match="image_size must be a positive integer"):
        load_dataset("imagefolder", root=str(tmp_path), image_size=0)
    with pytest.raises(ValueError, match=r"workers must be a whole number .* 0 or more .* got -1"):
        check_dataset("imagefolder", root=str(tmp_path), workers=-1)


@pytest.mark.parametrize("payload, words", [
    (np.array([1, 2, 3], dtype=object), "'data' is a object array"),          # object arrays hold arbitrary objects
    (np.zeros((2, 3072), dtype=np.float64), "'data' is a float64 array"),
    (b"\x00" * 3072, "'data' is a bytes"),
    (np.zeros((2, 100), dtype=np.uint8), "of 200 values"),
])
def test_cifar10_refuses_batches_that_are_not_uint8_image_arrays(tmp_path, payload, words):
    write_cifar(tmp_path)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": payload, b"labels": [0, 1]}, f, protocol=2)
    with pytest.raises(ValueError, match=words):
        load_dataset("cifar10", root=str(tmp_path))


def test_cifar10_refuses_a_codec_other_than_latin1(tmp_path):
    import _codecs

    class Encode:
        def __reduce__(self):
            return (_codecs.encode, ("x", "rot13"))

    write_cifar(tmp_path)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": Encode(), b"labels": []}, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refusing _codecs.encode"):
        load_dataset("cifar10", root=str(tmp_path))


@pytest.mark.parametrize("protocol", [0, 2, 4])   # the real files are protocol 2 (written by Python 2)
def test_cifar10_reads_the_pickle_protocols_of_numpy_arrays(tmp_path, protocol):
    batches = write_cifar(tmp_path)
    data, labels = batches["test_batch"]
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": data, b"labels": labels}, f, protocol=protocol)
    ds = load_dataset("cifar10", root=str(tmp_path))
    assert torch.equal(ds.x_test.reshape(len(labels), -1), torch.as_tensor(data))

