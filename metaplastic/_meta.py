"""The meta-objective shared by the outer loops and the evaluation code."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, PRNGKeyArray
from scipy import stats

from ._data import ImagePool
from ._network import Network
from ._pca import PCATask
from ._rules import AbstractRule
from ._tasks import ClassificationTask


class Problem(eqx.Module):
    """Everything fixed during meta-training except the rule: network, feedback, task, data."""

    net: Network
    feedback: str = eqx.field(static=True)
    task: ClassificationTask | PCATask
    pool: ImagePool | None
    remat: bool = eqx.field(static=True, default=False)

    def episode(self, rule: AbstractRule, key: PRNGKeyArray):
        """Sample one episode and learn it online; returns the :class:`InnerResult`."""
        return self.task.run(rule, self.net, self.feedback, key, self.pool, remat=self.remat)

    def meta_loss(self, rule: AbstractRule, keys: PRNGKeyArray, l1: float):
        """``mean_episodes(query cross-entropy) + l1 * sum|theta|`` and its parts.

        Returns ``(loss, aux)`` with ``aux = {"query_loss", "query_accuracy", "diverged",
        "loss"}`` (means over the meta-batch; ``diverged`` is a count).
        """
        res = jax.vmap(lambda k: self.episode(rule, k))(keys)
        qloss = jnp.mean(res.query_loss)
        loss = qloss + l1 * rule.l1()
        aux = {
            "loss": loss,
            "query_loss": qloss,
            "query_accuracy": jnp.mean(res.query_accuracy),
            "diverged": jnp.sum(res.diverged.astype(jnp.int32)),
        }
        return loss, aux

    def accuracies(self, rule: AbstractRule, keys: PRNGKeyArray) -> Array:
        """Query accuracy of each episode (one per key)."""
        return jax.vmap(lambda k: self.episode(rule, k).query_accuracy)(keys)

    def scores(self, rule: AbstractRule, keys: PRNGKeyArray) -> Array:
        """What decisions after training maximise (the task's :meth:`score` per episode)."""
        return jax.vmap(lambda k: self.task.score(self.episode(rule, k)))(keys)


@eqx.filter_jit
def _accuracies(problem: Problem, rule: AbstractRule, keys):
    return problem.accuracies(rule, keys)


@eqx.filter_jit
def _scores(problem: Problem, rule: AbstractRule, keys):
    return problem.scores(rule, keys)


def evaluate_rule(
    problem: Problem,
    rule: AbstractRule,
    key: PRNGKeyArray,
    episodes: int,
    chunk: int = 256,
    metric: str = "accuracy",
):
    """Query accuracies (or ``metric="score"``: :meth:`Problem.scores`) on ``episodes``
    episodes drawn from ``key`` (numpy array).

    Episodes run ``chunk`` at a time (vmapped); the last chunk is padded to the same size so
    that one compiled function serves every chunk.
    """
    chunk = min(chunk, episodes)
    n_chunks = -(-episodes // chunk)
    keys = jax.random.split(key, episodes)
    keys = jnp.concatenate([keys, keys[: n_chunks * chunk - episodes]])  # pad; dropped below
    fn = _scores if metric == "score" else _accuracies
    out = [
        np.asarray(fn(problem, rule, keys[i * chunk : (i + 1) * chunk])) for i in range(n_chunks)
    ]
    return np.concatenate(out)[:episodes]


def mean_ci95(values) -> tuple[float, float, float]:
    """Mean and Student-t 95% confidence interval of the mean."""
    v = np.asarray(values, dtype=np.float64)
    m = float(v.mean())
    if v.size < 2:
        return m, m, m
    h = float(stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size))
    return m, m - h, m + h
