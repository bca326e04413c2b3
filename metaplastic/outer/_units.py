"""Natural units for a rule's coefficients: the outer loop's coordinates.

A raw coefficient means different things on different tasks. On the pca task Oja's rule
``dW = eta (x y - W y^2)`` needs ``eta`` about four times larger when the inputs are
halved (both terms scale with the input power) and ten times smaller when the episode is ten
times longer; a term of degree four in the signals scales with their fourth power. An
optimiser that moves every raw coefficient by about the same amount per step (Adam moves each
by about ``lr``) is then too slow on one task and explodes the rule on the next.

``train.units = "episode"`` measures, once before training, how much each coefficient moves
the network's weights over a whole episode at the starting rule, and lets the outer loop work
in units of that::

    u_k   = rms(W_T) / rms(dW_T / d theta_k)        (over a few probe episodes)
    phi_k = theta_k / u_k

``W_T`` are the plastic weights at the end of an episode and ``dW_T / d theta_k`` their
first-order sensitivity to coefficient ``k`` (forward-mode derivative through the whole
online unroll). ``phi_k = 1`` means: this term alone moves the weights by about their own
size over one episode. That statement does not depend on the input dimension, the input
scale, the unroll length or the term's degree, so one outer learning rate and one L1 weight
serve all of them. The rule itself keeps its raw coefficients ``theta`` (what is exported);
only the optimiser's steps, the gradient clipping and the L1 penalty see ``phi``.

A coefficient with no measurable effect at the start (a term that is identically zero on
this task, such as every error monomial on the pca task) gets the median unit of the others.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jaxtyping import PRNGKeyArray

from .._errors import MetaplasticError
from ..rules._rules import AbstractRule
from ..tasks._problem import Problem

#: ``train.units`` values: raw coefficients, or units of per-episode weight change
UNITS = ("none", "episode")
#: probe episodes for :func:`episode_units`
PROBE_EPISODES = 8


def _final_weights(problem: Problem, static: AbstractRule, unravel):
    def f(flat, key):
        res = problem.episode(eqx.combine(unravel(flat), static), key)
        return jnp.concatenate([w.ravel() for w in res.state.W])

    return f


@eqx.filter_jit
def _sensitivities(problem: Problem, rule: AbstractRule, keys):
    """Per coefficient (flattened): rms over probe episodes and weights of dW_T/dtheta_k,
    and the rms of W_T itself."""
    params, static = eqx.partition(rule, eqx.is_inexact_array)
    flat, unravel = ravel_pytree(params)
    f = _final_weights(problem, static, unravel)

    def one(key):
        def along(t):
            return jax.jvp(lambda p: f(p, key), (flat,), (t,))

        w, jvp = jax.vmap(along)(jnp.eye(flat.size, dtype=flat.dtype))
        return w[0], jvp.T  # (n_w,), (n_w, P)

    w, jac = jax.lax.map(one, keys)  # (E, n_w), (E, n_w, P)
    jac = jnp.where(jnp.isfinite(jac), jac, 0.0)
    w = jnp.where(jnp.isfinite(w), w, 0.0)
    sens = jnp.sqrt(jnp.mean(jac * jac, axis=(0, 1)))
    ref = jnp.sqrt(jnp.mean(w * w))
    return sens, ref


def episode_units(
    problem: Problem, rule: AbstractRule, key: PRNGKeyArray, episodes: int = PROBE_EPISODES
):
    """The units ``u`` (a pytree shaped like the rule's array leaves; see the module doc)."""
    params, _ = eqx.partition(rule, eqx.is_inexact_array)
    flat, unravel = ravel_pytree(params)
    sens, ref = _sensitivities(problem, rule, jax.random.split(key, episodes))
    sens, ref = np.asarray(sens, np.float64), float(ref)
    if not (np.isfinite(ref) and ref > 0):
        raise MetaplasticError(
            "train.units = 'episode': the network's weights are zero or not finite at the end "
            "of the probe episodes; use train.units = 'none'"
        )
    live = sens > 1e-30 * max(ref, 1.0)
    units = np.empty_like(sens)
    units[live] = ref / sens[live]
    units[~live] = float(np.median(units[live])) if live.any() else 1.0
    return unravel(jnp.asarray(units, flat.dtype))


def units_record(units) -> list[float]:
    """The units as a flat list (for ``summary.json``)."""
    if units is None:
        return []
    flat, _ = ravel_pytree(units)
    return [float(x) for x in np.asarray(flat)]
