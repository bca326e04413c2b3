"""Reverse mode by weight reconstruction (``train.gradient = "reconstruct"``): the same
meta-gradient as plain reverse mode, anchors, the guard, the drift monitor, memory."""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from metaplastic import MetaplasticError
from metaplastic.inner._episode import anchor_spacing, episode_reconstruction_drift
from metaplastic.inner._network import EINetwork, Network
from metaplastic.outer import GradientTrainer, make_optimizer
from metaplastic.rules._rules import TermPoolRule
from metaplastic.tasks._classification import ClassificationTask
from metaplastic.tasks._problem import Problem

from .test_meta_gradients import EXAMPLES


def _grad(problem, rule, keys):
    params, static = eqx.partition(rule, eqx.is_inexact_array)

    def loss(p):
        return problem.meta_loss(eqx.combine(p, static), keys, 0.0)[0]

    return np.asarray(ravel_pytree(jax.jit(jax.grad(loss))(params))[0])


def _compare(pools, kind, mode, remat, task=None, rtol=1e-10):
    with jax.enable_x64(True):
        rule = jax.tree_util.tree_map(
            lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, EXAMPLES[kind]()
        )
        task = task or ClassificationTask(3, 3, 2)
        problem = Problem(Network((64, 5, 3)), mode, task, pools[0])
        keys = jax.random.split(jax.random.key(7), 2)
        want = _grad(problem, rule, keys)
        got = _grad(dataclasses.replace(problem, remat=remat), rule, keys)
        assert np.all(np.isfinite(want)) and np.abs(want).max() > 0
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


def _cases():
    """The stateful pool (BCM's running averages) with FA in the default run; the other
    kinds and pathways (Kolen-Pollack's plastic feedback among them) are slow."""
    for kind in EXAMPLES:
        modes = ["kolen_pollack"] if kind == "plastic_feedback" else ["fa", "backprop", "dfa"]
        for mode in modes:
            quick = (kind, mode) == ("term_pool", "fa")
            yield pytest.param(kind, mode, marks=() if quick else pytest.mark.slow)


@pytest.mark.parametrize("kind,mode", list(_cases()))
def test_reconstruct_gives_the_reverse_mode_meta_gradient(pools, kind, mode):
    """With anchors every 2 steps of 9 (so the last segment is short)."""
    _compare(pools, kind, mode, "reconstruct:2", ClassificationTask(3, 3, 3))


@pytest.mark.slow
def test_the_guard_and_no_anchors_keep_the_meta_gradient_exact(pools):
    """No anchors, and episodes the weight guard stops part-way (the carry then stays put:
    nothing to invert)."""
    with jax.enable_x64(True):
        rule = TermPoolRule.from_names(["pseudo_gradient"], [jnp.float64(0.3)])
        task = ClassificationTask(3, 3, 2, weight_limit=2.0)
        problem = Problem(Network((64, 5, 3)), "fa", task, pools[0])
        keys = jax.random.split(jax.random.key(7), 2)
        res = jax.vmap(lambda k: problem.episode(rule, k))(keys)
        assert bool(jnp.any(res.diverged))  # stopped, with finite weights
        assert all(bool(jnp.all(jnp.isfinite(w))) for w in res.state.W)
        want = _grad(problem, rule, keys)
        assert np.all(np.isfinite(want)) and np.abs(want).max() > 0
        got = _grad(dataclasses.replace(problem, remat="reconstruct:0"), rule, keys)
        np.testing.assert_allclose(got, want, rtol=1e-10)


def test_anchor_spacing():
    assert anchor_spacing("reconstruct", 250) == 16
    assert anchor_spacing("reconstruct:0", 250) == 0
    assert anchor_spacing("reconstruct:5", 250) == 5
    assert anchor_spacing("reconstruct:500", 250) == 250
    for bad in ("reconstruct:x", "rebuild", "reconstruct:-1"):
        with pytest.raises(ValueError, match="reconstruct:K"):
            anchor_spacing(bad, 10)


def test_networks_that_change_their_weights_cannot_be_reconstructed(pools):
    problem = Problem(EINetwork((64, 5, 3)), "fa", ClassificationTask(3, 3, 2), pools[0])
    rule = TermPoolRule.from_names(["pseudo_gradient"], [0.01])
    with pytest.raises(MetaplasticError, match="after_update"):
        GradientTrainer(problem, rule, make_optimizer("adam", 1e-3), mode="reconstruct")
    tr = GradientTrainer(
        dataclasses.replace(problem, net=Network((64, 5, 3))),
        rule,
        make_optimizer("adam", 1e-3),
        mode="reconstruct",
    )
    assert tr.mode == "reconstruct" and tr.problem.remat == "reconstruct"


@pytest.mark.slow
def test_drift_monitor_and_anchors(pools):
    """Oja's ``-eta y y^T W`` contracts W along y, so its inverse expands: rebuilt over a
    whole episode, rounding errors grow exponentially (the drift monitor must show it);
    anchors every step bring them back to rounding."""
    net = Network((64, 20, 5))
    ep = ClassificationTask(5, 20, 2).sample(jax.random.key(1), pools[0])

    def drift(rule, remat):
        return float(
            episode_reconstruction_drift(rule, net, "fa", jax.random.key(0), ep, remat=remat)
        )

    oja = TermPoolRule.from_names(["pseudo_gradient", "oja"], [0.05, 0.02])
    assert not drift(oja, "reconstruct:0") < 1e-2  # large or NaN
    assert drift(oja, "reconstruct:1") < 1e-5
    # eta |y|^2 > 1 at some steps: the fixed-point iteration cannot invert them; without
    # anchors the meta-gradient is then NaN (the outer loop drops the episode) instead of
    # wrong, with anchors those segments are recomputed forward: reverse mode's gradient
    strong = TermPoolRule.from_names(["pseudo_gradient", "oja"], [0.05, 0.05])
    assert drift(strong, "reconstruct:1") == np.inf
    task = ClassificationTask(5, 20, 2)
    keys = jax.random.split(jax.random.key(1), 1)
    problem = Problem(net, "fa", task, pools[0], remat="reconstruct:0")
    assert np.isfinite(float(problem.meta_loss(strong, keys, 0.0)[0]))
    assert np.all(np.isnan(_grad(problem, strong, keys)))
    want = _grad(Problem(net, "fa", task, pools[0]), strong, keys)
    for remat in ("reconstruct", "reconstruct:3"):
        got = _grad(dataclasses.replace(problem, remat=remat), strong, keys)
        np.testing.assert_allclose(got, want, rtol=1e-4)


def test_reconstruct_memory_does_not_grow_with_the_unroll(pools):
    """Compiled scratch memory of the meta-gradient at T = 48: plain reverse mode keeps
    every step's weights; reconstruction without anchors keeps only the per-step signal
    vectors."""
    rule = TermPoolRule.from_names(["pseudo_gradient", "oja"], [0.05, 0.01])
    params, static = eqx.partition(rule, eqx.is_inexact_array)
    keys = jax.random.split(jax.random.key(7), 1)

    def scratch(remat, k_shot):
        problem = Problem(
            Network((64, 32, 3)), "fa", ClassificationTask(3, k_shot, 2), pools[0], remat=remat
        )
        f = jax.jit(jax.grad(lambda p: problem.meta_loss(eqx.combine(p, static), keys, 0.0)[0]))
        return f.lower(params).compile().memory_analysis().temp_size_in_bytes

    assert scratch("reconstruct:0", 16) < 0.25 * scratch(False, 16)


def test_fixed_point_inversion_converges_or_says_it_did_not():
    """``c_next = c + D(c)`` with ``D(c) = -r c + a``: the iteration contracts at rate
    ``r``; it converges for ``r < 1`` whatever the carry's scale, and reports failure for
    ``r > 1`` (where it diverges although the step is invertible)."""
    from metaplastic.inner._reconstruct import _invert

    rng = np.random.default_rng(0)
    for scale in (1e-3, 1.0, 1e3):
        c = jnp.asarray(rng.normal(size=50) * scale, jnp.float32)
        a = jnp.asarray(rng.normal(size=50) * scale, jnp.float32)
        for r, ok_want in ((0.0, True), (0.3, True), (1.5, False)):

            def advance(x, sig, r=r):
                return x - r * x + sig

            back, ok = _invert(advance, advance(c, a), a)
            assert bool(ok) == ok_want, (scale, r)
            if ok_want:
                np.testing.assert_allclose(back, c, rtol=1e-5, atol=1e-6)  # tol floor: 1


def test_reconstructed_scan_gradients_match_a_plain_scan():
    """A toy scan with a float and an integer output per step and a float input stream:
    gradients with respect to the parameters, the start carry and the inputs are those of
    ``lax.scan``, and the integer output passes through."""
    from metaplastic.inner._reconstruct import reconstructed_scan

    def signals(p, c, inp):
        x, t = inp
        y = jnp.tanh(c @ x)
        return (x, y), (jnp.sum(y * y), t * 2)

    def advance(p, c, sig):
        x, y = sig
        return c + p["a"] * jnp.outer(y, x).sum(0)[: c.shape[0]] - p["b"] * c

    def stop(p, old, new):
        return jnp.array(False)

    rng = np.random.default_rng(1)
    p = {"a": jnp.float32(0.1), "b": jnp.float32(0.05)}
    c0 = jnp.asarray(rng.normal(size=(4, 4)), jnp.float32)
    xs = (jnp.asarray(rng.normal(size=(12, 4)), jnp.float32), jnp.arange(12))

    def plain(p, c0, xf):
        def body(c, inp):
            sig, out = signals(p, c, inp)
            return advance(p, c, sig), out

        cT, (o, ti) = jax.lax.scan(body, c0, (xf, xs[1]))
        return jnp.sum(cT**2) + jnp.sum(o), ti

    def rebuilt(p, c0, xf):
        (cT, _), (o, ti) = reconstructed_scan(signals, advance, stop, p, c0, (xf, xs[1]), 5)
        return jnp.sum(cT**2) + jnp.sum(o), ti

    want, ti_want = jax.grad(plain, argnums=(0, 1, 2), has_aux=True)(p, c0, xs[0])
    got, ti_got = jax.grad(rebuilt, argnums=(0, 1, 2), has_aux=True)(p, c0, xs[0])
    np.testing.assert_array_equal(ti_got, ti_want)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=2e-4, atol=1e-5)


def _toy(r=0.5, scale=1.0, limit=None):
    """A carry that the step contracts by ``1 - r`` (its inverse expands by ``1 / (1 - r)``),
    driven by the inputs; with ``limit`` the guard stops once ``max |c|`` exceeds it."""

    def signals(p, c, inp):
        return inp[0], jnp.sum(c)

    def advance(p, c, x):
        return c - p["r"] * c + scale * x

    def stop(p, old, new):
        return jnp.array(False) if limit is None else jnp.max(jnp.abs(new)) > limit

    rng = np.random.default_rng(2)
    c0 = jnp.asarray(rng.normal(size=6) * scale, jnp.float32)
    xs = (jnp.asarray(rng.normal(size=(40, 6)), jnp.float32), jnp.arange(40))
    return signals, advance, stop, {"r": jnp.float32(r)}, c0, xs


def test_drift_of_a_toy_scan_with_and_without_anchors():
    from metaplastic.inner._reconstruct import reconstruction_drift

    parts = _toy(r=0.5, scale=1e3)
    assert not reconstruction_drift(*parts) < 1e-2  # 2^40 amplification, no anchors
    for every in (1, 2):  # compared at the anchors only, relative to the carry's size
        assert reconstruction_drift(*parts, every) < 1e-5
    assert reconstruction_drift(*_toy(r=0.0, scale=1e3)) < 1e-6


def _plain(signals, advance, stop, p, c0, xs, every=0):
    def body(c, inp):
        sig, out = signals(p, c, inp)
        return advance(p, c, sig), out

    cT, outs = jax.lax.scan(body, c0, xs)
    return (cT, jnp.array(False)), outs


def test_steps_that_cannot_be_rebuilt_are_recomputed_or_give_nan():
    """``r > 1``: the step is invertible, but the fixed-point iteration diverges. Without
    anchors the meta-gradient must then be NaN (the outer loop drops the episode), not
    wrong; with anchors the failed segment is recomputed forward from its anchor, so the
    meta-gradient is the plain scan's. With ``r = 0.5`` it is finite either way."""
    from metaplastic.inner._reconstruct import reconstructed_scan, reconstruction_drift

    def loss(r, scan, every=0):
        signals, advance, stop, p, c0, xs = _toy(r=0.0)
        xs = (xs[0][:3], xs[1][:3])  # 3 steps: a wrong rebuild stays finite
        (cT, _), outs = scan(signals, advance, stop, {"r": r}, c0, xs, every)
        return jnp.sum(cT**2) + jnp.sum(outs)

    # r = 1.05: the iteration drifts away slowly and stays finite, so only the check can
    # tell (r = 1.5 overflows to NaN by itself)
    assert np.isnan(float(jax.grad(loss)(jnp.float32(1.05), reconstructed_scan, 0)))
    assert reconstruction_drift(*_toy(r=1.5), 1) == np.inf
    for r in (1.05, 1.5, 0.5):
        want = float(jax.grad(loss)(jnp.float32(r), _plain))
        for every in (1, 2):  # segments of 1 and 2 steps, the last one padded
            got = float(jax.grad(loss)(jnp.float32(r), reconstructed_scan, every))
            assert got == pytest.approx(want, rel=1e-4), (r, every)


def test_the_guard_stops_a_reconstructed_scan_for_good():
    """Once the guard stops, the carry stays where it was, for the rest of the scan."""
    from metaplastic.inner._reconstruct import reconstructed_scan

    signals, advance, stop, p, c0, xs = _toy(r=-0.2, limit=5.0)  # grows until stopped
    (cT, stopped), outs = reconstructed_scan(signals, advance, stop, p, c0, xs)
    assert bool(stopped) and float(jnp.max(jnp.abs(cT))) <= 5.0
    first = int(jnp.argmax(jnp.diff(outs) == 0))  # the carry no longer changes from here
    assert first > 0 and np.all(np.diff(np.asarray(outs))[first:] == 0)


def test_drift_beyond_the_limit_at_an_anchor_recomputes_the_segment():
    """Each step converges, but over 20 steps the expanding inverse (2^20) takes the
    rebuilt carry past DRIFT_LIMIT at the anchor: that segment is recomputed forward from
    the anchor, so the meta-gradient is the plain scan's, with anchors every 20 steps as
    with anchors every 2 (which need no recomputing); without anchors it is NaN."""
    from metaplastic.inner._reconstruct import reconstructed_scan

    signals, advance, stop, _, c0, xs = _toy(r=0.5, scale=1e3)

    def loss(r, scan, every):
        (cT, _), outs = scan(signals, advance, stop, {"r": r}, c0, xs, every)
        return jnp.sum(cT**2) + jnp.sum(outs)

    want = float(jax.grad(loss)(jnp.float32(0.5), _plain, 0))
    assert np.isnan(float(jax.grad(loss)(jnp.float32(0.5), reconstructed_scan, 0)))
    for every in (20, 2, 7):  # 7: the last segment is padded
        got = float(jax.grad(loss)(jnp.float32(0.5), reconstructed_scan, every))
        assert got == pytest.approx(want, rel=1e-4), every


def test_episode_drift_of_a_rule_that_reads_no_weights(pools):
    rule = TermPoolRule.from_names(["pseudo_gradient"], [0.05])
    ep = ClassificationTask(3, 2, 2).sample(jax.random.key(1), pools[0])
    net = Network((64, 5, 3))
    drift = episode_reconstruction_drift(rule, net, "fa", jax.random.key(0), ep)
    assert float(drift) < 1e-5


def test_reconstruct_mode_logs_the_drift_every_meta_step(pools):
    """The metrics of a reconstruct-mode meta-step carry the drift monitor (rounding only,
    for a pool whose steps invert); other modes do not measure it."""
    problem = Problem(Network((64, 5, 3)), "fa", ClassificationTask(3, 3, 2), pools[0])
    rule = TermPoolRule.from_names(["pseudo_gradient", "oja"], [0.05, 0.01])
    tr = GradientTrainer(
        problem, rule, make_optimizer("adam", 1e-3), meta_batch=2, mode="reconstruct"
    )
    _, aux = tr.step(tr.init(rule, jax.random.key(0)))
    drift = float(aux["reconstruction_drift"])
    assert 0.0 <= drift < 1e-5
    fwd = GradientTrainer(problem, rule, make_optimizer("adam", 1e-3), meta_batch=2)
    assert "reconstruction_drift" not in fwd.step(fwd.init(rule, jax.random.key(0)))[1]
