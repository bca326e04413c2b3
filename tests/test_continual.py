"""The class-incremental task and truncated meta-gradients (``train.truncation``)."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from metaplastic import MetaplasticError
from metaplastic.inner._episode import query_metrics
from metaplastic.inner._network import Network
from metaplastic.outer import GradientTrainer, check_train_config, make_optimizer
from metaplastic.outer._evolution import EvolutionTrainer
from metaplastic.rules._rules import TermPoolRule
from metaplastic.run import build_config
from metaplastic.tasks import ContinualTask, PCATask
from metaplastic.tasks._problem import Problem

TASK = ContinualTask(4, 3, 2, stages=2, stage_steps=6)  # 12 updates, classes {0,1} then {2,3}
NET = Network((64, 6, 4))
RULE = TermPoolRule.from_names(["pseudo_gradient", "oja"], [0.05, 0.01])


def _trainer(pools, mode="reverse", truncation=0, task=TASK):
    problem = Problem(NET, "fa", task, pools[0])
    opt = make_optimizer("adam", 1e-3)
    return GradientTrainer(problem, RULE, opt, meta_batch=2, mode=mode, truncation=truncation)


def _grads(tr):
    params, _ = eqx.partition(RULE, eqx.is_inexact_array)
    g, aux = tr.loss_and_grad(params, jax.random.split(jax.random.key(5), 2))
    return np.asarray(ravel_pytree(g)[0]), float(aux["query_loss"])


def test_the_stream_teaches_the_classes_stage_by_stage(pools):
    ep = TASK.sample(jax.random.key(0), pools[0])
    y = np.asarray(ep.train_y)
    assert y.shape == (12,) and ep.train_x.shape == (12, 64)
    assert set(y[:6]) <= {0, 1} and set(y[6:]) <= {2, 3}
    assert sorted(np.asarray(ep.query_y).tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]
    # every training image of a class is one of that class's k_shot images, and none of
    # them is a query image
    train_rows = {tuple(np.asarray(r)) for r in ep.train_x}
    assert not train_rows & {tuple(np.asarray(r)) for r in ep.query_x}
    for c in range(4):
        assert len({tuple(np.asarray(r)) for r in ep.train_x[y == c]}) <= 3


@pytest.mark.slow
def test_one_segment_is_the_whole_episode_and_modes_agree(pools):
    """``truncation = T`` is the untruncated meta-gradient; with 3 segments forward and
    reverse mode give the same truncated gradient, and it differs from the whole one (the
    terms that cross a boundary are dropped)."""
    whole, loss = _grads(_trainer(pools))
    one, loss1 = _grads(_trainer(pools, truncation=12))
    np.testing.assert_allclose(one, whole, rtol=1e-5)
    assert loss1 == pytest.approx(loss, rel=1e-6)
    rev, _ = _grads(_trainer(pools, truncation=4))
    fwd, _ = _grads(_trainer(pools, "forward", truncation=4))
    np.testing.assert_allclose(fwd, rev, rtol=1e-4, atol=1e-6)
    assert np.all(np.isfinite(rev)) and not np.allclose(rev, whole, rtol=1e-3)


def test_a_segment_loss_covers_the_classes_seen_so_far(pools):
    key = jax.random.key(2)
    carry0, xs, ctx = TASK.segments(RULE, NET, "fa", key, pools[0], 6)
    assert jax.tree_util.tree_leaves(xs)[0].shape[:2] == (2, 6)
    seg0 = jax.tree_util.tree_map(lambda a: a[0], xs)
    carry, stopped, loss, acc, dv = TASK.run_segment(
        RULE, NET, "fa", carry0, jnp.array(False), seg0, 0, ctx
    )
    _, qx, qy, _ = ctx
    seen = np.asarray(qy) < 2  # the first stage's classes only
    want, want_acc = query_metrics(NET, carry.net, qx[seen], qy[seen])
    assert float(loss) == pytest.approx(float(want), rel=1e-6)
    assert float(acc) == pytest.approx(float(want_acc))
    assert not bool(stopped) and not bool(dv)
    full = TASK.run(RULE, NET, "fa", key, pools[0])
    seg1 = jax.tree_util.tree_map(lambda a: a[1], xs)
    end = TASK.run_segment(RULE, NET, "fa", carry, stopped, seg1, 1, ctx)
    # the last segment's loss is the whole episode's meta-loss (every class seen)
    assert float(end[2]) == pytest.approx(float(full.query_loss), rel=1e-5)
    assert float(TASK.score(full)) == float(full.query_accuracy)  # the whole episode's
    assert TASK.diverged_score() == 0.0


def test_truncation_is_refused_where_it_cannot_run(pools):
    with pytest.raises(MetaplasticError, match="does not divide"):
        _trainer(pools, truncation=5)
    pca = Problem(Network((4, 1)), "backprop", PCATask(4, 20, 0.5), None)
    with pytest.raises(MetaplasticError, match="cannot cut its episodes.*continual"):
        GradientTrainer(pca, RULE, make_optimizer("adam", 1e-3), truncation=10)
    with pytest.raises(MetaplasticError, match="truncation must be >= 0"):
        _trainer(pools, truncation=-1)
    with pytest.raises(MetaplasticError, match="multiple of stages"):
        ContinualTask(5, 3, 2, stages=2, stage_steps=6)
    with pytest.raises(MetaplasticError, match="truncation needs an outer loop that can learn"):
        build_config("pool", "continual_digits", {"outer": "open_es", "truncation": 100})
    with pytest.raises(MetaplasticError, match="open_es.*evaluates whole episodes"):
        EvolutionTrainer(Problem(NET, "fa", TASK, pools[0]), RULE, "open_es", truncation=4)
    with pytest.raises(MetaplasticError, match="does not divide"):
        EvolutionTrainer(Problem(NET, "fa", TASK, pools[0]), RULE, "persistent_es", truncation=5)
    with pytest.raises(MetaplasticError, match="population must be even for persistent_es"):
        build_config("pool", "continual_digits", {"outer": "persistent_es", "population": 5})
    for outer in ("persistent_es", "NoiseReuseES"):
        check_train_config(
            build_config("pool", "continual_digits", {"outer": outer, "population": 4}).train
        )
    with pytest.raises(MetaplasticError, match="cannot cut its episodes"):  # before any run
        build_config("pool", "digits", {"truncation": 10})  # directory is made
    with pytest.raises(MetaplasticError, match="does not divide"):
        build_config("pool", "continual_digits", overrides=["train.truncation=333"])
    check_train_config(build_config("pool", "continual_digits").train)


@pytest.mark.slow  # a memory measurement (~10 s); scripts/continual_truncation.py makes it
def test_truncated_memory_does_not_grow_with_the_episode(pools):
    """Compiled scratch memory of a truncated meta-gradient: one segment's residuals,
    whatever the number of segments; only the stream itself (64 pixels and a label per
    update) grows with T, while plain reverse mode keeps every step's weights."""
    params, _ = eqx.partition(RULE, eqx.is_inexact_array)
    keys = jax.random.split(jax.random.key(7), 1)

    def scratch(stage_steps, truncation):
        task = ContinualTask(4, 3, 2, stages=2, stage_steps=stage_steps)
        tr = _trainer(pools, truncation=truncation, task=task)
        f = jax.jit(lambda p: tr.loss_and_grad(p, keys)[0])
        return f.lower(params).compile().memory_analysis().temp_size_in_bytes

    short, long = scratch(8, 4), scratch(64, 4)
    stream = (128 - 16) * (64 + 2) * 4  # bytes: the extra updates' images, labels, draws
    assert long - short < 1.5 * stream
    assert scratch(64, 0) - long > 3 * (long - short)


def _es(pools, name, **kw):
    problem = Problem(NET, "fa", TASK, pools[0])
    settings = {"population": 4, "sigma": 1e-6, "lr": 0.0, "meta_batch": 2, "truncation": 4}
    return EvolutionTrainer(problem, RULE, name, **{**settings, **kw})


@pytest.mark.slow  # ~12 s each; the gradient-estimate test below chains segments too
@pytest.mark.parametrize("name", ["persistent_es", "noise_reuse_es"])
def test_persistent_es_carries_every_member_through_the_whole_episode(pools, name):
    """With the mean held still (step 0) and members within 1e-6 of it, one step learns
    the episode segment by segment: the mean's end-of-episode loss and accuracy are the
    whole episode's, every member's fitness is the mean's (their network states persist
    across segments, not restarted), and the strategy's accumulators are reset for the
    next episode."""
    tr = _es(pools, name)
    state = tr.init(RULE, jax.random.key(0))
    new, aux = tr.step(state)
    _, k_eps, _ = jax.random.split(jax.random.wrap_key_data(state.key), 3)
    loss, whole = Problem(NET, "fa", TASK, pools[0]).meta_loss(
        RULE, jax.random.split(k_eps, 2), 0.0
    )
    assert float(aux["query_loss"]) == pytest.approx(float(loss), rel=1e-5)
    assert float(aux["query_accuracy"]) == pytest.approx(float(whole["query_accuracy"]))
    assert float(aux["mean_fitness"]) == pytest.approx(float(aux["fitness"]), abs=1e-6)
    assert int(new.es_state.inner_step_counter) == 0 and int(new.step) == 1
    if name == "persistent_es":
        assert not np.any(np.asarray(new.es_state.pert_accum))


@pytest.mark.parametrize(  # ~10 s each
    "name", ["persistent_es", pytest.param("noise_reuse_es", marks=pytest.mark.slow)]
)
def test_persistent_es_estimates_the_whole_episodes_gradient(pools, name):
    """Over one episode of 3 segments, with a plain SGD step too small to move the rule,
    the mean's displacement divided by the step is the sum of the strategy's per-segment
    estimates: it matches the exact gradient of ``sum_k L_k`` through the whole episode
    (cosine > 0.98, norm within 15%), which truncated meta-gradients miss by about half
    (they drop every term that crosses a segment boundary)."""
    import optax
    from evosax.algorithms import NoiseReuseES, PersistentES

    lr, P, L = 1e-7, 256, 4
    tr = _es(pools, name, population=P, sigma=1e-3, objective="loss", vmap_width=-1)
    params, static = eqx.partition(RULE, eqx.is_inexact_array)
    cls = PersistentES if name == "persistent_es" else NoiseReuseES
    sgd = cls(P, params, optimizer=optax.sgd(lr), std_schedule=optax.constant_schedule(1e-3))
    object.__setattr__(tr, "strategy", sgd)  # the same strategy with SGD, to read g off
    state = tr.init(RULE, jax.random.key(0))
    new, _ = tr.step(state)
    moved = ravel_pytree(eqx.partition(tr.rule(new), eqx.is_inexact_array)[0])[0]
    estimate = -(np.asarray(moved) - np.asarray(ravel_pytree(params)[0])) / lr
    _, k_eps, _ = jax.random.split(jax.random.wrap_key_data(state.key), 3)
    keys = jax.random.split(k_eps, 2)

    def whole(p):  # sum_k L_k, differentiated through every segment
        rule = eqx.combine(p, static)

        def one(k):
            c, xs, ctx = TASK.segments(rule, NET, "fa", k, pools[0], L)
            s, total = jnp.array(False), 0.0
            for i in range(3):
                seg = jax.tree_util.tree_map(lambda a, i=i: a[i], xs)
                c, s, loss, _, _ = TASK.run_segment(rule, NET, "fa", c, s, seg, i, ctx)
                total = total + loss
            return total

        return jnp.mean(jax.vmap(one)(keys))

    exact = np.asarray(ravel_pytree(jax.grad(whole)(params))[0])
    cos = estimate @ exact / np.linalg.norm(estimate) / np.linalg.norm(exact)
    assert cos > 0.98
    assert np.linalg.norm(estimate) == pytest.approx(np.linalg.norm(exact), rel=0.15)
    truncated, _ = _trainer(pools, truncation=L).loss_and_grad(params, keys)
    truncated = 3 * np.asarray(ravel_pytree(truncated)[0])  # it averages over segments
    assert np.linalg.norm(truncated) < 0.7 * np.linalg.norm(exact)


def test_persistent_es_scores_a_stopped_episode_as_diverged(pools):
    """An episode the weight guard stops keeps finite, frozen weights; its accuracy counts
    0 in a member's fitness (as in validation), never what the frozen weights score, and
    the member is counted as diverged. Settings: lr and sigma_decay are per episode."""
    task = ContinualTask(4, 3, 2, stages=2, stage_steps=6, weight_limit=1e-3)  # stops at once
    tr = EvolutionTrainer(
        Problem(NET, "fa", task, pools[0]), RULE, "persistent_es",
        population=4, sigma=1e-3, lr=3e-3, sigma_decay=0.5, meta_batch=2, truncation=4,
    )  # fmt: skip
    new, aux = tr.step(tr.init(RULE, jax.random.key(0)))
    assert int(aux["diverged"]) == 4 and float(aux["query_accuracy"]) == 0.0
    assert float(aux["mean_fitness"]) == pytest.approx(1.0)
    newer, _ = tr.step(new)  # sigma_decay per episode (evosax lags it by a generation)
    assert float(newer.es_state.std) == pytest.approx(0.5 * float(new.es_state.std), rel=1e-5)
