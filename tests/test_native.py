"""The fused native loop (``train.gradient = "native"``): the same meta-gradient as forward
mode through the plain scan, episodes independent of their batch, refusals in one line."""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from metaplastic import MetaplasticError
from metaplastic.inner._native import run_native
from metaplastic.inner._network import EINetwork, Network
from metaplastic.outer import GradientTrainer, make_optimizer
from metaplastic.rules._rule_kinds import TaylorRule
from metaplastic.rules._rules import TermPoolRule
from metaplastic.tasks._classification import ClassificationTask
from metaplastic.tasks._pca import PCATask
from metaplastic.tasks._problem import Problem

POOL = ("pseudo_gradient", "error_hebbian", "oja")


def _grad(problem, rule, keys):
    """``(meta-gradient, query loss)`` of ``problem`` at ``rule`` by ``jax.jacfwd``."""
    params, static = eqx.partition(rule, eqx.is_inexact_array)

    def loss(p):
        out = problem.meta_loss(eqx.combine(p, static), keys, 0.0)
        return out[0], out[1]["query_loss"]

    g, q = jax.jit(jax.jacfwd(loss, has_aux=True))(params)
    return np.asarray(ravel_pytree(g)[0]), float(q)


@pytest.mark.parametrize(
    "feedback,activation,terms",
    [
        ("fa", "softplus", POOL),
        pytest.param("backprop", "tanh", POOL, marks=pytest.mark.slow),
        ("fa", "one_layer", POOL),
        pytest.param("fa", "relu", ("oja", "pseudo_gradient"), marks=pytest.mark.slow),
        pytest.param(
            "backprop", "linear", ("error_hebbian", "pseudo_gradient"), marks=pytest.mark.slow
        ),
    ],
)
def test_native_gives_the_forward_mode_meta_gradient(pools, feedback, activation, terms):
    """Every hidden activation and both pathways, terms in any order or missing (FA with
    softplus in the default run, the others slow); float32, relative error at most 1e-4
    (the loop reassociates sums and fuses multiply-adds)."""
    if activation == "one_layer":  # input layer = output layer: the fused pass is linear
        net = Network((64, 5))
    else:
        net = Network((64, 9, 7, 5), activation=activation, beta=10.0)
    problem = Problem(net, feedback, ClassificationTask(3, 5, 3), pools[0])
    init = {"pseudo_gradient": 0.05, "error_hebbian": 0.02, "oja": 0.03}
    rule = TermPoolRule.from_names(list(terms), [init[t] for t in terms])
    keys = jax.random.split(jax.random.key(3), 2)
    want, q_want = _grad(problem, rule, keys)
    got, q_got = _grad(dataclasses.replace(problem, remat="native"), rule, keys)
    assert np.all(np.isfinite(want)) and np.abs(want).max() > 0
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert q_got == pytest.approx(q_want, rel=1e-5)


@pytest.mark.slow  # ~17 s (CI time budget); the jacfwd agreement tests run by default
def test_native_episodes_do_not_depend_on_their_batch():
    """An episode run alone and inside a batch of three (on parallel threads) gives the
    same bits: the trainer's result does not depend on the meta-batch split."""
    sizes = (6, 5, 4, 3)
    P = sum(a * b for a, b in zip(sizes[1:], sizes[:-1], strict=True))
    rng = np.random.default_rng(0)
    th = rng.normal(size=(3, 3)).astype(np.float32) * 0.05
    W0 = rng.normal(size=(3, P)).astype(np.float32) * 0.3
    B = rng.normal(size=(3, P)).astype(np.float32) * 0.3
    xs = rng.random((3, 20, 6)).astype(np.float32)
    labels = rng.integers(0, 3, (3, 20))
    together = run_native(sizes, "softplus", 10.0, "fa", th, W0, B, xs, labels)
    for n in range(3):
        one = run_native(
            sizes, "softplus", 10.0, "fa", th[n : n + 1], W0[n : n + 1], B[n : n + 1],
            xs[n : n + 1], labels[n : n + 1],
        )  # fmt: skip
        for a, b in zip(together, one, strict=True):
            np.testing.assert_array_equal(a[n], b[0])
    assert np.abs(together[1]).max() > 0  # the tangents moved
    with pytest.raises(MetaplasticError, match="labels must lie in"):  # no reads past the end
        run_native(sizes, "softplus", 10.0, "fa", th, W0, B, xs, labels + 3)


def test_native_trainer_step_matches_forward_mode(pools):
    """One jitted meta-step of the trainer: native and forward mode move the coefficients
    alike; native vmaps the whole meta-batch into one call."""
    problem = Problem(Network((64, 7, 5)), "fa", ClassificationTask(3, 4, 3), pools[0])
    rule = TermPoolRule.from_names(list(POOL), [0.05, 0.0, 0.0])
    out = {}
    for mode in ("forward", "native"):
        tr = GradientTrainer(problem, rule, make_optimizer("adam", 1e-2), meta_batch=4, mode=mode)
        state, aux = tr.step(tr.init(rule, jax.random.key(0)))
        out[mode] = (np.asarray(state.params.theta), float(aux["query_loss"]))
    assert tr.sharding.width == -1 and tr.problem.remat == "native"
    np.testing.assert_allclose(out["native"][0], out["forward"][0], rtol=1e-5)
    assert out["native"][1] == pytest.approx(out["forward"][1], rel=1e-5)


def test_native_refuses_what_it_does_not_implement(pools):
    task = ClassificationTask(3, 4, 3)
    pool = TermPoolRule.from_names(list(POOL), [0.05, 0.0, 0.0])
    guarded = dataclasses.replace(task, weight_limit=5.0)
    cases = [
        (Problem(Network((64, 5, 3)), "fa", task, pools[0]), TaylorRule.from_monomials(), "taylor"),
        (
            Problem(Network((64, 5, 3)), "fa", task, pools[0]),
            TermPoolRule.from_names(["pseudo_gradient", "hebbian"], [0.05, 0.0]),
            "not hebbian",
        ),
        (
            Problem(Network((64, 5, 3)), "fa", task, pools[0]),
            TermPoolRule.from_names(list(POOL), [0.05, 0.0, 0.0], n_layers=2),
            "shared",
        ),
        (
            Problem(Network((64, 5, 3)), "fa", task, pools[0]),
            TermPoolRule.from_names(["oja", "pseudo_gradient", "oja"], [0.01, 0.05, 0.01]),
            "twice",
        ),
        (Problem(Network((64, 5, 3), bias=True), "fa", task, pools[0]), pool, "bias"),
        (Problem(EINetwork((64, 5, 3)), "fa", task, pools[0]), pool, "mlp"),
        (Problem(Network((64, 5, 3)), "dfa", task, pools[0]), pool, "not 'dfa'"),
        (Problem(Network((64, 5, 3)), "fa", guarded, pools[0]), pool, "weight_limit"),
        (Problem(Network((8, 1)), "fa", PCATask(8, 10, 0.8), None), pool, "pca"),
    ]
    for problem, rule, why in cases:
        with pytest.raises(MetaplasticError, match=why) as err:
            GradientTrainer(problem, rule, make_optimizer("adam", 1e-3), mode="native")
        assert "train.gradient = 'native' cannot be used" in str(err.value)
        assert "\n" not in str(err.value)


def test_native_outside_its_scope_is_refused_before_the_run_directory(tmp_path):
    from click.testing import CliRunner

    from metaplastic.run._cli import main

    out = tmp_path / "run"
    args = ["train", "--rule", "taylor", "--task", "digits", "--out", str(out), "--quiet"]
    res = CliRunner().invoke(main, [*args, "--set", "train.gradient=native"])
    assert res.exit_code == 2 and not out.exists()
    assert "train.gradient = 'native' cannot be used" in res.output
    assert "taylor" in res.output and "Traceback" not in res.output
