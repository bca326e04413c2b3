"""Data sets (no network access) and the seeded, disjoint meta-train / meta-test split."""

from __future__ import annotations

from dataclasses import dataclass

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from ._errors import MetaplasticError, unknown_name

DATASETS = ("digits",)


@dataclass(frozen=True)
class Dataset:
    """Images flattened to ``(n, d)`` float32 in [0, 1] and integer labels ``(n,)``."""

    name: str
    x: np.ndarray
    y: np.ndarray

    @property
    def n_classes(self) -> int:
        return int(self.y.max()) + 1

    @property
    def dim(self) -> int:
        return int(self.x.shape[1])


def load_dataset(name: str) -> Dataset:
    """Load a data set by name. ``digits``: scikit-learn's bundled 8x8 digits (1,797 images)."""
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        return Dataset("digits", (d.data / 16.0).astype(np.float32), d.target.astype(np.int32))
    raise unknown_name("data set", name, DATASETS, "task.dataset")


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
    """Split every class's images into disjoint meta-train and meta-test pools.

    The split is a seeded permutation per class; ``test_fraction`` of each class goes to
    meta-test. Returns ``(meta_train, meta_test)``.
    """
    if not 0.0 < test_fraction < 1.0:
        raise MetaplasticError(
            f"task.test_fraction must be strictly between 0 and 1, got {test_fraction}"
        )
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for c in range(ds.n_classes):
        rows = np.flatnonzero(ds.y == c)
        rows = rows[rng.permutation(len(rows))]
        n_test = int(round(test_fraction * len(rows)))
        test_idx.append(rows[:n_test])
        train_idx.append(rows[n_test:])
    return _pool(ds, train_idx), _pool(ds, test_idx)


def _pool(ds: Dataset, per_class: list[np.ndarray]) -> ImagePool:
    m = min(len(r) for r in per_class)
    if m == 0:
        raise MetaplasticError(
            f"data set {ds.name!r} has a class with no images on one side of the split; "
            "change task.test_fraction"
        )
    index = np.stack([r[:m] for r in per_class]).astype(np.int32)
    return ImagePool(x=jnp.asarray(ds.x), class_index=jnp.asarray(index))
