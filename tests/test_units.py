"""Coefficient units (``train.units = "episode"``): what they measure and how the gradient
outer loop uses them."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metaplastic._errors import MetaplasticError
from metaplastic.inner._network import Network
from metaplastic.outer import GradientTrainer
from metaplastic.outer._units import episode_units
from metaplastic.rules._rule_kinds import MONOMIALS, TaylorRule, monomial_index
from metaplastic.rules._rules import TermPoolRule
from metaplastic.tasks._pca import PCATask
from metaplastic.tasks._problem import Problem

DEGREE = np.array([a + b + d for a, b, c, d in MONOMIALS])  # powers of x, y, e (not W)


def _pca_problem(scale: float, steps: int = 40) -> Problem:
    return Problem(
        Network((6, 1), activation="linear", bias=False),
        "backprop",
        PCATask(6, steps, 0.7, input_scale=scale),
        None,
    )


def test_units_scale_as_the_inverse_power_of_the_inputs():
    """At theta = 0 the weights do not move, so dW_T/dtheta_k = sum_t m_k(t), which scales as
    input_scale**degree: the unit of every live monomial scales exactly as its inverse. Error
    monomials are identically zero on pca and get the median unit."""
    rule = TaylorRule(np.zeros(81, np.float32))
    key = jax.random.key(3)
    u1 = np.asarray(episode_units(_pca_problem(1.0), rule, key).theta, np.float64)
    u2 = np.asarray(episode_units(_pca_problem(2.0), rule, key).theta, np.float64)
    live = np.array([d == 0 for a, b, c, d in MONOMIALS])
    np.testing.assert_allclose(u2[live] / u1[live], 2.0 ** -DEGREE[live], rtol=2e-3)
    np.testing.assert_allclose(u1[~live], np.median(u1[live]))
    # the Oja pair: x*y (degree 2) and W*y**2 (degree 2)
    assert u2[monomial_index("x*y")] == pytest.approx(u1[monomial_index("x*y")] / 4, rel=2e-3)


def test_units_shrink_with_the_unroll_length():
    """A term with a drift (here the constant term: dW_T/dtheta = T) has a unit ~ 1/T."""
    rule = TaylorRule(np.zeros(81, np.float32))
    key = jax.random.key(0)
    i = monomial_index("1")
    u40 = float(episode_units(_pca_problem(1.0, 40), rule, key).theta[i])
    u400 = float(episode_units(_pca_problem(1.0, 400), rule, key).theta[i])
    assert u40 / u400 == pytest.approx(10.0, rel=1e-3)


def _first_step(problem, rule, units, lr=0.01, l1=0.0):
    trainer = GradientTrainer(problem, rule, optax.adam(lr), meta_batch=4, l1=l1, units=units)
    state = trainer.init(rule, jax.random.key(1))
    new, aux = trainer.step(state)
    assert bool(aux["step_ok"])
    return np.asarray(state.params.theta), np.asarray(new.params.theta)


def test_adam_steps_each_coefficient_by_lr_times_its_unit(small_problem):
    """Adam's first update is lr * g / (|g| + eps) per coordinate: in phi = theta / u that
    is about lr for every coefficient with a gradient, so theta moves by about lr * u_k."""
    rule = TermPoolRule.from_names(["pseudo_gradient", "hebbian", "oja"], [0.03, 0.0, 0.0])
    units = TermPoolRule(rule.terms, jnp.asarray([0.5, 0.01, 2.0], jnp.float32))
    before, after = _first_step(small_problem, rule, units)
    moved = np.abs(after - before)
    np.testing.assert_allclose(moved, 0.01 * np.array([0.5, 0.01, 2.0]), rtol=0.02)
    # without units every coefficient moves by about lr
    _, raw = _first_step(small_problem, rule, None)
    np.testing.assert_allclose(np.abs(raw - before), 0.01, rtol=0.02)


def test_l1_penalty_is_on_the_coefficients_in_their_units(small_problem):
    """The L1 gradient in phi is l1 * sign(phi) whatever the unit: a coefficient with a tiny
    unit is not exempt from the penalty. With a zero meta-gradient (no live coefficient but
    the penalised one would still be moved by Adam) we compare penalised and unpenalised
    first steps: the difference has the sign that shrinks |theta|."""
    rule = TermPoolRule.from_names(["pseudo_gradient", "hebbian"], [0.03, 0.02])
    units = TermPoolRule(rule.terms, jnp.asarray([1.0, 1e-3], jnp.float32))
    trainer = GradientTrainer(
        small_problem, rule, optax.sgd(1.0), meta_batch=4, l1=1.0, units=units
    )
    plain = GradientTrainer(small_problem, rule, optax.sgd(1.0), meta_batch=4, l1=0.0, units=units)
    keys = jax.random.split(jax.random.key(0), 4)
    g1, _ = trainer.loss_and_grad(trainer.init(rule, jax.random.key(0)).params, keys)
    g0, _ = plain.loss_and_grad(plain.init(rule, jax.random.key(0)).params, keys)
    # d(l1 * |theta / u|)/dtheta = l1 * sign(theta) / u
    np.testing.assert_allclose(np.asarray(g1.theta - g0.theta), [1.0, 1e3], rtol=1e-4)


def test_units_refuse_a_network_whose_weights_are_all_zero():
    problem = Problem(
        Network((6, 1), activation="linear", bias=False),
        "backprop",
        PCATask(6, 10, 0.7, init_scale=0.0),
        None,
    )
    with pytest.raises(MetaplasticError, match="train.units"):
        episode_units(problem, TaylorRule(np.zeros(81, np.float32)), jax.random.key(0))


def test_sgd_in_units_steps_by_lr_times_unit_squared_times_gradient(small_problem):
    """In phi the gradient is g * u; a plain SGD step of -lr * g * u in phi is a step of
    -lr * u**2 * g in theta (the optimiser really works on phi, not only rescales its step)."""
    rule = TermPoolRule.from_names(["pseudo_gradient", "hebbian", "oja"], [0.03, 0.0, 0.0])
    u = np.array([0.5, 0.01, 2.0], np.float32)
    units = TermPoolRule(rule.terms, jnp.asarray(u))
    trainer = GradientTrainer(small_problem, rule, optax.sgd(0.1), meta_batch=4, units=units)
    state = trainer.init(rule, jax.random.key(1))
    keys = jax.random.split(jax.random.split(jax.random.wrap_key_data(state.key))[1], 4)
    g, _ = trainer.loss_and_grad(state.params, keys)
    new, _ = trainer.step(state)
    step = np.asarray(new.params.theta - state.params.theta)
    np.testing.assert_allclose(step, -0.1 * u**2 * np.asarray(g.theta), rtol=1e-4, atol=1e-9)


def test_units_reach_the_run_summary_and_bad_names_are_refused(tmp_path):
    from metaplastic.run._config import build_config
    from metaplastic.run._run import train

    with pytest.raises(MetaplasticError, match="train.units"):
        build_config("taylor", "pca", {}, ["train.units=epsiode"])
    cfg = build_config(
        "taylor",
        "pca",
        {"episodes": 16, "meta_batch": 8, "eval_episodes": 8, "val_episodes": 8},
        [
            "task.dim=3",
            "task.steps=20",
            "train.units=episode",
            "task.input_scale=2",
            "train.require_improvement=false",
        ],
    )
    summary = train(cfg, tmp_path / "run", progress=False)
    units = summary["train"]["units"]
    assert set(units) == set(summary["coefficients"]) and len(units) == 81
    assert units["x*y"] > 0 and units["W*y**2"] > 0


def test_make_optimizer_schedule_and_clipping():
    """Constant step size by default (and with ``steps = 0``); ``lr_end < 1`` with
    ``steps`` decays it by a cosine to ``lr * lr_end``; ``clip > 0`` clips the global norm,
    ``clip = 0`` is off."""
    from metaplastic.outer._gradient import make_optimizer

    def steps_taken(opt, g, n=5):
        params, state, out = jnp.zeros(2), None, []
        state = opt.init(params)
        for _ in range(n):
            upd, state = opt.update(g, state, params)
            out.append(-float(upd[0]) / float(g[0]))
        return out

    g = jnp.array([1.0, 0.0])
    np.testing.assert_allclose(steps_taken(make_optimizer("sgd", 0.1), g), [0.1] * 5, rtol=1e-6)
    np.testing.assert_allclose(
        steps_taken(make_optimizer("sgd", 0.1, lr_end=0.5, steps=0), g), [0.1] * 5, rtol=1e-6
    )
    for steps in (1, 4):
        sched = optax.cosine_decay_schedule(0.1, steps, alpha=0.5)
        np.testing.assert_allclose(
            steps_taken(make_optimizer("sgd", 0.1, lr_end=0.5, steps=steps), g),
            [float(sched(k)) for k in range(5)],
            rtol=1e-6,
        )

    def first_update(opt, g):
        params = jnp.zeros_like(g)
        return opt.update(g, opt.init(params), params)[0]

    big = jnp.array([30.0, 40.0])
    clipped = first_update(make_optimizer("sgd", 1.0, clip=0.5), big)
    np.testing.assert_allclose(-clipped, big / 50.0 * 0.5, rtol=1e-6)
    np.testing.assert_allclose(-first_update(make_optimizer("sgd", 1.0, clip=0.0), big), big)


def test_bound_gradient_rescales_only_above_the_limit():
    from metaplastic.outer._gradient import bound_gradient

    g = {"a": jnp.array([2.0, -4.0]), "b": jnp.array([1.0])}
    same, flag = bound_gradient(g, 4.0)
    assert not bool(flag)
    np.testing.assert_array_equal(same["a"], g["a"])
    small, flag = bound_gradient(g, 2.0)
    assert bool(flag)
    np.testing.assert_allclose(small["a"], [1.0, -2.0])
    np.testing.assert_allclose(small["b"], [0.5])


def test_stopped_episodes_are_clipped_to_a_multiple_of_the_median_norm():
    """Per-episode gradients of stopped episodes above ``stopped_clip x median norm`` are
    scaled down to it (also when that cap is below 1); the others, and stopped ones below
    the cap or of norm 0, are unchanged; a non-finite norm counts as 0 in the median."""
    from types import SimpleNamespace

    fake = SimpleNamespace(stopped_clip=3.0, _times_units=lambda t: t)

    def clip(rows, stopped):
        g = jnp.array(rows, jnp.float32)
        return np.asarray(GradientTrainer._clip_stopped(fake, {"g": g}, jnp.array(stopped))["g"])

    # median norm 2 -> cap 6: the stopped norm-100 row is scaled to 6, the rest kept
    rows = [[2.0, 0.0], [0.0, 2.0], [1.2, 1.6], [60.0, 80.0], [4.0, 0.0], [0.0, 0.0]]
    out = clip(rows, [False, False, False, True, True, True])
    want = np.array(rows)
    want[3] = [3.6, 4.8]
    np.testing.assert_allclose(out, want, rtol=1e-6)
    # a NaN norm counts as 0: median(0.5, 0, 100) = 0.5 -> cap 1.5
    out = clip([[0.5, 0.0], [np.nan, 0.0], [60.0, 80.0]], [False, False, True])
    np.testing.assert_allclose(out[2], [0.9, 1.2], rtol=1e-6)
    # a cap below 1: median 0.1 -> cap 0.3, a stopped row of norm 0.5 scaled by 0.6
    out = clip([[0.1, 0.0], [0.0, 0.1], [0.3, 0.4]], [False, False, True])
    np.testing.assert_allclose(out[2], [0.18, 0.24], rtol=1e-5)


def test_units_are_the_weight_scale_over_each_coefficients_sensitivity():
    """``u_k = rms(W_T) / rms(dW_T / d theta_k)`` over 8 probe episodes (the default) and
    all weights, computed here independently with ``jax.jacfwd``; a coefficient whose term
    never moves the weights (an error term on pca) gets the median of the others."""
    from metaplastic.outer._units import PROBE_EPISODES

    assert PROBE_EPISODES == 8
    problem = _pca_problem(1.5, steps=10)
    rule = TermPoolRule.from_names(["oja", "hebbian", "pseudo_gradient"], [0.01, 0.0, 0.0])
    key = jax.random.key(4)
    units = np.asarray(episode_units(problem, rule, key).theta, np.float64)

    def final_w(theta, k):
        r = TermPoolRule(rule.terms, theta, rule.mask)
        return problem.episode(r, k).state.W[0].ravel()

    keys = jax.random.split(key, 8)
    jac = np.stack([np.asarray(jax.jacfwd(final_w)(rule.theta, k)) for k in keys])  # (E, n_w, 3)
    w = np.stack([np.asarray(final_w(rule.theta, k)) for k in keys])
    sens = np.sqrt(np.mean(jac.astype(np.float64) ** 2, axis=(0, 1)))
    ref = np.sqrt(np.mean(w.astype(np.float64) ** 2))
    assert sens[2] == 0.0  # no error signal on pca
    np.testing.assert_allclose(units[:2], ref / sens[:2], rtol=1e-4)
    assert units[2] == pytest.approx(np.median(units[:2]), rel=1e-6)
    # no coefficient moves the weights at all: unit 1 (the raw coefficient)
    only_error = TermPoolRule.from_names(["pseudo_gradient"], [0.0])
    assert float(episode_units(problem, only_error, key).theta[0]) == 1.0


class _HalfNaN(eqx.Module):
    """A stand-in problem: final weights ``2 theta_0`` (three of them), NaN for odd keys."""

    def episode(self, rule, key):
        from types import SimpleNamespace

        bad = jax.random.key_data(key)[-1] % 2 == 1
        w = rule.theta[0] * jnp.where(bad, jnp.nan, 2.0) * jnp.ones(3)
        return SimpleNamespace(state=SimpleNamespace(W=(w,)))


def test_probe_episodes_that_blow_up_count_as_zero_change():
    """Sensitivities and the weight scale average over every probe episode, a non-finite
    one contributing zero (so it cannot make the units NaN or inflate them)."""
    from metaplastic.outer._units import _sensitivities

    rule = TermPoolRule.from_names(["pseudo_gradient"], [0.5])
    keys = jax.vmap(lambda k: jax.random.wrap_key_data(jnp.array([0, k], jnp.uint32)))(
        jnp.array([2, 3], jnp.uint32)
    )
    sens, ref = _sensitivities(_HalfNaN(), rule, keys)
    np.testing.assert_allclose(np.asarray(sens), [np.sqrt(4.0 / 2)], rtol=1e-6)
    np.testing.assert_allclose(float(ref), np.sqrt(1.0 / 2), rtol=1e-6)
