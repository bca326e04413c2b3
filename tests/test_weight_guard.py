"""``train.weight_limit``: episodes that blow up stop at the bound with a finite, informative
meta-gradient, and still count as diverged."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from metaplastic.inner._network import Network
from metaplastic.outer import GradientTrainer
from metaplastic.rules._rule_kinds import TaylorRule, monomial_index
from metaplastic.rules._rules import TermPoolRule
from metaplastic.tasks._classification import ClassificationTask
from metaplastic.tasks._pca import PCATask
from metaplastic.tasks._problem import Problem


def _hebbian(c: float) -> TaylorRule:
    th = np.zeros(81, np.float32)
    th[monomial_index("x*y")] = c
    return TaylorRule(th)


def _pca(limit: float) -> Problem:
    net = Network((6, 1), activation="linear", bias=False)
    return Problem(net, "backprop", PCATask(6, 200, 0.7, weight_limit=limit), None)


def test_an_exploding_episode_stops_at_the_bound_with_a_finite_gradient_pointing_back():
    """Pure Hebbian learning at a large rate grows w exponentially: without the guard the
    weights overflow (NaN loss and gradient); with it the episode stops within 100x the
    start, is flagged diverged, and d loss / d theta(x*y) is finite and positive (lowering
    the Hebbian rate lowers the loss)."""
    key = jax.random.key(0)
    free = _pca(0.0).episode(_hebbian(0.5), key)
    assert not np.all(np.isfinite(np.asarray(free.state.W[0])))
    guarded = _pca(100.0)
    res = guarded.episode(_hebbian(0.5), key)
    w = np.asarray(res.state.W[0])
    w0 = np.asarray(PCATask(6, 200, 0.7).sample(key)[3])
    assert np.all(np.isfinite(w)) and np.max(np.abs(w)) <= 100 * np.max(np.abs(w0)) * (1 + 1e-6)
    assert bool(res.diverged)

    def loss(rule):
        return guarded.episode(rule, key).query_loss

    g = eqx.filter_grad(loss)(_hebbian(0.5)).theta[monomial_index("x*y")]
    assert np.isfinite(float(g)) and float(g) > 0


def test_the_guard_changes_nothing_below_the_bound(small_net, pools):
    """A well-behaved classification episode gives identical results with and without it."""
    rule = TermPoolRule.from_names(["pseudo_gradient"], [0.03])
    key = jax.random.key(1)
    a = Problem(small_net, "fa", ClassificationTask(3, 4, 3), pools[0]).episode(rule, key)
    b = Problem(small_net, "fa", ClassificationTask(3, 4, 3, weight_limit=100.0), pools[0])
    b = b.episode(rule, key)
    for x, y in zip(a.state.W, b.state.W, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert float(a.query_loss) == float(b.query_loss) and not bool(b.diverged)


def test_stopped_episodes_stay_in_the_meta_gradient_and_are_clipped():
    """With the guard, a meta-batch whose episodes all blow up is not a bad step (their
    gradients are finite: the step lowers the Hebbian rate), and each stopped episode's
    gradient is scaled to at most stopped_clip x the median norm."""
    rule = _hebbian(0.5)
    tr = GradientTrainer(_pca(100.0), rule, optax.sgd(1e-3), meta_batch=4, stopped_clip=3.0)
    state = tr.init(rule, jax.random.key(2))
    new, aux = tr.step(state)
    assert bool(aux["step_ok"]) and int(aux["diverged"]) == 4 and int(aux["dropped"]) == 0
    i = monomial_index("x*y")
    assert float(new.params.theta[i]) < 0.5
    # clipping: norms of stopped episodes' gradients end at most 3x the median
    keys = jax.random.split(jax.random.key(5), 4)
    grads_b = jax.vmap(
        lambda k: eqx.filter_grad(lambda r: _pca(100.0).episode(r, k).query_loss)(rule)
    )(keys)
    clipped = tr._clip_stopped(grads_b, jnp.array([True, True, True, True]))
    norms = np.linalg.norm(np.asarray(clipped.theta), axis=1)
    raw = np.linalg.norm(np.asarray(grads_b.theta), axis=1)
    assert np.all(norms <= 3.0 * np.median(raw) * (1 + 1e-5))
    np.testing.assert_allclose(norms, np.minimum(raw, 3.0 * np.median(raw)), rtol=1e-5)


def test_the_bound_is_factor_times_the_largest_start_weight_and_is_inclusive(small_net):
    """``weight_limit = 1`` is a guard too (bound = the largest start weight of each layer),
    and a weight exactly at the bound does not stop the episode; one just past it does."""
    from metaplastic.inner._episode import Carry, guard, weight_limits

    state = small_net.init(jax.random.key(0))
    assert weight_limits(state, 0.0) is None
    limits = weight_limits(state, 1.0)
    assert [float(lim) for lim in limits] == [float(jnp.max(jnp.abs(w))) for w in state.W]
    carry = Carry(state, None, None)
    kept, stop = guard(carry, carry, jnp.array(False), limits)
    assert not bool(stop)
    bumped = eqx.tree_at(lambda c: c.net.W[0], carry, state.W[0] * 1.001)
    kept, stop = guard(carry, bumped, jnp.array(False), limits)
    assert bool(stop) and kept.net.W[0] is not None
    np.testing.assert_array_equal(kept.net.W[0], state.W[0])
