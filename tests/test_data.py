"""IDX reader and the data-set loaders: valid files, and every kind of damage."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from metaplastic._errors import MetaplasticError
from metaplastic.tasks._data import load_dataset, read_idx, split_pools

FASHION = Path("/usr/share/datasets/fashion-mnist")


def idx_bytes(arr: np.ndarray) -> bytes:
    code = {
        np.uint8: 0x08,
        np.int8: 0x09,
        np.int16: 0x0B,
        np.int32: 0x0C,
        np.float32: 0x0D,
        np.float64: 0x0E,
    }[arr.dtype.type]
    head = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_set(folder: Path, n_train=30, n_test=20, classes=3, prefix="", gz=True, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k" if not prefix else "test", n_test)):
        x = rng.integers(0, 256, size=(n, 4, 5), dtype=np.uint8)
        y = (np.arange(n) % classes).astype(np.uint8)
        for kind, arr, dims in (("images", x, 3), ("labels", y, 1)):
            name = f"{prefix}{split}-{kind}-idx{dims}-ubyte"
            data = idx_bytes(arr)
            if gz:
                (folder / (name + ".gz")).write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)
    return folder


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32, np.float64])
def test_read_idx_round_trip(tmp_path, dtype):
    arr = (np.arange(24).reshape(2, 3, 4) * 3).astype(dtype)
    (tmp_path / "a.idx").write_bytes(idx_bytes(arr))
    (tmp_path / "a.idx.gz").write_bytes(gzip.compress(idx_bytes(arr)))
    np.testing.assert_array_equal(read_idx(tmp_path / "a.idx"), arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.idx.gz"), arr)


@pytest.mark.parametrize(
    "mangle,msg",
    [
        (lambda b: b[:-3], "truncated"),
        (lambda b: b + b"\x00\x01", "trailing bytes"),
        (lambda b: b"\x08\x03" + b[2:], "wrong IDX magic"),
        (lambda b: b[:2] + b"\x42" + b[3:], "wrong IDX magic"),
        (lambda b: b[:6], "truncated IDX header"),
        (lambda b: b[:2], "truncated IDX file"),
    ],
)
def test_read_idx_damage(tmp_path, mangle, msg):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    p = tmp_path / "bad-idx3-ubyte"
    p.write_bytes(mangle(idx_bytes(arr)))
    with pytest.raises(MetaplasticError, match=msg) as err:
        read_idx(p)
    assert str(p) in str(err.value) and "\n" not in str(err.value)


def test_corrupt_gzip(tmp_path):
    good = gzip.compress(idx_bytes(np.zeros((50, 4), np.uint8)))
    p = tmp_path / "x.gz"
    p.write_bytes(good[: len(good) // 2])
    with pytest.raises(MetaplasticError, match="corrupt"):
        read_idx(p)


def test_idx_folder_loads_with_official_split(tmp_path):
    folder = write_set(tmp_path / "mn")
    ds = load_dataset("mnist", str(folder))
    assert ds.x.shape == (30, 20) and ds.test_x.shape == (20, 20)
    assert ds.x.dtype == np.float32 and 0.0 <= ds.x.min() and ds.x.max() <= 1.0
    tr, te = split_pools(ds, 0.5, 0)
    assert tr.per_class == 10 and te.per_class == 6  # from the train and test splits
    assert te.x.shape[0] == 20  # meta-test draws from the test images only


def test_raw_files_and_emnist_names(tmp_path):
    folder = write_set(tmp_path / "em", prefix="emnist-letters-", gz=False, classes=4)
    ds = load_dataset("emnist", str(folder), "letters")
    assert ds.n_classes == 4
    with pytest.raises(MetaplasticError, match="did you mean 'letters'"):
        load_dataset("emnist", str(folder), "leters")


def test_mismatched_counts(tmp_path):
    folder = write_set(tmp_path / "mm")
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(np.zeros(29, np.uint8)))
    )
    with pytest.raises(MetaplasticError, match="30 images but .* 29 labels"):
        load_dataset("mnist", str(folder))


def test_missing_files_say_how_to_get_them(tmp_path):
    with pytest.raises(MetaplasticError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion_mnist", str(tmp_path))
    with pytest.raises(MetaplasticError, match="needs task.data_dir"):
        load_dataset("mnist")
    with pytest.raises(MetaplasticError, match="did you mean 'mnist'"):
        load_dataset("mnistt")


def test_corrupted_idx_through_the_cli(tmp_path):
    from click.testing import CliRunner

    from metaplastic.run._cli import main

    folder = write_set(tmp_path / "c")
    p = folder / "train-images-idx3-ubyte.gz"
    p.write_bytes(p.read_bytes()[:-10])
    res = CliRunner().invoke(
        main,
        [
            "train",
            "--rule",
            "pool",
            "--task",
            "digits",
            "--set",
            "task.dataset='mnist'",
            "--set",
            f"task.data_dir='{folder}'",
            "--out",
            str(tmp_path / "r"),
        ],
    )
    assert res.exit_code == 2 and "corrupt" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_real_fashion_mnist():
    if not (FASHION / "train-images-idx3-ubyte.gz").exists():
        if os.environ.get("CI"):
            pytest.fail(".ci/run must install the Debian package dataset-fashion-mnist")
        pytest.skip("Debian package dataset-fashion-mnist not installed")
    ds = load_dataset("fashion_mnist")
    assert ds.x.shape == (60000, 784) and ds.test_x.shape == (10000, 784)
    assert ds.n_classes == 10 and np.bincount(ds.test_y).tolist() == [1000] * 10


def test_mnist1d_is_generated_locally():
    ds = load_dataset("mnist1d")
    assert ds.x.shape == (4000, 40) and ds.test_x.shape == (1000, 40) and ds.n_classes == 10
