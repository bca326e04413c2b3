"""Task families: ``task.sample(key, pool) -> Episode``."""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._errors import MetaplasticError
from ..inner._episode import Episode, episode_reconstruction_drift, run_episode
from ._data import ImagePool
from ._task import AbstractTask


class ClassificationTask(AbstractTask):
    """N-way K-shot online classification (``task.kind = "classification"``).

    Sample ``n_way`` classes without replacement, ``k_shot`` training and ``q_query`` query
    images per class (disjoint), relabel the classes ``0..n_way-1`` in sampled order, and
    shuffle the training stream. The training stream has ``n_way * k_shot`` samples,
    presented once, one per update.

    ``luminosity_shift = eps > 0`` (after Eyono et al. 2026): every image, training and
    query, gets one offset ``Delta ~ U(-eps, eps)`` added to all its pixels, then is clipped
    to ``[0, 1]`` (the pixel range of the built-in data sets).
    """

    name: ClassVar[str] = "classification"
    options: ClassVar[tuple[str, ...]] = (
        "dataset",
        "data_dir",
        "emnist_split",
        "test_fraction",
        "val_fraction",
        "split_seed",
        "n_way",
        "k_shot",
        "q_query",
        "luminosity_shift",
    )
    n_way: int = eqx.field(static=True)
    k_shot: int = eqx.field(static=True)
    q_query: int = eqx.field(static=True)
    objective: str = eqx.field(static=True, default="cross_entropy")
    temperature: float = eqx.field(static=True, default=1.0)
    weight_limit: float = eqx.field(static=True, default=0.0)
    luminosity_shift: float = eqx.field(static=True, default=0.0)

    def __check_init__(self):
        if not 0.0 <= self.luminosity_shift <= 1.0:
            raise MetaplasticError(
                f"task.luminosity_shift must lie in [0, 1], got {self.luminosity_shift}"
            )

    @classmethod
    def from_config(cls, task, train) -> ClassificationTask:
        return cls(
            task.n_way,
            task.k_shot,
            task.q_query,
            objective=train.objective,
            temperature=train.query_temperature,
            weight_limit=train.weight_limit,
            luminosity_shift=task.luminosity_shift,
        )

    def episode_length(self) -> int:
        return self.n_way * self.k_shot

    def check(self, pool: ImagePool, where: str = "task") -> None:
        """Raise a clear error when the pool cannot supply this task."""
        if self.n_way > pool.n_classes:
            raise MetaplasticError(
                f"{where}: n_way={self.n_way} is larger than the {pool.n_classes} classes of "
                "the data set; lower task.n_way"
            )
        if self.k_shot + self.q_query > pool.per_class:
            raise MetaplasticError(
                f"{where}: k_shot + q_query = {self.k_shot + self.q_query} is more than the "
                f"{pool.per_class} images per class on each side of the split; lower "
                "task.k_shot or task.q_query"
            )

    def run(
        self, rule, net, feedback, key: PRNGKeyArray, pool: ImagePool, remat=False, record=None
    ):
        """Sample one episode from ``pool`` and learn it online (:func:`run_episode`)."""
        k_task, k_net = jax.random.split(key)
        ep = self.sample(k_task, pool)
        return run_episode(
            rule,
            net,
            feedback,
            k_net,
            ep,
            remat=remat,
            objective=self.objective,
            temperature=self.temperature,
            weight_limit=self.weight_limit,
            record=record,
        )

    def reconstruction_drift(self, rule, net, feedback, key: PRNGKeyArray, pool, remat):
        k_task, k_net = jax.random.split(key)
        return episode_reconstruction_drift(
            rule,
            net,
            feedback,
            k_net,
            self.sample(k_task, pool),
            weight_limit=self.weight_limit,
            remat=remat,
        )

    @staticmethod
    def score(result) -> Array:
        """Query accuracy: what pruning by effect keeps within tolerance."""
        return result.query_accuracy

    @staticmethod
    def diverged_score() -> float:
        """The score a diverged episode gets: accuracy 0."""
        return 0.0

    def sample(self, key: PRNGKeyArray, pool: ImagePool) -> Episode:
        k_cls, k_img, k_order = jax.random.split(key, 3)
        rows = draw_images(k_cls, k_img, pool, self.n_way, self.k_shot + self.q_query)
        labels = jnp.broadcast_to(jnp.arange(self.n_way)[:, None], rows.shape)
        tr_rows = rows[:, : self.k_shot].reshape(-1)
        tr_lab = labels[:, : self.k_shot].reshape(-1)
        order = jax.random.permutation(k_order, tr_rows.shape[0])
        q_rows = rows[:, self.k_shot :].reshape(-1)
        q_lab = labels[:, self.k_shot :].reshape(-1)
        train_x, query_x = pool.x[tr_rows[order]], pool.x[q_rows]
        if self.luminosity_shift > 0:
            k_tr, k_q = jax.random.split(jax.random.fold_in(key, 1))
            train_x = self._shift(k_tr, train_x)
            query_x = self._shift(k_q, query_x)
        return Episode(
            train_x=train_x,
            train_y=tr_lab[order].astype(jnp.int32),
            query_x=query_x,
            query_y=q_lab.astype(jnp.int32),
        )

    def _shift(self, key: PRNGKeyArray, x: Array) -> Array:
        return luminosity_shift(key, x, self.luminosity_shift)


def draw_images(k_cls, k_img, pool: ImagePool, n_way: int, n_take: int) -> Array:
    """Rows of ``pool.x``, shape ``(n_way, n_take)``: ``n_way`` classes drawn without
    replacement with ``k_cls`` (row ``i`` is the class relabelled ``i``), ``n_take``
    distinct images of each in random order (``k_img``)."""
    classes = jax.random.choice(k_cls, pool.n_classes, (n_way,), replace=False)

    def pick(k, c):
        # n_take distinct images in random order: the top n_take of i.i.d. uniform keys.
        # A full permutation of the class (a sort of every key) cost about 25x more
        # (scripts/bench_kernels.py).
        _, idx = jax.lax.top_k(jax.random.uniform(k, (pool.per_class,)), n_take)
        return pool.class_index[c, idx]

    return jax.vmap(pick)(jax.random.split(k_img, n_way), classes)


def luminosity_shift(key: PRNGKeyArray, x: Float[Array, "n d"], eps) -> Float[Array, "n d"]:
    """Luminosity shift (Eyono et al. 2026): every image (row of ``x``) gets one offset
    ``Delta ~ U(-eps, eps)`` added to all its pixels, then is clipped to ``[0, 1]``."""
    delta = jax.random.uniform(key, (x.shape[0], 1), minval=-eps, maxval=eps, dtype=x.dtype)
    return jnp.clip(x + delta, 0.0, 1.0)
