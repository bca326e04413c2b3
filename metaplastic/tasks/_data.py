"""Data sets (no network access) and the seeded, disjoint meta-train / meta-test split.

* ``digits``: scikit-learn's bundled 8x8 digits (always available; the embedded default).
* ``fashion_mnist``, ``mnist``: the four standard IDX files (gzip or raw) in a folder;
  Fashion-MNIST defaults to the Debian package ``dataset-fashion-mnist``'s folder.
* ``emnist``: ``emnist-<split>-{train,test}-{images-idx3,labels-idx1}-ubyte[.gz]`` in a folder.
* ``mnist1d``: generated locally by the ``mnist1d`` package (``make_dataset``).

Data sets with an official test split use it for meta-test and their training split for
meta-train; ``digits`` is split per class with a seeded permutation.
"""

from __future__ import annotations

import gzip
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from .._errors import MetaplasticError, unknown_name

DATASETS = ("digits", "fashion_mnist", "mnist", "emnist", "mnist1d")
DEFAULT_DIRS = {"fashion_mnist": "/usr/share/datasets/fashion-mnist"}
EMNIST_SPLITS = ("balanced", "byclass", "bymerge", "digits", "letters", "mnist")

_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (gzip-compressed or raw), validating its header.

    IDX layout: two zero bytes, a type code (0x08 uint8 ... 0x0E float64), the number of
    dimensions, one big-endian uint32 per dimension, then the data in C order.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise MetaplasticError(f"{path}: IDX file not found") from None
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise MetaplasticError(
            f"{path}: cannot read IDX file ({err}); the file is corrupt"
        ) from None
    if len(raw) < 4:
        raise MetaplasticError(f"{path}: truncated IDX file ({len(raw)} bytes, no header)")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or not 1 <= raw[3] <= 4:
        raise MetaplasticError(
            f"{path}: wrong IDX magic number 0x{raw[:4].hex()}; not an IDX image/label file"
        )
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise MetaplasticError(f"{path}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(raw[4:head], dtype=">u4"))
    need = math.prod(dims) * dtype.itemsize  # exact: np.prod wraps around past 2**63
    have = len(raw) - head
    if have != need:
        what = "truncated" if have < need else "has trailing bytes"
        raise MetaplasticError(
            f"{path}: IDX file {what}: header says {dims} ({need} bytes of data), found {have}"
        )
    try:
        arr = np.frombuffer(raw, dtype=dtype, offset=head).reshape(dims)
    except ValueError as err:  # e.g. (2**32 - 1, 0, 2**32 - 1): empty, yet too big for numpy
        raise MetaplasticError(
            f"{path}: IDX header says {dims}, which numpy cannot hold ({err})"
        ) from None
    return arr.astype(dtype.newbyteorder("="))


@dataclass(frozen=True)
class Dataset:
    """Inputs flattened to ``(n, d)`` float32 and integer labels ``0..C-1``.

    ``test_x`` / ``test_y`` hold the official test split where the data set has one.
    """

    name: str
    x: np.ndarray
    y: np.ndarray
    test_x: np.ndarray | None = None
    test_y: np.ndarray | None = None

    @property
    def n_classes(self) -> int:
        return int(self.y.max()) + 1

    @property
    def dim(self) -> int:
        return int(self.x.shape[1])


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _idx_pair(folder: Path, images: str, labels: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    x = read_idx(folder / images)
    y = read_idx(folder / labels)
    if x.ndim < 2 or y.ndim != 1:
        raise MetaplasticError(
            f"{folder / images}: expected images (n, h, w) and labels (n,), got {x.shape} and "
            f"{y.shape}; check the file names of the {name} files"
        )
    if x.shape[0] != y.shape[0]:
        raise MetaplasticError(
            f"{folder}: {images} holds {x.shape[0]} images but {labels} holds {y.shape[0]} "
            "labels; the files do not belong together"
        )
    return x, y


def _load_idx_dataset(name: str, data_dir: str, emnist_split: str) -> Dataset:
    folder = Path(data_dir or DEFAULT_DIRS.get(name, ""))
    if name == "emnist":
        if emnist_split not in EMNIST_SPLITS:
            raise unknown_name("EMNIST split", emnist_split, EMNIST_SPLITS, "task.emnist_split")
        stems = {s: f"emnist-{emnist_split}-{s}" for s in ("train", "test")}
        stems = {k: (f"{v}-images-idx3-ubyte", f"{v}-labels-idx1-ubyte") for k, v in stems.items()}
    else:
        stems = {
            "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
            "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
        }
    found = {k: tuple(_find(folder, s) for s in v) for k, v in stems.items()}
    missing = [s for k, v in stems.items() for s, f in zip(v, found[k], strict=True) if f is None]
    if not data_dir and name not in DEFAULT_DIRS:
        raise MetaplasticError(
            f"data set {name!r} needs task.data_dir: a folder holding {', '.join(missing)} "
            "(each optionally .gz)"
        )
    if missing:
        hint = (
            "install the Debian package dataset-fashion-mnist (apt-get install "
            "dataset-fashion-mnist) or set task.data_dir"
            if name == "fashion_mnist"
            else "set task.data_dir to the folder that holds them"
        )
        raise MetaplasticError(
            f"{name} files not found in {folder}: missing {', '.join(missing)} (or .gz); {hint}"
        )
    parts = {}
    for split, (img, lab) in found.items():
        x, y = _idx_pair(folder, img.name, lab.name, name)
        if name == "emnist":
            x = np.swapaxes(x, 1, 2)  # EMNIST images are stored transposed
        parts[split] = (x.reshape(x.shape[0], -1).astype(np.float32) / 255.0, y.astype(np.int64))
    labels = np.unique(np.concatenate([parts["train"][1], parts["test"][1]]))
    remap = np.full(int(labels.max()) + 1, -1, np.int32)
    remap[labels] = np.arange(labels.size, dtype=np.int32)  # e.g. EMNIST letters 1..26 -> 0..25
    (xtr, ytr), (xte, yte) = parts["train"], parts["test"]
    return Dataset(name, xtr, remap[ytr], xte, remap[yte])


def load_dataset(name: str, data_dir: str = "", emnist_split: str = "balanced") -> Dataset:
    """Load a data set by name (see the module docstring)."""
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        return Dataset("digits", (d.data / 16.0).astype(np.float32), d.target.astype(np.int32))
    if name in ("fashion_mnist", "mnist", "emnist"):
        return _load_idx_dataset(name, data_dir, emnist_split)
    if name == "mnist1d":
        try:
            from mnist1d.data import get_dataset_args, make_dataset
        except ImportError:
            raise MetaplasticError(
                "data set 'mnist1d' needs the mnist1d package: pip install mnist1d"
            ) from None
        args = get_dataset_args()
        d = make_dataset(args)  # generated locally; never downloads
        return Dataset(
            "mnist1d",
            d["x"].astype(np.float32),
            d["y"].astype(np.int32),
            d["x_test"].astype(np.float32),
            d["y_test"].astype(np.int32),
        )
    raise unknown_name("data set", name, DATASETS, "task.dataset")


def train_test_arrays(ds: Dataset, seed: int = 0, test_fraction: float = 0.3):
    """``(train_x, train_y, test_x, test_y)`` for supervised studies.

    The official test split where the data set has one, else a seeded random split with
    ``test_fraction`` of the rows held out.
    """
    if ds.test_x is not None:
        return ds.x, ds.y, ds.test_x, ds.test_y
    perm = np.random.default_rng(seed).permutation(len(ds.y))
    cut = int((1.0 - test_fraction) * len(perm))
    return ds.x[perm[:cut]], ds.y[perm[:cut]], ds.x[perm[cut:]], ds.y[perm[cut:]]


class ImagePool(eqx.Module):
    """Images a task samples from, indexed per class: ``class_index[c]`` lists class c's rows.

    Every class keeps the same number of images (the smallest class count), so sampling
    is a fixed-shape gather that jit and vmap handle.
    """

    x: Float[Array, "n d"]
    class_index: Int[Array, "C M"]

    @property
    def n_classes(self) -> int:
        return int(self.class_index.shape[0])

    @property
    def per_class(self) -> int:
        return int(self.class_index.shape[1])


def split_pools(ds: Dataset, test_fraction: float, seed: int) -> tuple[ImagePool, ImagePool]:
    """Disjoint meta-train and meta-test pools, ``(meta_train, meta_test)``.

    With an official test split: meta-train draws from the training images and meta-test
    from the test images. Otherwise every class's images are split by a seeded permutation,
    ``test_fraction`` of each class going to meta-test. Rows are shuffled per class (seeded)
    in both cases.
    """
    if not 0.0 < test_fraction < 1.0:
        raise MetaplasticError(
            f"task.test_fraction must be strictly between 0 and 1, got {test_fraction}"
        )
    rng = np.random.default_rng(seed)
    if ds.test_x is not None:
        tr = [rng.permutation(np.flatnonzero(ds.y == c)) for c in range(ds.n_classes)]
        te = [rng.permutation(np.flatnonzero(ds.test_y == c)) for c in range(ds.n_classes)]
        return _pool(ds.name, ds.x, tr), _pool(ds.name, ds.test_x, te)
    train_idx, test_idx = [], []
    for c in range(ds.n_classes):
        rows = np.flatnonzero(ds.y == c)
        rows = rows[rng.permutation(len(rows))]
        n_test = int(round(test_fraction * len(rows)))
        test_idx.append(rows[:n_test])
        train_idx.append(rows[n_test:])
    return _pool(ds.name, ds.x, train_idx), _pool(ds.name, ds.x, test_idx)


def split_validation(
    pool: ImagePool, fraction: float, min_per_class: int = 1
) -> tuple[ImagePool, ImagePool]:
    """Split each class of ``pool`` into ``(meta_train, validation)``: the last ``fraction``
    of every class's (already shuffled) rows go to validation, but at least
    ``min_per_class`` (what one episode draws per class). The two are disjoint, and both
    are disjoint from the meta-test pool ``pool`` was split from."""
    if not 0.0 < fraction < 1.0:
        raise MetaplasticError(
            f"task.val_fraction must be strictly between 0 and 1, got {fraction}"
        )
    m = pool.per_class
    n_val = max(int(round(fraction * m)), min_per_class)
    if n_val < 1 or n_val >= m:
        raise MetaplasticError(
            f"task.val_fraction={fraction} leaves {m - n_val} meta-train and {n_val} validation "
            f"images per class (of {m}); choose a fraction that keeps both above 0"
        )
    idx = pool.class_index
    return (
        ImagePool(x=pool.x, class_index=idx[:, : m - n_val]),
        ImagePool(x=pool.x, class_index=idx[:, m - n_val :]),
    )


def _pool(name: str, x: np.ndarray, per_class: list[np.ndarray]) -> ImagePool:
    m = min(len(r) for r in per_class)
    if m == 0:
        raise MetaplasticError(
            f"data set {name!r} has a class with no images on one side of the split; "
            "change task.test_fraction"
        )
    index = np.stack([r[:m] for r in per_class]).astype(np.int32)
    return ImagePool(x=jnp.asarray(x), class_index=jnp.asarray(index))
