"""Terms and rules: hand-computed values, sympy forms, jit/vmap/grad."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sympy as sp

from metaplastic.rules._rules import TermPoolRule
from metaplastic.rules._terms import TERMS, sympy_symbols

from .conftest import random_signals


def hand(name, s):
    x, y, e, ep, W = (np.asarray(a, np.float64) for a in (s.x, s.y, s.e, s.e_pre, s.W))
    ybar, thm, nrm0 = (np.asarray(a, np.float64) for a in (s.ybar, s.theta_M, s.nrm0))
    return {
        "pseudo_gradient": -np.outer(e, x),
        "hebbian": np.outer(y, x),
        "error_hebbian": -np.outer(e, ep),
        "oja": np.outer(y, x) - np.outer(y, y) @ W,  # literal O(n_out^2 n_in) form
        "weight_decay": -W,
        "constant": np.ones_like(W),
        "post_activity_pre_error": np.outer(y, ep),
        "post_error": np.outer(e, np.ones_like(x)),
        "pre_error": np.outer(np.ones_like(y), ep),
        "post_error_decay": np.outer(e, e) @ W,  # literal forms, not the cheap ones
        "pre_error_decay": W @ np.outer(ep, ep),
        "error_oja": np.outer(e, ep) - np.outer(e, e) @ W,
        "scaling_fixed": np.diag(0.1 - ybar) @ W,
        "scaling_layer_mean": np.diag(ybar.mean() - ybar) @ W,
        "scaling_norm": np.diag(nrm0 / np.linalg.norm(W, axis=1) - 1.0) @ W,
        "bcm": np.outer(y * (y - thm), x),
    }[name]


def test_every_term_has_a_hand_value():
    s = random_signals(0)
    assert len(TERMS) == 16
    for name in TERMS:
        assert hand(name, s).shape == (4, 3)


@pytest.mark.parametrize("name", sorted(TERMS))
def test_term_matches_numpy(name):
    s = random_signals(1)
    got = np.asarray(TERMS[name]()(s))
    np.testing.assert_allclose(got, hand(name, s), rtol=1e-5, atol=1e-5)


def _sympy_numeric(expr, s):
    """Evaluate a matrix expression on the signals with sympy's own lambdify (an evaluation
    path independent of metaplastic's tree walker), after expanding the matrix helpers."""
    S = sympy_symbols()
    names = ("x", "y", "e", "e_pre", "W", "one_in", "one_out", "ybar", "theta_M", "nrm0")
    col = lambda v: np.asarray(v, np.float64)[:, None]  # noqa: E731
    vals = {
        "x": col(s.x),
        "y": col(s.y),
        "e": col(s.e),
        "e_pre": col(s.e_pre),
        "W": np.asarray(s.W, np.float64),
        "one_in": np.ones((len(s.x), 1)),
        "one_out": np.ones((len(s.y), 1)),
        "ybar": col(s.ybar),
        "theta_M": col(s.theta_M),
        "nrm0": col(s.nrm0),
    }
    n_out, n_in = len(s.y), len(s.x)
    subs = {S[k]: sp.Matrix(vals[k]) for k in names}
    subs.update({S["n_out"]: n_out, S["n_in"]: n_in})
    out = expr.subs(subs).doit()
    return np.asarray(sp.Matrix(out).evalf(), dtype=np.float64)


@pytest.mark.parametrize("name", sorted(TERMS))
def test_term_to_sympy_equals_jax(name):
    for seed in range(3):
        s = random_signals(10 + seed, n_out=5, n_in=2)
        term = TERMS[name]()
        np.testing.assert_allclose(
            _sympy_numeric(term.to_sympy(), s), np.asarray(term(s)), rtol=1e-5, atol=1e-5
        )


def test_oja_sympy_form_is_the_matrix_expression():
    S = sympy_symbols()
    expected = S["y"] * S["x"].T - S["y"] * S["y"].T * S["W"]
    assert sp.simplify(TERMS["oja"]().to_sympy() - expected) == sp.ZeroMatrix(S["n_out"], S["n_in"])


def test_pool_rule_sum_and_sympy():
    theta = np.linspace(-1.0, 1.2, len(TERMS)).tolist()
    rule = TermPoolRule.from_names(sorted(TERMS), theta)
    s = random_signals(5)
    expected = sum(t * hand(n, s) for t, n in zip(theta, sorted(TERMS), strict=True))
    np.testing.assert_allclose(np.asarray(rule(0, s)), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_sympy_numeric(rule.to_sympy(), s), expected, rtol=1e-5, atol=1e-5)


def test_mask_removes_term_and_its_gradient():
    rule = TermPoolRule.from_names(["pseudo_gradient", "oja"], [0.5, 2.0], mask=[True, False])
    s = random_signals(2)
    np.testing.assert_allclose(np.asarray(rule(0, s)), 0.5 * hand("pseudo_gradient", s), rtol=1e-6)
    g = jax.grad(lambda r: jnp.sum(r(0, s)) + r.l1())(rule)
    assert float(g.theta[1]) == 0.0
    assert rule.coefficients() == {"pseudo_gradient": 0.5}
    assert "y" not in str(rule.to_sympy())


def test_per_layer_coefficients():
    rule = TermPoolRule.from_names(["pseudo_gradient", "hebbian"], [1.0, 0.0], n_layers=3)
    assert rule.theta.shape == (3, 2)
    rule = eqx.tree_at(lambda r: r.theta, rule, rule.theta.at[2, 1].set(0.5))
    s = random_signals(3)
    np.testing.assert_allclose(np.asarray(rule(0, s)), hand("pseudo_gradient", s), rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(rule(2, s)), hand("pseudo_gradient", s) + 0.5 * hand("hebbian", s), rtol=1e-5
    )
    assert set(rule.coefficients()) == {
        f"{n}@{i}" for n in ("pseudo_gradient", "hebbian") for i in range(3)
    }
    with pytest.raises(Exception, match="per-layer"):
        rule.to_sympy()
    assert "x" in str(rule.to_sympy(layer=2))
    # each layer's equation has that layer's coefficients
    names = ["pseudo_gradient", "hebbian"]
    assert rule.to_sympy(layer=2) == TermPoolRule.from_names(names, [1.0, 0.5]).to_sympy()
    assert rule.to_sympy(layer=0) == TermPoolRule.from_names(names, [1.0, 0.0]).to_sympy()


def test_threshold_prunes_small_terms():
    rule = TermPoolRule.from_names(["pseudo_gradient", "oja"], [0.5, 1e-6])
    assert "y" not in str(rule.to_sympy(threshold=1e-4))
    assert "y" in str(rule.to_sympy(threshold=0.0))


def test_rule_jit_vmap():
    rule = TermPoolRule.from_names(sorted(TERMS), np.linspace(0.1, 0.5, len(TERMS)))
    sigs = [random_signals(i) for i in range(4)]
    batched = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *sigs)
    out = eqx.filter_jit(jax.vmap(lambda s: rule(0, s)))(batched)
    for i, s in enumerate(sigs):
        np.testing.assert_allclose(np.asarray(out[i]), np.asarray(rule(0, s)), rtol=1e-5, atol=1e-6)


def test_bad_coefficient_shape_is_a_clear_error():
    from metaplastic._errors import MetaplasticError

    with pytest.raises(MetaplasticError, match="one coefficient per term"):
        TermPoolRule.from_names(["oja"], [1.0, 2.0])
    with pytest.raises(MetaplasticError, match="did you mean 'oja'"):
        TermPoolRule.from_names(["ojaa"])


def test_pool_defaults_and_json_defaults_are_the_documented_ones():
    """The state rate and scaling target default to 0.1 everywhere a pool is built (the
    constructor, ``from_names``, a rule file without those keys, and what ``to_json_data``
    writes for a pool without ``scaling_fixed``); a base rule's rate is 0.1 too."""
    from metaplastic.rules._rules import AbstractRule

    pool = TermPoolRule.from_names(["oja", "hebbian"])
    assert pool.state_rate() == 0.1
    assert TermPoolRule(pool.terms, jnp.zeros(2)).state_rate() == 0.1
    data = pool.to_json_data(0.0)
    assert data["state_rate"] == 0.1 and data["scaling_target"] == 0.1
    old = {k: v for k, v in data.items() if k not in ("state_rate", "scaling_target")}
    back = TermPoolRule.from_json_data(dict(old, terms=["scaling_fixed"], theta=[1.0], mask=[True]))
    assert back.state_rate() == 0.1 and back.terms[0].target == 0.1
    assert AbstractRule.state_rate(pool) == 0.1


def test_pool_coefficients_become_floating_without_changing_a_float_dtype():
    """Integer coefficients are converted to floats; float32 coefficients stay float32 even
    with 64-bit JAX enabled (the conversion must not touch them)."""
    terms = TermPoolRule.from_names(["oja", "hebbian"]).terms
    assert jnp.issubdtype(TermPoolRule(terms, [1, 0]).theta.dtype, jnp.floating)
    with jax.enable_x64(True):
        assert TermPoolRule(terms, jnp.zeros(2, jnp.float32)).theta.dtype == jnp.float32


def test_a_coefficient_equal_to_the_threshold_is_pruned():
    """``to_sympy(threshold=t)`` leaves out terms with ``|theta| <= t``, boundary included."""
    rule = TermPoolRule.from_names(["oja", "hebbian"], [0.5, 0.25])
    kept = rule.to_sympy(threshold=0.25)
    assert kept == TermPoolRule.from_names(["oja", "hebbian"], [0.5, 0.0]).to_sympy()


def test_l1_norm_is_the_sum_of_magnitudes_with_subgradient_zero_at_zero():
    from metaplastic.rules._rules import l1_norm, make_term

    theta = jnp.array([1.0, -2.0, 0.0, 0.5])
    assert float(l1_norm(theta)) == 3.5
    np.testing.assert_array_equal(jax.grad(l1_norm)(theta), [1.0, -1.0, 0.0, 1.0])
    assert make_term("scaling_fixed").target == 0.1  # the documented default target


def test_plastic_feedback_names_its_coefficients_and_writes_its_update():
    """``dB = a (-e x^T) - b B``: the two coefficients by name, and the sympy form evaluated
    on numbers equals the formula."""
    from metaplastic.rules._rules import PlasticFeedback

    rule = PlasticFeedback(TermPoolRule.from_names(["oja"], [0.1]), jnp.array([0.3, 0.2]))
    coefs = rule.coefficients()
    assert coefs["feedback:pseudo_gradient"] == pytest.approx(0.3)
    assert coefs["feedback:decay"] == pytest.approx(0.2) and coefs["oja"] == pytest.approx(0.1)
    S = sympy_symbols()
    e, x, B = np.array([[1.0], [2.0]]), np.array([[3.0], [-1.0], [0.5]]), np.ones((2, 3))
    n_out, n_in = S["n_out"], S["n_in"]
    values = {S["e"]: sp.Matrix(e), S["x"]: sp.Matrix(x), n_out: 2, n_in: 3}
    values[sp.MatrixSymbol("B", n_out, n_in)] = sp.Matrix(B)
    got = np.array(sp.Matrix(rule.feedback_sympy().subs(values).doit()), dtype=float)
    np.testing.assert_allclose(got, -0.3 * e @ x.T - 0.2 * B, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(TERMS))
def test_a_term_is_stateful_exactly_when_it_reads_the_neuron_state(name):
    """``stateful`` (which makes the inner loop keep ``ybar``, ``theta_M``, ``nrm0``) is set
    exactly for the terms whose equation reads one of them, and a pool uses state iff a
    live term is stateful."""
    state = {"ybar", "theta_M", "nrm0"}
    reads = bool(state & {str(s) for s in TERMS[name]().to_sympy().free_symbols})
    assert TERMS[name].stateful == reads
    assert TermPoolRule.from_names([name]).uses_state() == reads
    assert not TermPoolRule.from_names([name], mask=[False]).uses_state()


def test_pool_bias_is_the_weighted_sum_of_the_term_biases():
    s = random_signals(3)
    np.testing.assert_allclose(TERMS["pseudo_gradient"]().bias(s), -s.e)
    names, theta = ["pseudo_gradient", "oja", "hebbian"], [0.3, 0.2, 0.5]
    rule = TermPoolRule.from_names(names, theta)
    want = sum(t * np.asarray(TERMS[n]().bias(s)) for n, t in zip(names, theta, strict=True))
    np.testing.assert_allclose(rule.bias(0, s), want, rtol=1e-6)
    np.testing.assert_allclose(
        TermPoolRule.from_names(["pseudo_gradient"], [0.3]).bias(0, s), -0.3 * s.e, rtol=1e-6
    )


def test_rule_kinds_register_once_under_a_non_empty_name():
    from metaplastic.rules._rules import RULE_KINDS, register_rule_kind

    class NoKind(TermPoolRule):
        kind = ""

    class Clash(TermPoolRule):
        kind = "term_pool"

    with pytest.raises(TypeError, match="kind"):
        register_rule_kind(NoKind)
    with pytest.raises(ValueError, match="already registered"):
        register_rule_kind(Clash)
    assert register_rule_kind(RULE_KINDS["term_pool"]) is RULE_KINDS["term_pool"]
