"""The meta-objective shared by the outer loops and the evaluation code."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, PRNGKeyArray

from ..inner._network import AbstractNetwork
from ..rules._rules import AbstractRule
from ._data import ImagePool
from ._task import AbstractTask


class Problem(eqx.Module):
    """Everything fixed during meta-training except the rule: network, credit pathway
    (``feedback``: an :class:`~metaplastic.inner.AbstractCreditPathway` or its name), task,
    data."""

    net: AbstractNetwork
    feedback: Any = eqx.field(static=True)
    task: AbstractTask
    pool: ImagePool | None
    #: jax.checkpoint of the inner scan (``scan_episode``'s ``remat``: False, True = each
    #: step, k > 1 = segments of k steps, -1 = sqrt(T) segments); "reconstruct" or
    #: "reconstruct:K": reverse mode rebuilds the carries backwards (anchors every K steps)
    remat: bool | int | str = eqx.field(static=True, default=False)

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
        """Query accuracy of each episode (one per key); a diverged episode scores 0."""
        return self.outcomes(rule, keys, "accuracy")[0]

    def scores(self, rule: AbstractRule, keys: PRNGKeyArray) -> Array:
        """What decisions after training maximise (the task's :meth:`score` per episode);
        a diverged episode gets the task's ``diverged_score``."""
        return self.outcomes(rule, keys, "score")[0]

    def outcomes(self, rule: AbstractRule, keys: PRNGKeyArray, metric: str = "accuracy"):
        """``(values, diverged)`` per episode: the query accuracy (``metric="accuracy"``)
        or the task's score, and whether the episode blew up (non-finite weights or query
        loss). Diverged episodes never count as chance: their accuracy is 0 and their score
        the task's ``diverged_score`` (the worst a working network can do)."""

        worst = 0.0 if metric == "accuracy" else self.task.diverged_score()

        def one(k):
            res = self.episode(rule, k)
            v = res.query_accuracy if metric == "accuracy" else self.task.score(res)
            bad = res.diverged | ~jnp.isfinite(v)
            return jnp.where(bad, jnp.asarray(worst, v.dtype), v), bad

        return jax.vmap(one)(keys)


@eqx.filter_jit
def _outcomes(problem: Problem, rule: AbstractRule, keys, metric: str):
    return problem.outcomes(rule, keys, metric)


def evaluate_rule(
    problem: Problem,
    rule: AbstractRule,
    key: PRNGKeyArray,
    episodes: int,
    chunk: int = 256,
    metric: str = "accuracy",
):
    """Query accuracies (or ``metric="score"``: :meth:`Problem.scores`) on ``episodes``
    episodes drawn from ``key`` (numpy array); diverged episodes score 0 (accuracy) or the
    task's ``diverged_score``."""
    return evaluate_outcomes(problem, rule, key, episodes, chunk, metric)[0]


def evaluate_outcomes(
    problem: Problem,
    rule: AbstractRule,
    key: PRNGKeyArray,
    episodes: int,
    chunk: int = 256,
    metric: str = "accuracy",
) -> tuple[np.ndarray, np.ndarray]:
    """``(values, diverged)`` numpy arrays over ``episodes`` episodes drawn from ``key``
    (see :meth:`Problem.outcomes`).

    Episodes run ``chunk`` at a time (vmapped); the last chunk is padded to the same size so
    that one compiled function serves every chunk.
    """
    if metric not in ("accuracy", "score"):
        raise ValueError(f"metric must be 'accuracy' or 'score', got {metric!r}")
    chunk = min(chunk, episodes)
    n_chunks = -(-episodes // chunk)
    keys = jax.random.split(key, episodes)
    keys = jnp.concatenate([keys, keys[: n_chunks * chunk - episodes]])  # pad; dropped below
    vals, bad = [], []
    for i in range(n_chunks):
        v, d = _outcomes(problem, rule, keys[i * chunk : (i + 1) * chunk], metric)
        vals.append(np.asarray(v))
        bad.append(np.asarray(d))
    return np.concatenate(vals)[:episodes], np.concatenate(bad)[:episodes]
