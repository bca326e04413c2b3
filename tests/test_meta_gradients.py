"""Meta-gradients against finite differences (float64) for every rule kind x credit pathway.

Parametrised over the registries: a new rule kind must add an example here (the guard test
fails until it does), a new pathway is picked up automatically. Each check compares the
gradient the outer loop uses with a central difference along random directions of the
whole coefficient vector, on a tiny network and two episodes.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from metaplastic.inner._feedback import FEEDBACK_MODES
from metaplastic.inner._network import Network
from metaplastic.outer import GradientTrainer, make_optimizer
from metaplastic.rules import RULE_KINDS, EquationRule, MLPRule, TaylorRule
from metaplastic.rules._rules import PlasticFeedback, TermPoolRule
from metaplastic.tasks._classification import ClassificationTask
from metaplastic.tasks._problem import Problem

#: one small, learning example per rule kind (the wrapper kind wraps a pool)
EXAMPLES = {
    "term_pool": lambda: TermPoolRule.from_names(
        ["pseudo_gradient", "error_hebbian", "oja", "bcm"], [0.05, 0.01, 0.01, 0.005]
    ),
    "taylor": lambda: TaylorRule.from_monomials(["1001", "1100", "0210"], [-0.05, 0.005, -0.005]),
    "mlp": lambda: MLPRule.init(hidden=(4,), scale=0.01, seed=0, theta_pg=0.05),
    "equation": lambda: EquationRule.from_text("-0.05*e*x.T + 0.01*(y*x.T - y*y.T*W)"),
    "plastic_feedback": lambda: PlasticFeedback(
        TermPoolRule.from_names(["pseudo_gradient", "oja"], [0.05, 0.01]),
        jnp.array([0.03, 0.01]),
    ),
}


def test_every_rule_kind_has_a_gradient_check():
    assert set(EXAMPLES) == set(RULE_KINDS)


def _cases():
    for kind in EXAMPLES:
        for mode in FEEDBACK_MODES:
            plastic = kind == "plastic_feedback"
            if plastic != (mode == "kolen_pollack"):
                continue  # plastic feedback needs its wrapper, and the wrapper needs it
            yield kind, mode


def _marked():
    """In the default run: every kind with FA (its own pathway for the wrapper) and every
    pathway with the term pool; the other pairs are marked slow (each case costs ~8 s)."""
    for kind, mode in _cases():
        quick = mode in ("fa", "kolen_pollack") or kind == "term_pool"
        yield pytest.param(kind, mode, marks=() if quick else pytest.mark.slow)


@pytest.mark.parametrize("kind,mode", list(_marked()))
def test_meta_gradient_matches_finite_differences(pools, kind, mode):
    with jax.enable_x64(True):
        rule = EXAMPLES[kind]()
        rule = jax.tree_util.tree_map(
            lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, rule
        )
        problem = Problem(Network((64, 5, 3)), mode, ClassificationTask(3, 3, 2), pools[0])
        keys = jax.random.split(jax.random.key(7), 2)
        tr = GradientTrainer(problem, rule, make_optimizer("adam", 1e-3), meta_batch=2)
        params, static = eqx.partition(rule, eqx.is_inexact_array)
        grad, aux = tr.loss_and_grad(params, keys)
        assert int(aux["diverged"]) == 0
        flat, unravel = ravel_pytree(params)
        g = np.asarray(ravel_pytree(grad)[0])
        assert flat.dtype == jnp.float64 and np.all(np.isfinite(g))

        @jax.jit
        def loss(v):
            return problem.meta_loss(eqx.combine(unravel(v), static), keys, 0.0)[0]

        rng = np.random.default_rng(0)
        h = 1e-6
        for _ in range(3):
            d = rng.normal(size=flat.shape)
            d *= np.maximum(np.abs(np.asarray(flat)), 1e-2)  # relative to each coefficient
            fd = (float(loss(flat + h * d)) - float(loss(flat - h * d))) / (2 * h)
            np.testing.assert_allclose(g @ d, fd, rtol=2e-5, atol=1e-9)
