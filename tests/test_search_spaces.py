"""Rule search spaces: every rule kind's sympy form equals its JAX update, Taylor/MLP/
equation rules, stateful terms, feedback pathways, user terms, safe parse-back, export
formats, pruning by effect, distillation and the PCA ground truth."""

from __future__ import annotations

import textwrap

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sympy as sp

from metaplastic._errors import MetaplasticError
from metaplastic.export._export import (
    equation_rule_from_export,
    format_rule,
    prune_by_effect,
    rule_from_json,
    rule_to_json,
)
from metaplastic.inner._episode import Carry, online_step, run_episode
from metaplastic.inner._feedback import backward, init_feedback
from metaplastic.inner._network import Network
from metaplastic.rules._rule_kinds import (
    MONOMIALS,
    EquationRule,
    MLPRule,
    TaylorRule,
    monomial_index,
)
from metaplastic.rules._rules import PlasticFeedback, TermPoolRule
from metaplastic.rules._signals import NeuronState
from metaplastic.rules._symbolic import is_matrix, parse_equation, scalar_symbols
from metaplastic.rules._terms import TERMS, sympy_symbols

from .conftest import random_signals


def _numeric(expr, s):
    """Evaluate a rule's sympy form with sympy itself (not metaplastic's evaluator)."""
    n_out, n_in = np.asarray(s.W).shape
    if is_matrix(expr):
        S = sympy_symbols()
        vals = {
            "x": s.x[:, None],
            "y": s.y[:, None],
            "e": s.e[:, None],
            "e_pre": s.e_pre[:, None],
            "W": s.W,
            "one_in": np.ones((n_in, 1)),
            "one_out": np.ones((n_out, 1)),
            "ybar": s.ybar[:, None],
            "theta_M": s.theta_M[:, None],
            "nrm0": s.nrm0[:, None],
        }
        subs = {S[k]: sp.Matrix(np.asarray(v, np.float64)) for k, v in vals.items()}
        subs.update({S["n_out"]: n_out, S["n_in"]: n_in})
        return np.asarray(sp.Matrix(expr.subs(subs).doit()).evalf(), np.float64)
    Z = scalar_symbols()
    names = ("x", "y", "W", "e", "e_pre")
    f = sp.lambdify([Z[n] for n in names], expr, modules="numpy")
    arr = lambda v: np.asarray(v, np.float64)  # noqa: E731
    out = f(arr(s.x)[None, :], arr(s.y)[:, None], arr(s.W), arr(s.e)[:, None], arr(s.e_pre)[None])
    return np.broadcast_to(out, (n_out, n_in))


def _rules():
    rng = np.random.default_rng(0)
    taylor = TaylorRule(rng.normal(size=81) * 0.1, mask=(rng.random(81) < 0.5).tolist())
    mlp = MLPRule.init((5,), 0.3, seed=1)
    mlp = eqx.tree_at(lambda r: r.weights[-1], mlp, jnp.asarray(rng.normal(size=(5, 1))))
    return {
        "term_pool": TermPoolRule.from_names(sorted(TERMS), rng.normal(size=len(TERMS))),
        "taylor": taylor,
        "mlp": mlp,
        "equation_matrix": EquationRule.from_text("-0.3*e*x.T + 0.2*(y*x.T - y*y.T*W)"),
        "equation_elementwise": EquationRule.from_text("0.5*x*y - 0.25*W*y**2 + tanh(e)*x"),
        "plastic_feedback": PlasticFeedback(
            TermPoolRule.from_names(["pseudo_gradient", "oja"], [0.1, 0.2]),
            jnp.asarray([0.1, 0.01]),
        ),
    }


RULES = _rules()


@pytest.mark.parametrize("kind", sorted(RULES))
def test_every_rule_kind_sympy_equals_jax(kind):
    rule = RULES[kind]
    for seed in range(2):
        s = random_signals(40 + seed, n_out=4, n_in=3)
        want = np.asarray(rule(0, s), np.float64)
        got = _numeric(rule.to_sympy(), s)
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("kind", sorted(RULES))
def test_every_rule_kind_json_round_trip(kind):
    rule = RULES[kind]
    data = rule_to_json(rule, 0.0)
    back = rule_from_json(data)
    s = random_signals(3)
    np.testing.assert_allclose(np.asarray(back(0, s)), np.asarray(rule(0, s)), rtol=1e-5, atol=1e-6)
    assert back.coefficients().keys() == rule.coefficients().keys()


@pytest.mark.parametrize("kind", ["term_pool", "taylor", "equation_matrix", "mlp"])
def test_exported_text_parses_back_to_the_same_update(kind):
    rule = RULES[kind]
    eq = equation_rule_from_export(rule, 0.0)
    s = random_signals(7)
    np.testing.assert_allclose(np.asarray(eq(0, s)), np.asarray(rule(0, s)), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("kind", ["term_pool", "taylor", "equation_elementwise"])
def test_python_export_runs(kind):
    rule = RULES[kind]
    src = format_rule(rule, "python", 0.0)
    namespace: dict = {}
    exec(compile(src, "<export>", "exec"), namespace)  # our own generated code
    s = random_signals(9)
    col = lambda v: jnp.asarray(v)[:, None]  # noqa: E731
    if is_matrix(rule.to_sympy()):
        args = (col(s.x), col(s.y), col(s.e), col(s.e_pre), s.W, col(s.ybar), col(s.theta_M))
        out = namespace["delta_w"](*args, col(s.nrm0))
    else:
        row = lambda v: jnp.asarray(v)[None, :]  # noqa: E731
        out = namespace["delta_w"](row(s.x), col(s.y), col(s.e), row(s.e_pre), s.W)
    np.testing.assert_allclose(np.asarray(out), np.asarray(rule(0, s)), rtol=1e-3, atol=1e-4)


def test_python_export_of_a_per_layer_rule_has_one_function_per_layer():
    rule = TermPoolRule.from_names(["pseudo_gradient", "hebbian"], [[1.0, 0.0], [0.5, 0.25]])
    namespace: dict = {}
    exec(compile(format_rule(rule, "python", 0.0), "<export>", "exec"), namespace)
    s = random_signals(9)
    col = lambda v: jnp.asarray(v)[:, None]  # noqa: E731
    for layer in (0, 1):
        fn = namespace[f"delta_w_layer{layer}"]
        out = fn(col(s.x), col(s.y), col(s.e), col(s.e_pre), s.W)
        np.testing.assert_allclose(np.asarray(out), np.asarray(rule(layer, s)), rtol=1e-5)


def test_mlp_sympy_form_with_two_hidden_layers_and_biases():
    rng = np.random.default_rng(1)
    rule = MLPRule.init((3, 2), 0.3, seed=2)
    assert rule.hidden == (3, 2)
    biases = tuple(jnp.asarray(rng.normal(size=b.shape), jnp.float32) for b in rule.biases)
    last = jnp.asarray(rng.normal(size=(2, 1)), jnp.float32)
    pg = jnp.asarray(0.2, jnp.float32)  # the pseudo-gradient part is in the equation too
    rule = eqx.tree_at(lambda r: (r.weights[-1], r.biases, r.theta_pg), rule, (last, biases, pg))
    s = random_signals(5)
    want = np.asarray(rule(0, s), np.float64)
    np.testing.assert_allclose(_numeric(rule.to_sympy(), s), want, rtol=2e-4, atol=2e-5)


def test_pca_task_start_scale_and_online_error():
    """``w0`` scales with ``init_scale``; the pca task's per-step ``train_loss`` is the
    reconstruction error ``||x_t - w (w . x_t)||^2`` of the sample before the update."""
    from metaplastic.tasks._pca import PCATask

    key = jax.random.key(3)
    task = PCATask(4, 5, 0.5)
    x, _, _, w0 = task.sample(key)
    w0_big = PCATask(4, 5, 0.5, init_scale=2.0).sample(key)[3]
    np.testing.assert_allclose(np.asarray(w0_big), 2.0 * np.asarray(w0), rtol=1e-6)
    still = TermPoolRule.from_names(["hebbian"], [0.0])  # no plasticity: w stays w0
    res = task.run(still, Network((4, 1)), "backprop", key)
    w, xs = np.asarray(w0[0], np.float64), np.asarray(x, np.float64)
    want = np.sum((xs - np.outer(xs @ w, w)) ** 2, axis=1)
    np.testing.assert_allclose(np.asarray(res.train_loss), want, rtol=1e-4)


def test_taylor_oja_is_the_single_neuron_oja_term():
    theta = np.zeros(81)
    theta[monomial_index("x*y")] = 1.0
    theta[monomial_index("W*y**2")] = -1.0
    assert monomial_index("1100") == monomial_index("x*y")
    rule = TaylorRule(theta)
    s = random_signals(1, n_out=1, n_in=5)
    np.testing.assert_allclose(
        np.asarray(rule(0, s)), np.asarray(TERMS["oja"]()(s)), rtol=1e-5, atol=1e-6
    )
    assert str(rule.to_sympy()) == "-1.0*W*y**2 + 1.0*x*y"
    assert str(rule.to_sympy(threshold=1.0)) == "0"  # |theta| <= threshold is pruned
    with pytest.raises(MetaplasticError, match="not a monomial"):
        monomial_index("x**3")
    assert len(MONOMIALS) == 81
    # any way of writing a monomial names it (parsed, then printed the canonical way)
    assert monomial_index("y*x") == monomial_index("x*y")
    assert monomial_index("y**2*W") == monomial_index("W*y**2")
    for shape in [(80,), (1, 1, 81), (2, 80)]:
        with pytest.raises(MetaplasticError, match=r"need \(81,\) or \(L, 81\)"):
            TaylorRule(np.zeros(shape))


@pytest.mark.parametrize(
    "text",
    [
        "__import__('os').system('true')",
        "().__class__.__bases__[0]",
        "x.__class__",
        "lambda: 1",
        "eval('1')",
        "x; import os",
        "open('/etc/passwd')",
        "9**9**9**9",
        "x if y else W",
        "getattr(x, 'T')",
    ],
)
def test_parse_back_refuses_code(text):
    with pytest.raises(MetaplasticError) as err:
        parse_equation(text)
    assert "\n" not in str(err.value)


def test_parse_back_shapes_and_forms():
    assert is_matrix(parse_equation("dW = -e*x.T"))
    assert not is_matrix(parse_equation("x*y - y^2*W"))
    with pytest.raises(MetaplasticError, match="shape"):
        parse_equation("x*y.T")
    with pytest.raises(MetaplasticError, match="empty"):
        parse_equation("  ")
    rule = EquationRule.from_text("0.5*x*y - 0.25*W*y**2")
    assert sorted(rule.coefficients().values()) == [-0.25, 0.5]
    g = jax.grad(lambda r: jnp.sum(r(0, random_signals(2))))(rule)
    assert np.all(np.isfinite(np.asarray(g.theta))) and np.any(np.asarray(g.theta) != 0)


def test_neuron_state_bias_correction_and_norm_scaling():
    W = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4)), jnp.float32)
    ns = NeuronState.start(W).advance(jnp.asarray([1.0, 2.0, 3.0]), 0.1)
    ybar, thm = ns.averages(0.1)
    np.testing.assert_allclose(ybar, [1.0, 2.0, 3.0], rtol=1e-6)
    np.testing.assert_allclose(thm, [1.0, 4.0, 9.0], rtol=1e-6)
    # coefficient 1 on scaling_norm restores every row to its starting norm
    net = Network((4, 3), beta=10.0)
    rule = TermPoolRule.from_names(["hebbian", "scaling_norm"], [0.5, 1.0])
    assert rule.uses_state()
    W2 = W * 3.0
    carry = Carry(net.init(jax.random.key(0)), None, (NeuronState.start(W),))
    carry = eqx.tree_at(lambda c: c.net.W, carry, (W2,))
    new, _, _ = online_step(rule, net, "backprop", carry, jnp.ones(4), 0)
    # the scaling term acts on the pre-update W: W + 0.5 hebb + (nrm0/|W| - 1) W
    rows = np.linalg.norm(
        np.asarray(W2 + (new.net.W[0] - W2))
        - 0.5 * np.outer(np.asarray(jax.nn.softmax(W2 @ jnp.ones(4))), np.ones(4)),
        axis=1,
    )
    np.testing.assert_allclose(rows, np.linalg.norm(np.asarray(W), axis=1), rtol=1e-5)


def test_dfa_and_sign_symmetric_errors(key):
    net = Network((5, 4, 3, 2), beta=10.0)
    state = net.init(key)
    x = jax.random.uniform(jax.random.key(1), (5,))
    hs = net.forward(state, x)
    e_out = jax.nn.softmax(hs[-1]) - jax.nn.one_hot(1, 2)
    D = init_feedback("dfa", net, jax.random.key(2))
    assert [d.shape for d in D] == [(2, 5), (2, 4), (2, 3)]
    errs = backward(net, state, D, hs, e_out, "dfa")
    deriv = lambda h: 1 - np.exp(-10.0 * np.asarray(h))  # noqa: E731
    tol = {"rtol": 1e-4, "atol": 1e-6}
    np.testing.assert_allclose(errs[2], (D[2].T @ e_out) * deriv(hs[2]), **tol)
    np.testing.assert_allclose(errs[1], (D[1].T @ e_out) * deriv(hs[1]), **tol)
    np.testing.assert_allclose(errs[0], D[0].T @ e_out, **tol)
    assert init_feedback("sign_symmetric", net, key) is None
    errs = backward(net, state, None, hs, e_out, "sign_symmetric")
    B2 = np.sign(np.asarray(state.W[2])) * np.mean(np.abs(np.asarray(state.W[2])))
    np.testing.assert_allclose(errs[2], (B2.T @ e_out) * deriv(hs[2]), **tol)


def test_kolen_pollack_feedback_is_plastic_and_meta_learnable(small_net, small_task, pools):
    inner = TermPoolRule.from_names(["pseudo_gradient"], [0.1])
    rule = PlasticFeedback(inner, jnp.asarray([0.1, 0.05]))
    ep = small_task.sample(jax.random.key(0), pools[0])
    B0 = init_feedback("kolen_pollack", small_net, jax.random.split(jax.random.key(3))[1])
    res = run_episode(rule, small_net, "kolen_pollack", jax.random.key(3), ep)
    assert np.isfinite(float(res.query_loss))

    def loss(r):
        return run_episode(r, small_net, "kolen_pollack", jax.random.key(3), ep).query_loss

    g = jax.grad(loss)(rule)
    assert float(jnp.abs(g.theta_fb).sum()) > 0  # the feedback coefficients get gradients
    # one step: dB = -theta_fb[0] e x^T - theta_fb[1] B
    carry = Carry(small_net.init(jax.random.key(5)), B0, None)
    new, _, _ = online_step(rule, small_net, "kolen_pollack", carry, ep.train_x[0], 0)
    assert not np.allclose(np.asarray(new.B[0]), np.asarray(B0[0]))
    with pytest.raises(MetaplasticError, match="feedback plasticity"):
        online_step(inner, small_net, "kolen_pollack", carry, ep.train_x[0], 0)


def test_user_term_from_a_file(tmp_path):
    f = tmp_path / "my_terms.py"
    f.write_text(
        textwrap.dedent(
            """
            import jax.numpy as jnp
            from metaplastic import user_term

            @user_term(sympy=lambda S: -S["y"] * S["x"].T, description="anti-Hebbian")
            def anti_hebbian(s):
                return -jnp.outer(s.y, s.x)

            def undecorated(s):
                return s.W
            """
        )
    )
    ref = f"{f}:anti_hebbian"
    rule = TermPoolRule.from_names(["pseudo_gradient", ref], [0.1, 0.5])
    s = random_signals(4)
    want = -0.1 * np.outer(s.e, s.x) - 0.5 * np.outer(s.y, s.x)
    np.testing.assert_allclose(np.asarray(rule(0, s)), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_numeric(rule.to_sympy(), s), want, rtol=1e-5, atol=1e-6)
    data = rule_to_json(rule, 0.0)
    with pytest.raises(MetaplasticError, match="never from the path"):
        rule_from_json(data)  # a saved rule never imports the path written in it
    for bad, msg in [
        (f"{f}:undecorated", "decorate"),
        (f"{f}:missing", "has no function"),
        (f"{tmp_path}/nope.py:f", "not found"),
        ("no_such_module_xyz:f", "cannot import"),
    ]:
        with pytest.raises(MetaplasticError, match=msg):
            TermPoolRule.from_names([bad])


def test_prune_by_effect_keeps_what_matters():
    rule = TermPoolRule.from_names(["pseudo_gradient", "hebbian", "oja"], [0.5, 0.001, 0.2])

    def score(r):  # only the pseudo-gradient coefficient matters
        return 1.0 - abs(float(r.theta[0]) - 0.5)

    pruned, report = prune_by_effect(rule, score, tolerance=0.01)
    np.testing.assert_allclose(np.asarray(pruned.theta), [0.5, 0.0, 0.0])
    assert [r["coefficient"] for r in report if r.get("pruned")] == ["hebbian", "oja"]
    with pytest.raises(MetaplasticError, match="distil"):
        prune_by_effect(RULES["mlp"], score, 0.01)


def test_prune_by_effect_names_per_layer_coefficients_and_reports_progress():
    """Per-layer coefficients (3 terms, 2 layers) are tried smallest first and named
    ``term@layer``; a coefficient of exactly 1 is tried, one that is already 0 is not."""
    theta = [[0.5, 0.001, 0.0], [0.3, 0.002, 1.0]]
    rule = TermPoolRule.from_names(["pseudo_gradient", "hebbian", "oja"], theta)

    def score(r):  # only layer 1's pseudo-gradient coefficient matters
        return 1.0 - abs(float(r.theta[1, 0]) - 0.3)

    seen = []
    pruned, report = prune_by_effect(rule, score, tolerance=0.01, progress=seen.append)
    np.testing.assert_allclose(np.asarray(pruned.theta), [[0.0, 0.0, 0.0], [0.3, 0.0, 0.0]])
    tried = [(r["coefficient"], r["pruned"]) for r in report[1:]]
    assert tried == [
        ("hebbian@0", True),
        ("hebbian@1", True),
        ("pseudo_gradient@1", False),
        ("pseudo_gradient@0", True),
        ("oja@1", True),
        ("pseudo_gradient@1", False),  # second sweep: only the one left
    ]
    assert seen == list(range(1, len(report)))  # coefficients tried so far, after each


def test_prune_by_effect_refits_the_others_to_drop_a_redundant_term():
    """Two terms that do the same job (the score needs their sum to be 1.1): removing one
    alone costs 0.5, but after refitting the other it costs nothing, so it is dropped and
    the refitted value is kept. A term nothing can replace (weight decay here) stays even
    after a refit, and a coefficient is refitted at most once."""
    names = ["hebbian", "oja", "weight_decay", "pseudo_gradient"]
    rule = TermPoolRule.from_names(names, [0.5, 0.6, 0.3, 0.001])

    def score(r):
        th = np.asarray(r.theta)
        return 1.0 - abs(th[0] + th[1] - 1.1) - (0.5 if th[2] == 0.0 else 0.0)

    calls = []

    def refit(r, keep):  # the best values for the kept ones: hebbian + oja back to 1.1
        calls.append(keep.tolist())
        th = np.asarray(r.theta).copy()
        pair = keep & np.array([True, True, False, False])
        if pair.any():
            th[pair] += (1.1 - th[0] - th[1]) / pair.sum()
        return eqx.tree_at(lambda q: q.theta, r, jnp.asarray(th, jnp.float32))

    plain, _ = prune_by_effect(rule, score, tolerance=0.01)
    np.testing.assert_allclose(np.asarray(plain.theta), [0.5, 0.6, 0.3, 0.0])
    pruned, report = prune_by_effect(rule, score, tolerance=0.01, refit=refit)
    np.testing.assert_allclose(np.asarray(pruned.theta), [0.0, 1.1, 0.3, 0.0], rtol=1e-6)
    hebb = [r for r in report if r["coefficient"] == "hebbian"]
    assert hebb[0]["pruned"] and hebb[0]["refit"] == {
        "oja": pytest.approx(1.1),
        "weight_decay": pytest.approx(0.3),
    }
    decay = [r for r in report if r["coefficient"] == "weight_decay"]
    assert len(decay) == 2 and not any(r["pruned"] for r in decay)
    assert ["refit_score" in r for r in decay] == [True, False]  # refitted once only
    assert calls == [
        [True, True, False, False],  # without weight decay: refit fails
        [False, True, True, False],  # without hebbian: oja takes over
        [False, False, True, False],  # without oja (hebbian gone): fails
        [False, True, True, False],  # the final refit of what is left
    ]
    final = report[-1]
    assert final["pass"] == "final refit" and final["accepted"]


def test_prune_by_effect_final_refit_readjusts_after_plain_drops():
    """A small term that compensated for the others is dropped plainly (within tolerance);
    the final refit of the remaining set then readjusts them, and is kept because it scores
    better; a final refit that scores worse is not kept."""
    rule = TermPoolRule.from_names(["hebbian", "oja"], [1.0, 0.005])

    def score(r):  # best at hebbian + oja = 1.005
        th = np.asarray(r.theta)
        return 1.0 - abs(th[0] + th[1] - 1.005)

    def refit(r, keep):
        th = np.asarray(r.theta).copy()
        th[keep] += (1.005 - th.sum()) / keep.sum()
        return eqx.tree_at(lambda q: q.theta, r, jnp.asarray(th, jnp.float32))

    pruned, report = prune_by_effect(rule, score, tolerance=0.01, refit=refit)
    np.testing.assert_allclose(np.asarray(pruned.theta), [1.005, 0.0], rtol=1e-6)
    assert report[-1]["accepted"] and report[-1]["refit_score"] > report[-1]["score"]

    def worse(r, keep):
        th = np.asarray(r.theta).copy()
        th[keep] -= 0.001
        return eqx.tree_at(lambda q: q.theta, r, jnp.asarray(th, jnp.float32))

    pruned, report = prune_by_effect(rule, score, tolerance=0.01, refit=worse)
    np.testing.assert_allclose(np.asarray(pruned.theta), [1.0, 0.0])
    assert not report[-1]["accepted"]


def test_distillation_recovers_a_known_polynomial(small_problem):
    from metaplastic.export._distill import distill

    theta = np.zeros(81, np.float32)
    theta[monomial_index("e*x")] = -0.1
    theta[monomial_index("x*y")] = 0.02
    theta[monomial_index("W*y**2")] = -0.02
    teacher = TaylorRule(theta)
    poly, info = distill(small_problem, teacher, jax.random.key(0), 4, 3000, "stlsq", 0.01)
    assert info["r2"] > 0.999
    assert set(np.flatnonzero(np.asarray(poly.theta))) == set(np.flatnonzero(theta))
    np.testing.assert_allclose(np.asarray(poly.theta), theta, rtol=1e-3, atol=1e-6)


def test_pca_meta_learning_recovers_oja():
    """Small instance of the ground-truth acceptance: Taylor basis on the pca task."""
    from metaplastic.run._config import build_config
    from metaplastic.run._exporting import export_run
    from metaplastic.run._run import build_rule, build_setup, make_trainer

    cfg = build_config(
        "taylor",
        "pca",
        {"episodes": 2400, "meta_batch": 8, "eval_episodes": 64},
        ["task.steps=200", "task.dim=4"],
    )
    setup = build_setup(cfg)
    rule = build_rule(cfg, 1)
    trainer = make_trainer(cfg, setup, rule)
    state = trainer.init(rule, jax.random.key(0))
    for _ in range(cfg.train.episodes // cfg.train.meta_batch):
        state, _ = trainer.step(state)
    learned = jax.tree_util.tree_map(np.asarray, trainer.rule(state))
    c = learned.coefficients()
    assert c["x*y"] > 0.01 and c["W*y**2"] < -0.01
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        text, _ = export_run(
            Path(d),
            cfg,
            learned,
            "json",
            cfg.train.prune_threshold,
            prune_effect=cfg.train.prune_effect,
            prune_episodes=64,
            check=False,
        )
    import json

    coefs = json.loads(text)["coefficients"]
    kept = {k: v for k, v in coefs.items() if abs(v) > cfg.train.prune_threshold}
    assert set(kept) == {"x*y", "W*y**2"}, kept
    assert abs(-kept["W*y**2"] / kept["x*y"] - 1.0) < 0.1


def test_export_refit_trains_only_the_kept_coefficients():
    """``train.prune_refit``'s refit: the run's gradient outer loop for that many steps on
    meta-train episodes; the coefficients not kept stay exactly 0, the kept ones move."""
    from metaplastic.run._config import build_config
    from metaplastic.run._exporting import _refitter
    from metaplastic.run._run import build_setup

    cfg = build_config(
        "taylor", "pca", {"meta_batch": 4}, ["task.steps=20", "task.dim=3", "train.lr=0.05"]
    )
    setup = build_setup(cfg)
    theta = np.zeros(81, np.float32)
    theta[monomial_index("x*y")] = 0.05
    theta[monomial_index("W*y**2")] = -0.02
    keep = theta != 0.0
    out = _refitter(cfg, setup, 3)(TaylorRule(theta), keep)
    new = np.asarray(out.theta)
    assert np.all(new[~keep] == 0.0) and np.all(np.isfinite(new))
    assert np.all(new[keep] != theta[keep])


def test_mlp_rule_starts_silent_with_scaled_hidden_weights_and_its_documented_defaults():
    """``MLPRule.init``: the output layer starts at zero (the rule is then exactly the
    pseudo-gradient term ``-theta_pg e x^T``), hidden weights are N(0, 1/fan_in), defaults
    scale 0.01, seed 0, theta_pg 0; ``l1 = |scale| sum|w_out|``."""
    assert MLPRule.init().hidden == (16,)
    rule = MLPRule.init((64, 3))
    assert float(rule.scale) == pytest.approx(0.01) and float(rule.theta_pg) == 0.0
    assert float(MLPRule(rule.weights, rule.biases, 0.5).theta_pg) == 0.0
    for a, b in zip(rule.weights, MLPRule.init((64, 3), seed=0).weights, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.any(np.asarray(rule.weights[-1])) and np.all(np.asarray(rule.weights[0]) != 0)
    assert 0.35 < float(np.std(np.asarray(rule.weights[0]))) < 0.65  # 1/sqrt(4 inputs)
    assert 0.09 < float(np.std(np.asarray(rule.weights[1]))) < 0.16  # 1/sqrt(64)
    s = random_signals(3, n_out=4, n_in=5)
    pg = MLPRule(rule.weights, rule.biases, 0.5, theta_pg=0.2)
    np.testing.assert_allclose(pg(0, s), -0.2 * np.outer(s.e, s.x), rtol=1e-6, atol=1e-7)
    w_out = jnp.full_like(rule.weights[-1], -0.5)
    weights = (*rule.weights[:-1], w_out)
    assert float(MLPRule(weights, rule.biases, -2.0).l1()) == pytest.approx(2.0 * 0.5 * 3)


def test_mlp_rule_file_shapes_are_checked_and_theta_pg_defaults_to_zero():
    """``MLPRule.from_json_data`` refuses weights that do not map 4 inputs through chained
    layers to 1 output, or biases of the wrong shape; a file without ``theta_pg`` reads 0."""
    rule = MLPRule.init((3, 2), 0.3, seed=2)
    data = rule.to_json_data(0.0)
    del data["theta_pg"]
    assert float(MLPRule.from_json_data(data).theta_pg) == 0.0
    w = [np.asarray(x).tolist() for x in rule.weights]
    b = [np.asarray(x).tolist() for x in rule.biases]
    bad = {
        "no layers": ([], []),
        "3 inputs": ([np.zeros((3, 3)).tolist(), *w[1:]], b),
        "2 outputs": ([*w[:-1], np.zeros((2, 2)).tolist()], [*b[:-1], [0.0, 0.0]]),
        "bias shape": (w, [b[0][:2], *b[1:]]),
        "1-d weights": ([np.zeros(4).tolist(), *w[1:]], b),
        "not chained": ([w[0], np.zeros((2, 2)).tolist(), w[2]], [b[0], [0.0, 0.0], b[2]]),
    }
    for why, (ws, bs) in bad.items():
        with pytest.raises(ValueError, match="MLP"):
            MLPRule.from_json_data(dict(data, weights=ws, biases=bs))
        assert why


def test_equation_rule_state_rate_defaults_to_the_documented_value():
    rule = EquationRule.from_text("0.5*x*y")
    assert rule.state_rate() == 0.1
    assert EquationRule(rule.exprs, rule.theta).state_rate() == 0.1


def test_equation_rule_layers_state_threshold_and_file_checks():
    """Per-layer equations: each layer's own, a missing layer is a clear error, ``to_sympy``
    needs ``layer``; ``uses_state`` only with a state symbol; ``|c| <= threshold`` pruned;
    a rule file's ``equation_texts`` must be a list of strings and its rate defaults to 0.1."""
    rule = EquationRule.from_text(["0.5*x*y", "0.25*W"])
    s = random_signals(4)
    with pytest.raises(MetaplasticError, match="per-layer equations"):
        rule(2, s)
    with pytest.raises(MetaplasticError, match="pass layer"):
        rule.to_sympy()
    assert str(rule.to_sympy(layer=1)) == "0.25*W" and str(rule.to_sympy(layer=0)) == "0.5*x*y"
    assert str(EquationRule.from_text("0.5*x*y").to_sympy(threshold=0.5)) == "0"
    assert not EquationRule.from_text("0.5*x*y").uses_state()
    assert EquationRule.from_text("0.5*ybar*x").uses_state()
    data = rule.to_json_data(0.0)
    assert EquationRule.from_json_data({"equation_texts": data["equation_texts"]}).rate == 0.1
    for bad in ("0.5*x*y", [1.0], ["0.5*x*y", 2]):
        with pytest.raises(ValueError, match="list of strings"):
            EquationRule.from_json_data({"equation_texts": bad})


def test_matrix_symbols_have_the_documented_shapes():
    from metaplastic.rules._terms import sympy_symbols

    S = sympy_symbols()
    n_in, n_out = S["n_in"], S["n_out"]
    assert n_in.is_integer and n_in.is_positive and n_out.is_integer and n_out.is_positive
    column = {"x": n_in, "e_pre": n_in, "one_in": n_in}
    for name in ("y", "e", "one_out", "ybar", "theta_M", "nrm0"):
        column[name] = n_out
    for name, rows in column.items():
        assert S[name].shape == (rows, 1), name
    assert S["W"].shape == (n_out, n_in)


def test_pca_task_eigenvector_loss_alignment_and_scores():
    """The pca task: ``v1`` is the top eigenvector of ``C`` (eigenvalues ``input_scale^2
    decay^k``); the meta-loss is 0 at ``w = v1`` and 1 at ``w = 0``; a rule that does
    nothing leaves the alignment ``|w0 . v1| / |w0|``; score ``1 - loss``, diverged 0; no
    images, no weight guard by default."""
    from metaplastic.tasks._pca import PCATask

    task = PCATask(5, 4, 0.7, input_scale=2.0)
    assert not PCATask.uses_images and task.weight_limit == 0.0
    np.testing.assert_allclose(task.eigenvalues(), 4.0 * 0.7 ** np.arange(5), rtol=1e-6)
    x, C, v1, w0 = task.sample(jax.random.key(2))
    np.testing.assert_allclose(C @ v1, 4.0 * v1, rtol=1e-4, atol=1e-5)
    assert float(task.loss(v1, C)) == pytest.approx(0.0, abs=1e-5)
    assert float(task.loss(jnp.zeros(5), C)) == pytest.approx(1.0, rel=1e-6)
    still = TermPoolRule.from_names(["oja"], [0.0])
    res = task.run(still, Network((5, 1)), "backprop", jax.random.key(2))
    w, v = np.asarray(w0[0]), np.asarray(v1)
    assert float(res.query_accuracy) == pytest.approx(abs(w @ v) / np.linalg.norm(w), rel=1e-5)
    assert float(task.score(res)) == pytest.approx(1.0 - float(res.query_loss))
    assert float(task.diverged_score()) == 0.0


def test_taylor_coefficients_per_layer():
    rule = TaylorRule.from_monomials(["1001", "1100"], [-0.05, 0.01], n_layers=3)
    assert rule.theta.shape == (3, 81)
    np.testing.assert_array_equal(rule.theta[0], rule.theta[2])
    assert float(jnp.sum(rule.theta[1])) == pytest.approx(-0.04)
