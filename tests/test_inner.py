"""Network, credit assignment and the online inner loop."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaplastic.inner._episode import Carry, online_step, query_metrics, run_episode
from metaplastic.inner._feedback import backward, init_feedback
from metaplastic.inner._network import Network
from metaplastic.rules._rules import TermPoolRule


def _ce(net, state, x, label):
    return -jax.nn.log_softmax(net.forward(state, x)[-1])[label]


def test_xavier_uniform_bounds(small_net, key):
    st = small_net.init(key)
    for W, (o, i) in zip(st.W, small_net.shapes, strict=True):
        a = np.sqrt(6.0 / (o + i))
        assert W.shape == (o, i) and float(jnp.max(jnp.abs(W))) <= a
        assert float(jnp.std(W)) > 0.3 * a


def test_backprop_errors_are_exact_gradients(key):
    net = Network((6, 5, 4, 3), beta=10.0, bias=True)
    state = net.init(key)
    state = eqx.tree_at(lambda s: s.b, state, tuple(0.1 * jnp.ones_like(b) for b in state.b))
    x = jax.random.uniform(jax.random.key(1), (6,))
    label = 2
    hs = net.forward(state, x)
    e_out = jax.nn.softmax(hs[-1]) - jax.nn.one_hot(label, 3)
    errs = backward(net, state, None, hs, e_out, "backprop")
    gW = jax.grad(lambda W: _ce(net, eqx.tree_at(lambda s: s.W, state, W), x, label))(state.W)
    for layer in range(net.n_layers):
        np.testing.assert_allclose(
            np.outer(errs[layer + 1], hs[layer]), gW[layer], rtol=1e-4, atol=1e-6
        )
    gx = jax.grad(lambda xx: _ce(net, state, xx, label))(x)
    np.testing.assert_allclose(errs[0], gx, rtol=1e-4, atol=1e-6)  # input-layer error e_0
    # one online step with the pseudo-gradient rule and backprop feedback is one SGD step
    rule = TermPoolRule.from_names(["pseudo_gradient"], [0.5])
    new, loss, _ = online_step(rule, net, "backprop", Carry(state, None, None), x, label)
    new = new.net
    for layer in range(net.n_layers):
        np.testing.assert_allclose(
            new.W[layer], state.W[layer] - 0.5 * gW[layer], rtol=1e-4, atol=1e-6
        )
    gb = jax.grad(lambda b: _ce(net, eqx.tree_at(lambda s: s.b, state, b), x, label))(state.b)
    np.testing.assert_allclose(new.b[0], state.b[0] - 0.5 * gb[0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(loss, _ce(net, state, x, label), rtol=1e-6)


def test_fa_errors_use_fixed_random_feedback(key):
    net = Network((6, 5, 4, 3), beta=10.0)
    state = net.init(key)
    B = init_feedback("fa", net, jax.random.key(7))
    x = np.asarray(jax.random.uniform(jax.random.key(1), (6,)), np.float64)
    hs = [np.asarray(h, np.float64) for h in net.forward(state, jnp.asarray(x))]
    p = np.exp(hs[-1] - hs[-1].max())
    p /= p.sum()
    e3 = p - np.eye(3)[1]
    Bn = [np.asarray(b, np.float64) for b in B]
    e2 = (Bn[2].T @ e3) * (1 - np.exp(-10.0 * hs[2]))
    e1 = (Bn[1].T @ e2) * (1 - np.exp(-10.0 * hs[1]))
    e0 = Bn[0].T @ e1
    errs = backward(net, state, B, net.forward(state, jnp.asarray(x)), jnp.asarray(e3))
    for got, want in zip(errs, [e0, e1, e2, e3], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert not np.allclose(Bn[2], np.asarray(state.W[2]))


def test_output_activity_for_rules_is_softmax(key):
    net = Network((4, 3), beta=10.0)
    state = net.init(key)
    x = jnp.ones(4)
    rule = TermPoolRule.from_names(["hebbian"], [1.0])
    new, _, _ = online_step(rule, net, "backprop", Carry(state, None, None), x, 0)
    new = new.net
    p = jax.nn.softmax(state.W[0] @ x)
    np.testing.assert_allclose(new.W[0] - state.W[0], jnp.outer(p, x), rtol=1e-5)


def test_scan_equals_python_loop(small_net, small_task, pools, key):
    ep = small_task.sample(key, pools[0])
    rule = TermPoolRule.from_names(["pseudo_gradient", "error_hebbian", "oja"], [0.1, 0.05, 0.02])
    res = run_episode(rule, small_net, "fa", jax.random.key(3), ep)
    k_net, k_fb = jax.random.split(jax.random.key(3))
    state = small_net.init(k_net)
    carry = Carry(state, init_feedback("fa", small_net, k_fb), None)
    losses = []
    for t in range(ep.train_x.shape[0]):
        carry, loss, _ = online_step(rule, small_net, "fa", carry, ep.train_x[t], ep.train_y[t])
        losses.append(loss)
    state = carry.net
    for a, b in zip(res.state.W, state.W, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(res.train_loss, np.array(losses), rtol=1e-4)
    assert res.train_loss.shape == (small_task.n_way * small_task.k_shot,)
    logits = small_net.logits(state, ep.query_x)
    acc = np.mean(np.argmax(logits, 1) == np.asarray(ep.query_y))
    np.testing.assert_allclose(res.query_accuracy, acc)
    assert not bool(res.diverged)


def test_remat_gives_same_result(small_net, small_task, pools, key):
    ep = small_task.sample(key, pools[0])
    rule = TermPoolRule.from_names(["pseudo_gradient", "oja"], [0.1, 0.02])

    def loss(r, remat):
        return run_episode(r, small_net, "fa", key, ep, remat=remat).query_loss

    g1 = jax.grad(lambda r: loss(r, False))(rule).theta
    g2 = jax.grad(lambda r: loss(r, True))(rule).theta
    np.testing.assert_allclose(g1, g2, rtol=1e-4, atol=1e-7)


def test_divergence_is_flagged(small_net, small_task, pools, key):
    ep = small_task.sample(key, pools[0])
    rule = TermPoolRule.from_names(["hebbian"], [1e4])
    res = run_episode(rule, small_net, "fa", key, ep)
    assert bool(res.diverged)
    # argmax of NaN logits is a valid class index; a blown-up network must not score it
    assert float(res.query_accuracy) == 0.0


def test_an_overflowing_query_loss_is_divergence_even_with_finite_weights(
    small_net, small_task, pools, key
):
    """Weights that stay finite but are so large that the logits overflow: the query loss
    is not finite, and that alone flags the episode as diverged."""
    ep = small_task.sample(key, pools[0])
    res = run_episode(TermPoolRule.from_names(["constant"], [1e36]), small_net, "fa", key, ep)
    assert all(bool(jnp.all(jnp.isfinite(w))) for w in res.state.W)
    assert not bool(jnp.isfinite(res.query_loss))
    assert bool(res.diverged)


def test_non_finite_logits_are_never_correct(small_net, key):
    """Query images whose logits are not finite count as wrong even when argmax hits."""
    state = small_net.init(key)
    W = list(state.W)
    W[-1] = W[-1].at[0, 0].set(jnp.nan)  # output unit 0 NaN for every input
    bad = type(state)(W=tuple(W), b=state.b)
    qx = jnp.ones((4, 64))
    qy = jnp.zeros(4, jnp.int32)  # argmax of a NaN row is 0, the label
    assert int(jnp.argmax(small_net.logits(bad, qx)[0])) == 0
    loss, acc = query_metrics(small_net, bad, qx, qy)
    assert float(acc) == 0.0 and not np.isfinite(float(loss))


def test_problem_outcomes_count_diverged_episodes(small_problem):
    from metaplastic.tasks._problem import evaluate_outcomes

    keys = jax.random.key(2)
    blow = TermPoolRule.from_names(["pseudo_gradient", "hebbian"], [0.1, 1e4])
    ok = TermPoolRule.from_names(["pseudo_gradient"], [0.1])
    acc, div = evaluate_outcomes(small_problem, blow, keys, 4)
    assert div.all() and (acc == 0).all()
    acc, div = evaluate_outcomes(small_problem, ok, keys, 4)
    assert not div.any() and np.isfinite(acc).all()


def test_episode_vmap(small_net, small_task, pools):
    keys = jax.random.split(jax.random.key(5), 4)
    rule = TermPoolRule.from_names(["pseudo_gradient"], [0.1])

    @eqx.filter_jit
    def many(keys):
        def one(k):
            ep = small_task.sample(k, pools[0])
            return run_episode(rule, small_net, "backprop", k, ep).query_accuracy

        return jax.vmap(one)(keys)

    accs = many(keys)
    for i in range(4):
        ep = small_task.sample(keys[i], pools[0])
        single = run_episode(rule, small_net, "backprop", keys[i], ep).query_accuracy
        np.testing.assert_allclose(accs[i], single, atol=1e-6)


def test_checkpointed_scan_keeps_values_and_gradients_and_cuts_memory():
    """Segments of ``k`` checkpointed steps (``T % k`` left over as one more segment) give
    the plain scan's carry, outputs and gradient bit for bit, and at ``k = sqrt(T)`` the
    compiled reverse pass needs far less scratch memory than storing every step."""
    import pytest

    from metaplastic.inner._episode import checkpointed_scan, segment_length

    def body(W, x):
        y = jnp.tanh(W @ x)
        return W + 0.01 * jnp.outer(y, x) - 0.01 * (y**2)[:, None] * W, (jnp.sum(y), y)

    T, n = 64, 48
    xs = jax.random.normal(jax.random.key(0), (T, n))
    W0 = jax.random.normal(jax.random.key(1), (n, n)) / np.sqrt(n)

    def loss(W, segment):
        W, (s, y) = checkpointed_scan(body, W, xs, segment)
        return jnp.sum(W**2) + jnp.sum(s * jnp.arange(T)) + jnp.sum(y[::7])

    plain_grad = jax.jit(jax.grad(lambda W: loss(W, 0)))
    ref_carry, ref_out = jax.lax.scan(body, W0, xs)
    for segment in (1, 5):  # 5: 12 segments and a remainder of 4
        carry, out = checkpointed_scan(body, W0, xs, segment)
        np.testing.assert_array_equal(carry, ref_carry)
        np.testing.assert_array_equal(out[1], ref_out[1])
        grad = jax.jit(jax.grad(lambda W, k=segment: loss(W, k)))(W0)
        np.testing.assert_array_equal(grad, plain_grad(W0))
    assert [segment_length(r, T) for r in (False, True, 0, 1, 5, 100, -1)] == [0, 1, 0, 1, 5, 64, 8]
    assert segment_length(-1, 10) == 4
    with pytest.raises(ValueError, match="segment length"):
        segment_length(-2, T)

    def scratch(segment):
        f = jax.jit(jax.grad(lambda W: loss(W, segment)))
        return f.lower(W0).compile().memory_analysis().temp_size_in_bytes

    assert scratch(segment_length(-1, T)) < 0.5 * scratch(0)  # sqrt(64) = 8 steps a segment


def test_forward_backward_reports_the_sample_loss_and_whether_it_was_right(key):
    from metaplastic.inner._episode import forward_backward

    net = Network((6, 5, 4), beta=10.0)
    state = net.init(key)
    x = jax.random.normal(jax.random.key(5), (6,))
    logits = net.forward(state, x)[-1]
    best = int(jnp.argmax(logits))
    carry = Carry(state, None, None)
    for label in range(4):
        *_, loss, correct = forward_backward(net, "backprop", carry, x, label)
        assert float(correct) == float(label == best)
        np.testing.assert_allclose(loss, -jax.nn.log_softmax(logits)[label], rtol=1e-6)


def test_query_metrics_defaults_to_cross_entropy_at_temperature_one(key):
    net = Network((6, 5, 4), beta=10.0)
    state = net.init(key)
    qx = jax.random.normal(jax.random.key(6), (7, 6))
    qy = jnp.arange(7) % 4
    loss, acc = query_metrics(net, state, qx, qy)
    logp = jax.nn.log_softmax(net.logits(state, qx))[jnp.arange(7), qy]
    np.testing.assert_allclose(loss, -jnp.mean(logp), rtol=1e-6)
    np.testing.assert_allclose(loss, query_metrics(net, state, qx, qy, "cross_entropy", 1.0)[0])


def test_query_metrics_temperature_and_the_probability_error_objective(key):
    """``p_T = softmax(z / T)``; ``prob_error = 1 - mean_q p_T(y_q)``."""
    net = Network((6, 5, 4), beta=10.0)
    state = net.init(key)
    qx = jax.random.normal(jax.random.key(7), (7, 6)) * 3.0
    qy = jnp.arange(7) % 4
    z = net.logits(state, qx)
    p2 = jax.nn.softmax(z / 2.0)[jnp.arange(7), qy]
    loss, _ = query_metrics(net, state, qx, qy, "cross_entropy", 2.0)
    np.testing.assert_allclose(loss, -jnp.mean(jnp.log(p2)), rtol=1e-5)
    loss, _ = query_metrics(net, state, qx, qy, "prob_error", 2.0)
    np.testing.assert_allclose(loss, 1.0 - jnp.mean(p2), rtol=1e-5)


@pytest.mark.parametrize("activation", ["relu", "tanh", "softplus"])
def test_activation_derivatives_from_the_output(activation):
    """``g'(z)`` from ``h = g(z)`` against autodiff, including relu's dead units (h = 0:
    derivative 0) and outputs between 0 and 1."""
    from metaplastic.inner._network import _act

    net = Network((3, 9, 2), activation=activation, beta=2.0)
    z = jnp.array([-2.0, -0.5, -1e-3, 0.0, 1e-3, 0.3, 0.9, 1.5, 3.0])
    h = _act(activation, 2.0, z)
    want = jax.vmap(jax.grad(lambda v: _act(activation, 2.0, v)))(z)
    if activation == "relu":
        want = jnp.where(z > 0, 1.0, 0.0)  # autodiff's value at exactly 0 is a convention
    np.testing.assert_allclose(net.act_deriv_from_output(h), want, rtol=1e-4, atol=1e-5)
