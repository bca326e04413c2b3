"""Credit pathways as an extension point: predictive coding against backprop, the strict
variant's fixed point, and a pathway defined outside the package running in train."""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from click.testing import CliRunner

from metaplastic.inner import (
    CREDIT_PATHWAYS,
    AbstractCreditPathway,
    Network,
    PredictiveCoding,
    backward,
    register_pathway,
)
from metaplastic.run import build_config, train
from metaplastic.run._cli import main

from .conftest import tiny_task


def _sample(activation: str, sizes=(7, 6, 5, 4, 3), label: int = 1):
    net = Network(sizes, activation=activation)
    state = net.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (sizes[0],))
    hs = net.forward(state, x)
    e_out = jax.nn.softmax(hs[-1]) - jax.nn.one_hot(label, sizes[-1])
    return net, state, hs, e_out


@pytest.mark.parametrize("activation", ["softplus", "tanh", "relu"])
def test_fixed_prediction_pc_equals_backprop_after_L_steps(activation):
    net, state, hs, e_out = _sample(activation)
    bp = backward(net, state, None, hs, e_out, "backprop")
    pc = PredictiveCoding().errors(net, state, None, hs, e_out)  # steps 0 = L = 4, rate 1
    for a, b in zip(bp, pc, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
    # one step short, the input layer has not heard of the error yet
    short = PredictiveCoding(steps=net.n_layers - 1).errors(net, state, None, hs, e_out)
    assert float(jnp.max(jnp.abs(short[0]))) == 0.0 and float(jnp.max(jnp.abs(bp[0]))) > 0
    # with rate < 1 the errors approach backprop's as the steps grow
    gaps = []
    for steps in (4, 8, 16, 64):
        e = PredictiveCoding(steps=steps, rate=0.5).errors(net, state, None, hs, e_out)
        gaps.append(float(jnp.linalg.norm(e[0] - bp[0]) / jnp.linalg.norm(bp[0])))
    assert all(a > b for a, b in zip(gaps, gaps[1:])) and gaps[-1] < 1e-4, gaps


def test_strict_pc_relaxes_to_its_fixed_point():
    """Strict PC's beliefs settle where ``eps_l = J_{l+1}(v_l)^T eps_{l+1}``; the errors it
    returns then differ from backprop's (it is an approximation), but are finite."""
    net, state, hs, e_out = _sample("tanh", sizes=(5, 4, 3))
    pc = PredictiveCoding(variant="strict", steps=400, rate=0.1)
    errs = pc.errors(net, state, None, hs, e_out)
    assert all(bool(jnp.all(jnp.isfinite(e))) for e in errs)
    # relaxing further changes nothing: the fixed point was reached
    more = PredictiveCoding(variant="strict", steps=800, rate=0.1).errors(
        net, state, None, hs, e_out
    )
    for a, b in zip(errs, more, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    bp = backward(net, state, None, hs, e_out, "backprop")
    assert not np.allclose(np.asarray(errs[1]), np.asarray(bp[1]), atol=1e-3)
    with pytest.raises(Exception, match="pc_variant"):
        PredictiveCoding(variant="nope")


@pytest.fixture
def task(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(tiny_task())
    return path


@pytest.mark.slow  # a whole `metaplastic train` run (12-19 s); `-m slow`
def test_predictive_coding_runs_in_train_from_the_command_line(tmp_path, task):
    args = ["train", "--rule", "pool", "--task", str(task), "--quiet"]
    res = CliRunner().invoke(
        main, [*args, "--set", "train.feedback=predictive_coding", "--out", str(tmp_path / "r")]
    )
    assert res.exit_code == 0, res.output
    bad = CliRunner().invoke(
        main,
        [*args, "--set", "train.feedback=predictive_coding", "--set", "train.pc_rate=2"],
    )
    assert bad.exit_code == 2 and "pc_rate" in bad.stderr


def test_a_pathway_from_outside_the_package_registers_and_trains(tmp_path, task):
    class HalfFA(AbstractCreditPathway):
        """Feedback alignment with errors halved at every layer."""

        name: ClassVar[str] = "half_fa_test"

        def init(self, net, key):
            return CREDIT_PATHWAYS["fa"]().init(net, key)

        def errors(self, net, state, B, hs, e_out):
            halved = tuple(0.5 * b for b in B)
            return CREDIT_PATHWAYS["fa"]().errors(net, state, halved, hs, e_out)

    register_pathway(HalfFA)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_pathway(type("Other", (HalfFA,), {"name": "fa"}))
        cfg = build_config("pool", str(task), {"feedback": "half_fa_test"})
        summary = train(cfg, tmp_path / "run", progress=False)
        assert summary["status"] == "ok" and summary["train"]["feedback"] == "half_fa_test"
    finally:
        CREDIT_PATHWAYS.pop("half_fa_test", None)


def test_trainer_registry_maps_outer_names_to_trainer_classes():
    from metaplastic.outer import TRAINERS, GradientTrainer, trainer_for
    from metaplastic.outer._evolution import EvolutionTrainer

    assert trainer_for("adam") is GradientTrainer and trainer_for("sgd") is GradientTrainer
    assert trainer_for("open_es") is EvolutionTrainer and trainer_for("CMA_ES") is EvolutionTrainer
    assert set(TRAINERS) >= {"gradient", "evolution"}
    with pytest.raises(Exception, match="no trainer serves"):
        trainer_for("not_an_outer_loop")


def _strict_pc_reference(W, x, label, steps, rate):
    """Strict predictive coding (Rosenbaum 2022) written out in numpy for a tanh MLP
    without biases: beliefs ``v_1..v_{L-1}`` start at the forward pass and follow
    ``v_l += r (-eps_l + W_l^T (eps_{l+1} * g'(z_{l+1})))`` (no ``g'`` at the softmax
    output), with ``eps_l = v_l - tanh(W_{l-1} v_{l-1})`` and ``eps_L = softmax(z_L) -
    onehot``. Returned errors: ``eps_L``, ``eps_l * g'(h_l)`` at the forward activities
    ``h_l``, and ``W_0^T`` times layer 1's for the input."""
    W = [np.asarray(w, np.float64) for w in W]
    L = len(W)
    h = [np.asarray(x, np.float64)]
    for j in range(L):
        z = W[j] @ h[-1]
        h.append(np.tanh(z) if j < L - 1 else z)
    onehot = np.eye(W[-1].shape[0])[label]

    def softmax(z):
        p = np.exp(z - z.max())
        return p / p.sum()

    def eps_of(v):
        z = [None] + [W[j - 1] @ v[j - 1] for j in range(1, L + 1)]
        eps = [None] + [v[j] - np.tanh(z[j]) for j in range(1, L)]
        return eps + [softmax(z[L]) - onehot], z

    v = list(h[:L])
    for _ in range(steps):
        eps, z = eps_of(v)
        new = list(v)
        for j in range(1, L):
            u = eps[j + 1] * (1 - np.tanh(z[j + 1]) ** 2) if j + 1 < L else eps[j + 1]
            new[j] = v[j] + rate * (-eps[j] + W[j].T @ u)
        v = new
    eps, _ = eps_of(v)
    errs = [None] * (L + 1)
    errs[L] = eps[L]
    for j in range(1, L):
        errs[j] = eps[j] * (1 - h[j] ** 2)
    errs[0] = W[0].T @ errs[1]
    return errs


@pytest.mark.parametrize("steps", [0, 1, 7])
def test_strict_pc_follows_its_equations_step_by_step(steps):
    """The strict variant against the numpy version of its equations above (``steps = 0``
    means its default, 20 steps), at the default step size 0.1 and at 0.3."""
    net, state, hs, e_out = _sample("tanh", sizes=(5, 4, 3, 3))
    for rate in (0.0, 0.3):
        pc = PredictiveCoding(variant="strict", steps=steps, rate=rate)
        got = pc.errors(net, state, None, hs, e_out)
        want = _strict_pc_reference(state.W, hs[0], 1, steps or 20, rate or 0.1)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(np.asarray(a), b, rtol=2e-4, atol=1e-6)


def test_predictive_coding_settings_are_checked_and_default_sensibly():
    assert PredictiveCoding().rate == 0.0 and PredictiveCoding().step_size == 1.0
    assert PredictiveCoding(variant="strict").step_size == 0.1
    assert PredictiveCoding(rate=1.0).step_size == 1.0
    for bad in ({"steps": -1}, {"steps": 1.5}, {"rate": 1.01}, {"rate": -0.1}):
        with pytest.raises(Exception, match="pc_steps|pc_rate"):
            PredictiveCoding(**bad)
