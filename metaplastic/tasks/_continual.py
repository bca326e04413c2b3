"""Class-incremental online learning over a long stream (``task.kind = "continual"``).

Each episode draws ``n_way`` classes (relabelled ``0..n_way-1``) and ``k_shot`` training and
``q_query`` query images of each, as N-way K-shot classification does. The classes are then
taught in ``stages`` groups of ``m = n_way / stages``, one group after another: stage ``s``
(classes ``s m .. (s+1) m - 1``) presents ``stage_steps`` samples, each drawn uniformly (with
replacement) from that group's ``m k_shot`` training images, one per online update. An
episode is ``T = stages * stage_steps`` updates long (5 stages of 1,000 on digits: 5,000),
so a rule must learn new classes without wiping out the old ones.

Meta-loss: query cross-entropy over the query images of *all* ``n_way`` classes after the
last update (what is left of the early classes, and what was learned of the late ones);
the score is that query accuracy. Reverse mode through 5,000 steps stores 5,000 copies of
the weights, so this task is meant for truncated meta-gradients (``train.truncation = L``):
the episode is cut into segments of ``L`` updates, and each segment's loss is the query
cross-entropy of the network at its end over the classes seen so far (see
:meth:`segments`, :meth:`run_segment`).
"""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import PRNGKeyArray

from .._errors import MetaplasticError
from ..inner._episode import (
    Episode,
    labelled_signals,
    query_metrics,
    scan_episode,
    start_carry,
)
from ._classification import ClassificationTask, draw_images
from ._data import ImagePool
from ._task import AbstractTask


class ContinualTask(AbstractTask):
    """Class-incremental online classification (see the module doc;
    ``task.kind = "continual"``)."""

    name: ClassVar[str] = "continual"
    #: classification's keys (no luminosity shift) and the stages
    options: ClassVar[tuple[str, ...]] = (
        *(k for k in ClassificationTask.options if k != "luminosity_shift"),
        "stages",
        "stage_steps",
    )
    n_way: int = eqx.field(static=True)
    k_shot: int = eqx.field(static=True)
    q_query: int = eqx.field(static=True)
    stages: int = eqx.field(static=True)
    stage_steps: int = eqx.field(static=True)
    objective: str = eqx.field(static=True, default="cross_entropy")
    temperature: float = eqx.field(static=True, default=1.0)
    weight_limit: float = eqx.field(static=True, default=0.0)

    def __check_init__(self):
        if self.stages < 1 or self.stage_steps < 1:
            raise MetaplasticError(
                f"task.stages and task.stage_steps must be at least 1, got {self.stages} and "
                f"{self.stage_steps}"
            )
        if self.n_way % self.stages:
            raise MetaplasticError(
                f"task.n_way = {self.n_way} classes cannot be split into task.stages = "
                f"{self.stages} equal groups; make n_way a multiple of stages"
            )

    @classmethod
    def from_config(cls, task, train) -> ContinualTask:
        return cls(
            task.n_way,
            task.k_shot,
            task.q_query,
            task.stages,
            task.stage_steps,
            objective=train.objective,
            temperature=train.query_temperature,
            weight_limit=train.weight_limit,
        )

    @property
    def per_stage(self) -> int:
        return self.n_way // self.stages

    def episode_length(self) -> int:
        return self.stages * self.stage_steps

    def check(self, pool: ImagePool, where: str = "task") -> None:
        ClassificationTask(self.n_way, self.k_shot, self.q_query).check(pool, where)

    def sample(self, key: PRNGKeyArray, pool: ImagePool) -> Episode:
        """The stage-by-stage training stream and the query set of every class."""
        k_cls, k_img, k_stream = jax.random.split(key, 3)
        rows = draw_images(k_cls, k_img, pool, self.n_way, self.k_shot + self.q_query)
        m, k = self.per_stage, self.k_shot
        T = self.episode_length()
        stage = jnp.arange(T) // self.stage_steps
        j = jax.random.randint(k_stream, (T,), 0, m * k)  # one of the stage's m * K images
        label = stage * m + j // k
        train_rows = rows[label, j % k]
        q_rows = rows[:, k:].reshape(-1)
        q_lab = jnp.repeat(jnp.arange(self.n_way), self.q_query)
        return Episode(
            train_x=pool.x[train_rows],
            train_y=label.astype(jnp.int32),
            query_x=pool.x[q_rows],
            query_y=q_lab.astype(jnp.int32),
        )

    # one whole episode (the query covers every class), its score and a diverged one's:
    # as for classification, on this task's stream
    run = ClassificationTask.run
    score = staticmethod(ClassificationTask.score)
    diverged_score = staticmethod(ClassificationTask.diverged_score)

    def segments(self, rule, net, feedback, key: PRNGKeyArray, pool: ImagePool, length: int):
        """The episode :meth:`run` would learn from ``key``, cut into segments of
        ``length`` updates: ``(carry0, xs, context)`` with ``xs`` the stream with a leading
        segment axis."""
        self.check_segments(length)
        T = self.episode_length()
        k_task, k_net = jax.random.split(key)
        ep = self.sample(k_task, pool)
        carry0 = start_carry(rule, net, feedback, k_net)
        xs = jax.tree_util.tree_map(
            lambda a: a.reshape(T // length, length, *a.shape[1:]), (ep.train_x, ep.train_y)
        )
        return carry0, xs, (carry0.net, ep.query_x, ep.query_y, length)

    def run_segment(self, rule, net, feedback, carry, stopped, seg, index, context, remat=False):
        """Segment ``index`` from ``carry``: ``(carry, stopped, loss, accuracy,
        diverged)``, the loss being the query cross-entropy at the segment's end over the
        classes seen so far (a stopped episode's carry stays where it stopped)."""
        start, qx, qy, length = context
        new, now, _ = scan_episode(
            rule,
            net,
            feedback,
            carry,
            seg,
            labelled_signals(net, feedback),
            weight_limit=self.weight_limit,
            remat=remat,
            limits_from=start,
        )
        new = jax.tree_util.tree_map(lambda a, b: jnp.where(stopped, a, b), carry, new)
        stopped = stopped | now
        seen = ((index + 1) * length - 1) // self.stage_steps  # the last stage begun
        mask = qy // self.per_stage <= seen
        loss, acc = query_metrics(net, new.net, qx, qy, self.objective, self.temperature, mask)
        leaves = jax.tree_util.tree_leaves(new.net)
        diverged = stopped | ~jnp.isfinite(loss)
        diverged = diverged | ~jnp.all(jnp.array([jnp.all(jnp.isfinite(w)) for w in leaves]))
        return new, stopped, loss, acc, diverged
