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
