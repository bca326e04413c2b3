"""Meta-gradients (forward = reverse = finite differences) and the gradient outer loop."""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaplastic._errors import MetaplasticError
from metaplastic.outer import GradientTrainer, OuterState, make_optimizer
from metaplastic.rules._rules import TermPoolRule
from metaplastic.tasks._problem import Problem
from metaplastic.tasks._stats import bootstrap_ci, mean_ci95, paired_difference

from .conftest import POOL_TERMS

THETA = [0.08, 0.03, 0.02]


def _trainer(problem, rule, mode, l1=0.0, meta_batch=3):
    return GradientTrainer(
        problem, rule, make_optimizer("adam", 1e-2), meta_batch=meta_batch, l1=l1, mode=mode
    )


def test_auto_mode_picks_by_coefficient_count(small_problem):
    few = TermPoolRule.from_names(POOL_TERMS, THETA)
    many = TermPoolRule.from_names(POOL_TERMS, THETA, n_layers=6)  # 18 coefficients
    assert _trainer(small_problem, few, "auto").mode == "forward"
    assert _trainer(small_problem, many, "auto").mode == "reverse"
    # the boundary: forward mode up to 16 coefficients (a per-layer pool on 4 or 17 terms)
    from metaplastic.rules._terms import TERMS

    names = sorted(TERMS)[:4]
    sixteen = TermPoolRule.from_names(names, [0.0] * 4, n_layers=4)
    seventeen = TermPoolRule.from_names([*sorted(TERMS), "oja"], [0.0] * 17)
    assert _trainer(small_problem, sixteen, "auto").mode == "forward"
    assert _trainer(small_problem, seventeen, "auto").mode == "reverse"


def test_auto_mode_checkpoints_where_reverse_mode_would_not_fit(small_problem):
    """Past forward mode's range, plain reverse mode while its stored steps fit in
    AUTO_REVERSE_MAX_MB, checkpointing beyond (reference network, 4,000 steps: 9 GB; 50
    steps: 110 MB)."""
    from metaplastic.inner import Network
    from metaplastic.outer._gradient import AUTO_REVERSE_MAX_MB, reverse_memory_mb
    from metaplastic.tasks import ClassificationTask

    many = TermPoolRule.from_names(POOL_TERMS, THETA, n_layers=6)
    ref = Network((784, 170, 130, 100, 70, 47))
    long = dataclasses.replace(small_problem, net=ref, task=ClassificationTask(5, 800, 2))
    short = dataclasses.replace(long, task=ClassificationTask(5, 10, 2))
    assert reverse_memory_mb(long) == pytest.approx(4000 * 178_670 * 13 / 2**20)
    assert reverse_memory_mb(short) < AUTO_REVERSE_MAX_MB < reverse_memory_mb(long)
    assert _trainer(long, many, "auto").mode == "checkpoint"
    assert _trainer(short, many, "auto").mode == "reverse"
    assert _trainer(long, TermPoolRule.from_names(POOL_TERMS, THETA), "auto").mode == "forward"


@pytest.mark.parametrize(
    "shared", [True, pytest.param(False, marks=pytest.mark.slow)]
)  # per-layer coefficients: the same code path with a wider theta (~11 s)
def test_forward_equals_reverse(small_problem, shared):
    rule = TermPoolRule.from_names(POOL_TERMS, THETA, n_layers=None if shared else 3)
    params = eqx.partition(rule, eqx.is_inexact_array)[0]
    keys = jax.random.split(jax.random.key(1), 3)
    gf, af = _trainer(small_problem, rule, "forward", l1=1e-3).loss_and_grad(params, keys)
    gr, ar = _trainer(small_problem, rule, "reverse", l1=1e-3).loss_and_grad(params, keys)
    np.testing.assert_allclose(gf.theta, gr.theta, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(af["loss"], ar["loss"], rtol=1e-6)
    pen = 1e-3 * float(rule.l1())  # the reported loss includes the L1 penalty
    np.testing.assert_allclose(af["loss"], float(af["query_loss"]) + pen, rtol=1e-6)
    if shared:  # reverse mode through sqrt(T) checkpointed segments: the same gradient
        tc = _trainer(small_problem, rule, "checkpoint", l1=1e-3)
        assert tc.problem.remat == -1 and not small_problem.remat
        gc, ac = tc.loss_and_grad(params, keys)
        np.testing.assert_allclose(gc.theta, gr.theta, rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(ac["loss"], ar["loss"], rtol=1e-6)


@pytest.mark.slow  # the default run checks the same gradient in test_meta_gradients (term_pool-fa)
def test_meta_gradient_matches_finite_differences(small_net, small_task, pools):
    with jax.enable_x64(True):
        problem = Problem(small_net, "fa", small_task, pools[0])
        rule = TermPoolRule.from_names(POOL_TERMS, THETA)
        assert rule.theta.dtype == np.float64
        keys = jax.random.split(jax.random.key(2), 2)
        tr = _trainer(problem, rule, "reverse", l1=1e-2)
        params = eqx.partition(rule, eqx.is_inexact_array)[0]
        grad, _ = tr.loss_and_grad(params, keys)

        def loss(theta):
            r = TermPoolRule(rule.terms, theta, rule.mask)
            return float(problem.meta_loss(r, keys, 1e-2)[0])

        h = 1e-6
        theta = np.asarray(rule.theta)
        fd = []
        for k in range(theta.size):
            d = np.zeros_like(theta)
            d[k] = h
            fd.append((loss(theta + d) - loss(theta - d)) / (2 * h))
        np.testing.assert_allclose(np.asarray(grad.theta), fd, rtol=1e-5, atol=1e-8)


def test_outer_step_updates_and_is_deterministic(small_problem):
    rule = TermPoolRule.from_names(POOL_TERMS, THETA)
    tr = _trainer(small_problem, rule, "forward")
    s1 = tr.init(rule, jax.random.key(0))
    s2 = tr.init(rule, jax.random.key(0))
    for _ in range(3):
        s1, aux1 = tr.step(s1)
        s2, aux2 = tr.step(s2)
    assert int(s1.step) == 3 and int(s1.skipped) == 0
    assert not np.allclose(np.asarray(s1.params.theta), THETA)
    np.testing.assert_array_equal(np.asarray(s1.params.theta), np.asarray(s2.params.theta))
    assert set(aux1) >= {"loss", "query_loss", "query_accuracy", "diverged", "grad_finite"}


def test_bad_meta_step_reverts_to_the_last_good_rule_and_backs_off(small_problem):
    """A step at a rule that blows up leaves the optimiser state exactly as it was, puts
    the coefficients back to the last good ones (not the bad ones), halves the step size
    and counts the step; a good step after it regrows the step size."""
    rule = TermPoolRule.from_names(["pseudo_gradient", "hebbian"], [0.1, 0.0])
    tr = _trainer(small_problem, rule, "reverse")
    s0 = tr.init(rule, jax.random.key(0))
    s1, aux1 = tr.step(s0)  # a good step
    assert bool(aux1["step_ok"]) and int(s1.skipped) == 0
    np.testing.assert_array_equal(np.asarray(s1.good.theta), np.asarray(s0.params.theta))
    bad_params = eqx.tree_at(lambda p: p.theta, s1.params, jnp.array([0.1, 1e4]))
    s1_bad = eqx.tree_at(lambda s: s.params, s1, bad_params)
    s2, aux2 = tr.step(s1_bad)
    assert not bool(aux2["grad_finite"]) and not bool(aux2["step_ok"])
    assert int(aux2["diverged"]) > 0
    assert int(s2.skipped) == 1 and int(s2.step) == 2 and int(s2.bad_run) == 1
    np.testing.assert_array_equal(np.asarray(s2.params.theta), np.asarray(s1.good.theta))
    for a, b in zip(
        jax.tree_util.tree_leaves(s2.opt_state),
        jax.tree_util.tree_leaves(s1.opt_state),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # strictly unchanged
    assert float(s2.lr_scale) == 0.5
    assert not np.array_equal(np.asarray(s2.key), np.asarray(s1.key))  # new episodes next
    s3, aux3 = tr.step(s2)
    assert bool(aux3["step_ok"]) and int(s3.bad_run) == 0
    assert 0.5 < float(s3.lr_scale) < 0.6
    # bad steps in a row count from the very first step (a fresh state has none behind it)
    s1_first_bad, _ = tr.step(eqx.tree_at(lambda s: s.params, s0, bad_params))
    assert int(s1_first_bad.bad_run) == 1 and int(s1_first_bad.skipped) == 1


def test_step_size_scale_multiplies_the_update(small_problem):
    """lr_scale really scales the update: half the scale, half the coefficient change."""
    rule = TermPoolRule.from_names(POOL_TERMS, THETA)
    tr = _trainer(small_problem, rule, "forward")
    s0 = tr.init(rule, jax.random.key(3))
    full, _ = tr.step(s0)
    half, _ = tr.step(eqx.tree_at(lambda s: s.lr_scale, s0, jnp.array(0.5, jnp.float32)))
    d_full = np.asarray(full.params.theta) - THETA
    d_half = np.asarray(half.params.theta) - THETA
    np.testing.assert_allclose(d_half, 0.5 * d_full, rtol=1e-4, atol=1e-9)


def test_mean_ci95():
    m, lo, hi = mean_ci95([0.0, 1.0] * 50)
    assert m == 0.5 and lo < 0.5 < hi
    assert abs((hi - lo) / 2 - 1.984 * np.std([0, 1] * 50, ddof=1) / 10) < 1e-3


def test_bootstrap_intervals_stay_in_range_and_pair_units():
    """Accuracies near 1: the t interval leaves [0, 1], the bootstrap one cannot; the
    paired difference uses the pairing (a constant offset is significant even though the
    two samples overlap)."""
    acc = [1.0, 1.0, 1.0, 0.2]
    _, _, t_hi = mean_ci95(acc)
    m, lo, hi = bootstrap_ci(acc)
    assert t_hi > 1.0 and 0.2 <= lo < m < hi <= 1.0
    assert bootstrap_ci(acc) == bootstrap_ci(acc)  # seeded
    rng = np.random.default_rng(0)
    b = rng.uniform(0.3, 0.9, 20)
    d = paired_difference(b + 0.01, b)
    assert d["significant"] and d["a_better"] == 20 and abs(d["mean"] - 0.01) < 1e-12
    d0 = paired_difference(b, b[::-1])
    assert not d0["significant"] and d0["ci"][0] < 0 < d0["ci"][1]
    with pytest.raises(ValueError, match="finite"):
        bootstrap_ci([0.5, float("nan")])
    with pytest.raises(ValueError, match="equal-length"):
        paired_difference([1.0], [1.0, 2.0])


def test_huge_meta_gradients_are_rescaled_not_silently_dropped():
    """A finite meta-gradient of 1e21 overflows when squared, so clip-then-Adam gives an
    update of exactly 0 and the outer loop stalls while reporting finite gradients;
    bound_gradient (train.grad_limit) keeps the direction and makes the step real. Small
    gradients pass through unchanged."""
    from metaplastic.outer._gradient import bound_gradient

    params = {"theta": jnp.array([0.03, 0.0])}
    huge = {"theta": jnp.array([3e21, -1e20], jnp.float32)}
    opt = make_optimizer("adam", 1e-3, clip=1.0)
    raw, _ = opt.update(huge, opt.init(params), params)
    assert np.all(np.asarray(raw["theta"]) == 0.0)  # the stall this guards against
    bounded, rescaled = bound_gradient(huge, 1e12)
    assert bool(rescaled)
    assert np.isclose(float(jnp.max(jnp.abs(bounded["theta"]))), 1e12, rtol=1e-5)
    upd, _ = opt.update(bounded, opt.init(params), params)
    assert np.all(np.sign(np.asarray(upd["theta"])) == [-1.0, 1.0])
    small = {"theta": jnp.array([0.5, -2.0])}
    same, flag = bound_gradient(small, 1e12)
    assert not bool(flag) and np.array_equal(np.asarray(same["theta"]), [0.5, -2.0])


def test_stalled_outer_loop_is_reported():
    """Coefficients that stop moving while the meta-gradient is finite get one warning."""
    from metaplastic.run._run import _StallWatch

    watch = _StallWatch("x", patience=2)

    def state(v):
        return OuterState(
            params={"theta": jnp.array([v])},
            opt_state=(),
            key=jnp.zeros(2, jnp.uint32),
            step=jnp.array(0),
            skipped=jnp.array(0),
        )

    ok = {"grad_finite": True}
    assert watch.update(state(1.0), ok) is None
    assert watch.update(state(2.0), ok) is None  # moving
    assert watch.update(state(2.0), {"grad_finite": False}) is None  # a skipped step
    assert watch.update(state(2.0), ok) is None
    msg = watch.update(state(2.0), ok)
    assert msg is not None and "train.grad_limit" in msg
    assert watch.update(state(2.0), ok) is None  # warned once


def test_frozen_coefficients_stay_exactly_and_the_others_learn(small_problem):
    """``trainable`` 0 freezes a coefficient exactly (no gradient reaches the optimiser, no
    update; with an L1 penalty too); the trainable ones move as without the mask."""
    rule = TermPoolRule.from_names(POOL_TERMS, THETA)
    params, _ = eqx.partition(rule, eqx.is_inexact_array)
    mask = eqx.tree_at(lambda p: p.theta, params, jnp.array([1.0, 0.0, 1.0]))
    free = _trainer(small_problem, rule, "forward", l1=0.01)
    frozen = GradientTrainer(
        small_problem,
        rule,
        make_optimizer("adam", 1e-2),
        meta_batch=3,
        l1=0.01,
        mode="forward",
        trainable=mask,
    )
    s_free, s_frozen = free.init(rule, jax.random.key(4)), frozen.init(rule, jax.random.key(4))
    s_free, s_frozen = free.step(s_free)[0], frozen.step(s_frozen)[0]
    th_free, th_frozen = np.asarray(s_free.params.theta), np.asarray(s_frozen.params.theta)
    assert th_frozen[1] == np.float32(THETA[1]) and th_free[1] != np.float32(THETA[1])
    # same start, same episodes: the trainable ones take the same first step as unmasked
    np.testing.assert_allclose(th_frozen[[0, 2]], th_free[[0, 2]], rtol=1e-6)
    assert np.all(th_frozen[[0, 2]] != np.asarray(THETA, np.float32)[[0, 2]])
    s_frozen = frozen.step(s_frozen)[0]  # Adam's moments for it stay 0: still exact
    assert np.asarray(s_frozen.params.theta)[1] == np.float32(THETA[1])


class _NaNGradientProblem(eqx.Module):
    """A stand-in problem: the loss is ``(theta_0 - k)^2`` for episode key ``k``; episodes
    with odd ``k`` add a term of value 0 and gradient NaN, episodes with ``k = 4`` are
    flagged diverged but finite."""

    remat: bool = False

    def episode(self, rule, key):
        from types import SimpleNamespace

        kd = jax.random.key_data(key)[-1]
        k = kd.astype(jnp.float32)
        th = rule.theta
        bad = kd % 2 == 1  # on the integer: float32 rounds large k to even numbers
        good = 1.0 - bad.astype(jnp.float32)  # sqrt(|0| + 0): value 0, derivative 0 * inf
        loss = (th[0] - k) ** 2 + jnp.sqrt(jnp.abs(th[1] - th[1]) + good) - good
        return SimpleNamespace(query_loss=loss, query_accuracy=1.0 - bad, diverged=k == 4.0)


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_episodes_with_a_non_finite_gradient_are_left_out_of_the_mean(mode):
    """Episodes whose meta-gradient is not finite (loss finite) are dropped from the average
    and counted; the others are averaged exactly; a finite diverged episode stays in."""
    rule = TermPoolRule.from_names(POOL_TERMS, [0.5, 0.0, 0.0])
    tr = _trainer(_NaNGradientProblem(), rule, mode, meta_batch=4)
    params = eqx.partition(rule, eqx.is_inexact_array)[0]
    keys = jax.vmap(lambda k: jax.random.wrap_key_data(jnp.array([0, k], jnp.uint32)))(
        jnp.array([2, 3, 4, 5], jnp.uint32)
    )
    grads, aux = tr.loss_and_grad(params, keys)
    # finite episodes k = 2 and 4: d/dtheta_0 (theta_0 - k)^2 = 2 (0.5 - k)
    np.testing.assert_allclose(grads.theta, [(-3.0 - 7.0) / 2, 0.0, 0.0], rtol=1e-6)
    assert int(aux["dropped"]) == 2 and int(aux["diverged"]) == 3
    np.testing.assert_allclose(aux["query_loss"], (1.5**2 + 3.5**2) / 2, rtol=1e-6)


def test_only_stopped_episodes_are_clipped_not_large_healthy_ones():
    """With the weight guard's clipping on, a healthy episode with a large meta-gradient is
    averaged as it is; only diverged (stopped) finite episodes are capped."""
    rule = TermPoolRule.from_names(POOL_TERMS, [0.5, 0.0, 0.0])
    tr = GradientTrainer(
        _NaNGradientProblem(), rule, make_optimizer("adam", 1e-2), meta_batch=4, stopped_clip=3.0
    )
    params = eqx.partition(rule, eqx.is_inexact_array)[0]
    keys = jax.vmap(lambda k: jax.random.wrap_key_data(jnp.array([0, k], jnp.uint32)))(
        jnp.array([2, 4, 6, 100], jnp.uint32)
    )
    grads, _ = tr.loss_and_grad(params, keys)
    np.testing.assert_allclose(grads.theta[0], (-3.0 - 7.0 - 11.0 - 199.0) / 4, rtol=1e-6)


def test_trainer_defaults_are_the_documented_ones(small_problem):
    rule = TermPoolRule.from_names(POOL_TERMS, [0.05, 0.0, 0.0])
    tr = GradientTrainer(small_problem, rule, make_optimizer("adam", 1e-3))
    assert (tr.meta_batch, tr.l1, tr.grad_limit, tr.max_diverged, tr.stopped_clip) == (
        8,
        0.0,
        0.0,
        0.25,
        0.0,
    )
    assert tr.units is None and tr.trainable is None and tr.mode == "forward"


def test_make_optimizer_schedules_only_with_both_lr_end_and_steps():
    """A cosine schedule needs ``lr_end < 1`` and ``steps > 0``; either alone keeps lr."""
    g = {"a": jnp.ones(2)}

    def lrs(opt, n=3):
        state, out = opt.init(g), []
        for _ in range(n):
            u, state = opt.update(g, state, g)
            out.append(-float(u["a"][0]))
        return out

    np.testing.assert_allclose(lrs(make_optimizer("sgd", 0.1, steps=2)), [0.1] * 3, rtol=1e-6)
    np.testing.assert_allclose(lrs(make_optimizer("sgd", 0.1, lr_end=0.5)), [0.1] * 3, rtol=1e-6)
    np.testing.assert_allclose(
        lrs(make_optimizer("sgd", 0.1, lr_end=0.5, steps=2)), [0.1, 0.075, 0.05], rtol=1e-6
    )
    with pytest.raises(MetaplasticError, match="positive"):
        make_optimizer("adam", 0.0)


def test_from_config_clips_stopped_episodes_only_with_the_weight_guard(small_problem):
    import dataclasses

    from metaplastic.run._config import TrainConfig

    rule = TermPoolRule.from_names(POOL_TERMS, [0.05, 0.0, 0.0])
    base = TrainConfig(meta_batch=2, episodes=11, lr_end=0.0, outer="sgd", lr=0.1, clip=0.0)
    off = GradientTrainer.from_config(base, small_problem, rule)
    on = GradientTrainer.from_config(
        dataclasses.replace(base, weight_limit=0.5), small_problem, rule
    )
    assert off.stopped_clip == 0.0 and on.stopped_clip > 0
    # the cosine runs over episodes // meta_batch = 5 whole meta-steps: lr 0 from the 6th on
    g = {"theta": jnp.ones(3)}
    state = on.optimizer.init(g)
    steps = []
    for _ in range(6):
        u, state = on.optimizer.update(g, state, g)
        steps.append(-float(u["theta"][0]))
    assert steps[0] == pytest.approx(0.1) and steps[5] == pytest.approx(0.0, abs=1e-9)


def test_trainer_settings_at_their_bounds(small_problem):
    import dataclasses

    from metaplastic.run._config import TrainConfig

    rule = TermPoolRule.from_names(POOL_TERMS, [0.05, 0.0, 0.0])
    GradientTrainer(small_problem, rule, make_optimizer("adam", 1e-3), meta_batch=1)
    with pytest.raises(MetaplasticError, match="meta_batch"):
        GradientTrainer(small_problem, rule, make_optimizer("adam", 1e-3), meta_batch=0)
    t = TrainConfig()
    for ok in (0.0, 1.0):
        GradientTrainer.check_config(dataclasses.replace(t, lr_end=ok))
    for bad in (-0.1, 1.1):
        with pytest.raises(MetaplasticError, match="lr_end"):
            GradientTrainer.check_config(dataclasses.replace(t, lr_end=bad))
    GradientTrainer.check_config(dataclasses.replace(t, clip=0.0, grad_limit=0.0))
    GradientTrainer.check_config(dataclasses.replace(t, outer="open_es", prune_refit=0))
    with pytest.raises(MetaplasticError, match="prune_refit"):
        GradientTrainer.check_config(dataclasses.replace(t, outer="open_es", prune_refit=1))


def test_a_step_is_bad_when_more_than_max_diverged_of_the_episodes_drop():
    """max_diverged = 0.25 of 4 episodes: one dropped episode is tolerated, two are not
    (unless max_diverged = 0.5)."""
    rule = TermPoolRule.from_names(POOL_TERMS, [0.5, 0.0, 0.0])

    def n_odd(seed):  # the episode keys GradientTrainer.step draws from this start key
        _, sub = jax.random.split(jax.random.key(seed))
        return int(jnp.sum(jax.random.key_data(jax.random.split(sub, 4))[:, -1] % 2))

    one = next(s for s in range(200) if n_odd(s) == 1)
    two = next(s for s in range(200) if n_odd(s) == 2)

    def step(seed, **kw):
        tr = GradientTrainer(
            _NaNGradientProblem(), rule, make_optimizer("sgd", 0.1), meta_batch=4, **kw
        )
        return tr.step(tr.init(rule, jax.random.key(seed)))[1]

    aux = step(one)
    assert int(aux["dropped"]) == 1 and bool(aux["step_ok"])
    aux = step(two)
    assert int(aux["dropped"]) == 2 and not bool(aux["step_ok"])
    assert bool(step(two, max_diverged=0.5)["step_ok"])


def test_bound_gradient_of_an_empty_tree_rescales_nothing():
    from metaplastic.outer._gradient import bound_gradient

    grads, rescaled = bound_gradient({}, 1.0)
    assert grads == {} and not bool(rescaled)
    grads, rescaled = bound_gradient({"a": jnp.array([4.0, -8.0])}, 2.0)
    assert bool(rescaled) and grads["a"].tolist() == [1.0, -2.0]


def test_grad_limit_below_one_rescales_the_meta_gradient():
    """``train.grad_limit`` works at any positive value (here 0.5): the stand-in problem's
    gradient ``2 (theta_0 - k)`` with keys ``k`` of order 1e9 is rescaled."""
    rule = TermPoolRule.from_names(POOL_TERMS, [0.5, 0.0, 0.0])
    tr = GradientTrainer(
        _NaNGradientProblem(), rule, make_optimizer("sgd", 0.1), meta_batch=2, grad_limit=0.5
    )
    _, aux = tr.step(tr.init(rule, jax.random.key(3)))
    assert bool(aux["grad_rescaled"])
