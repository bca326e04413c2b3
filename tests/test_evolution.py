"""Evolution-strategy outer loop (evosax): strategies by name, NaN members, exact resume."""

from __future__ import annotations

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaplastic._errors import MetaplasticError
from metaplastic.outer._evolution import (
    STRATEGY_ALIASES,
    UNSUPPORTED,
    EvolutionTrainer,
    _algorithm_classes,
    is_strategy,
    make_strategy,
    strategy_names,
)
from metaplastic.rules._rules import TermPoolRule
from metaplastic.run._config import build_config
from metaplastic.run._run import Interrupted, resume_run, train

from .conftest import POOL_TERMS
from .test_checkpoint import TASK

#: One strategy of each kind runs in the default test run (each compiles a generation, a few
#: seconds); the rest of ``strategy_names()`` is marked slow.
FAST_STRATEGIES = {"open_es", "cma_es", "pgpe", "SimpleGA", "PSO", "DifferentialEvolution"}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=() if n in FAST_STRATEGIES else pytest.mark.slow)
        for n in strategy_names()
    ],
)
def test_every_accepted_strategy_takes_a_generation(small_problem, name):
    """Every name the config accepts runs: the search starts at the rule (population-based
    strategies: the rule is member 0 of an unevaluated population) and one generation
    gives finite coefficients."""
    build_config("pool", "digits", overrides=[f"train.outer='{name}'", "train.population=4"])
    rule = TermPoolRule.from_names(POOL_TERMS, [0.05, 0.0, 0.0])
    tr = EvolutionTrainer(small_problem, rule, name, population=4, sigma=0.01, meta_batch=1)
    s0 = tr.init(rule, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(tr.rule(s0).theta), np.asarray(rule.theta))
    s1, aux = tr.step(s0)
    assert int(s1.step) == 1
    assert np.all(np.isfinite(np.asarray(tr.rule(s1).theta)))
    best, mean, worst = (float(aux[k]) for k in ("best_fitness", "mean_fitness", "worst_fitness"))
    assert best <= mean + 1e-6 and mean <= worst + 1e-6  # error rates tie; the mean rounds
    assert np.isfinite(float(aux["loss"])) and 0.0 <= float(aux["fitness"]) <= 1.0


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_unsupported_strategies_are_refused_in_one_line(name):
    with pytest.raises(MetaplasticError) as err:
        build_config("pool", "digits", overrides=[f"train.outer='{name}'"])
    msg = str(err.value)
    assert "\n" not in msg and f"{name!r}" in msg and "not supported" in msg
    assert "choose one of: " in msg and all(n in msg for n in strategy_names())
    with pytest.raises(MetaplasticError, match="not supported"):
        make_strategy(name, np.zeros(3), 4, 0.1)


def test_strategy_names_cover_every_evosax_algorithm():
    """Every evosax algorithm class is either accepted (and tested above) or refused;
    evosax's helper types (an enum) are neither."""
    classes = set(_algorithm_classes())
    assert classes == (set(strategy_names()) - set(STRATEGY_ALIASES)) | set(UNSUPPORTED)
    assert "MutationFeatureEncoding" not in strategy_names()
    assert not is_strategy("SV_CMA_ES") and is_strategy("PSO")


def test_population_members_share_episodes(small_problem):
    rule = TermPoolRule.from_names(POOL_TERMS, [0.05, 0.0, 0.0])
    tr = EvolutionTrainer(
        small_problem, rule, "open_es", population=4, sigma=0.01, meta_batch=3, objective="loss"
    )
    import equinox as eqx

    params = eqx.partition(rule, eqx.is_inexact_array)[0]
    pop = jax.tree_util.tree_map(lambda a: np.stack([a, a]), params)
    keys = jax.random.split(jax.random.key(3), 3)
    loss, _ = tr.fitness(pop, keys)
    # common random numbers: identical members tie, to rounding (a member's lane in the
    # vmapped program may round its last bit differently at low XLA optimisation levels)
    np.testing.assert_allclose(float(loss[0]), float(loss[1]), rtol=1e-6)


def test_nan_for_part_of_the_population_does_not_stop_the_run(small_problem):
    rule = TermPoolRule.from_names(["pseudo_gradient", "hebbian"], [0.05, 0.0])
    tr = EvolutionTrainer(small_problem, rule, "open_es", population=16, sigma=300.0, meta_batch=2)
    state = tr.init(rule, jax.random.key(0))
    total_bad = 0
    for _ in range(3):
        state, aux = tr.step(state)
        total_bad += int(aux["diverged"])
        assert np.isfinite(float(aux["worst_fitness"]))
    assert 0 < total_bad < 48
    assert int(state.diverged_members) == total_bad
    assert np.all(np.isfinite(np.asarray(tr.rule(state).theta)))


def test_unknown_strategy_and_bad_settings():
    assert is_strategy("open_es") and is_strategy("CMA_ES") and not is_strategy("adam")
    with pytest.raises(MetaplasticError, match="did you mean 'open_es'"):
        make_strategy("open_ess", np.zeros(3), 8, 0.1)
    with pytest.raises(MetaplasticError, match="must be even"):
        make_strategy("open_es", np.zeros(3), 7, 0.1)
    with pytest.raises(MetaplasticError, match="did you mean 'cma_es'"):
        build_config("pool", "digits", overrides=["train.outer='cma_e'"])


def test_es_resume_is_bit_identical(tmp_path, monkeypatch):
    task = tmp_path / "tiny.toml"
    task.write_text(TASK)
    cfg = build_config(
        "pool", str(task), {"episodes": 12}, ["train.outer='open_es'", "train.population=4"]
    )
    ref = tmp_path / "ref"
    train(cfg, ref, progress=False, evaluate=False)
    import metaplastic.run._run as r

    calls = {"n": 0}

    class StopAtThree(r._StopFlag):
        @property
        def set(self):
            calls["n"] += 1
            return calls["n"] == 3

        @set.setter
        def set(self, value):
            pass

    monkeypatch.setattr(r, "_StopFlag", StopAtThree)
    run = tmp_path / "run"
    with pytest.raises(Interrupted):
        train(cfg, run, progress=False, evaluate=False)
    monkeypatch.undo()
    resume_run(run, progress=False)
    a = json.loads((ref / "rule.json").read_text())["theta"]
    b = json.loads((run / "rule.json").read_text())["theta"]
    assert a == b
    assert (ref / "metrics.jsonl").read_text() == (run / "metrics.jsonl").read_text()
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"best_fitness", "mean_fitness", "worst_fitness", "sigma", "diverged"} <= set(row)
    assert {"loss", "query_loss", "query_accuracy", "fitness"} <= set(row)


def test_error_rate_fitness(small_problem):
    rule = TermPoolRule.from_names(POOL_TERMS, [0.05, 0.0, 0.0])
    tr = EvolutionTrainer(
        small_problem, rule, "open_es", population=4, sigma=0.01, meta_batch=2, objective="error"
    )
    import equinox as eqx

    params = eqx.partition(rule, eqx.is_inexact_array)[0]
    pop = jax.tree_util.tree_map(lambda a: np.stack([a]), params)
    keys = jax.random.split(jax.random.key(1), 2)
    fit, acc = tr.fitness(pop, keys)
    np.testing.assert_allclose(float(fit[0]), 1.0 - float(acc[0]), rtol=1e-6)
    with pytest.raises(MetaplasticError, match="ES fitness"):
        EvolutionTrainer(small_problem, rule, "open_es", objective="accuracy")


def test_es_defaults_to_the_error_rate_and_gradient_runs_ignore_it(small_problem):
    """The default ES fitness is the error rate; es_fitness is an ES setting, so the
    default (and an explicit value) leaves gradient outer loops valid and unchanged."""
    assert build_config("pool", "digits").train.es_fitness == "error"
    rule = TermPoolRule.from_names(POOL_TERMS, [0.05, 0.0, 0.0])
    assert EvolutionTrainer(small_problem, rule, "open_es", population=4).objective == "error"
    cfg = build_config("pool", "digits", {"outer": "adam"}, ["train.es_fitness='loss'"])
    assert cfg.train.outer == "adam" and cfg.train.es_fitness == "loss"


def test_es_metrics_name_what_they_hold(small_problem, objective="error"):
    """``loss`` is always the search mean's meta-loss (CE + L1), ``fitness`` its fitness
    (the error rate or the meta-loss), whatever the ES objective."""
    l1 = 0.1
    rule = TermPoolRule.from_names(POOL_TERMS, [0.05, 0.02, 0.0])
    tr = EvolutionTrainer(
        small_problem, rule, "open_es", population=4, meta_batch=2, l1=l1, objective=objective
    )
    _, aux = tr.step(tr.init(rule, jax.random.key(0)))
    pen = l1 * float(rule.l1())
    loss, qloss, acc = (float(aux[k]) for k in ("loss", "query_loss", "query_accuracy"))
    np.testing.assert_allclose(loss, qloss + pen, rtol=1e-5)
    want = 1.0 - acc + pen if objective == "error" else loss
    np.testing.assert_allclose(float(aux["fitness"]), want, rtol=1e-5)
    assert qloss > 0.5  # cross-entropy of a 3-way task, not an error rate in [0, 1 - acc]


def test_evolve_minimises_a_plain_function():
    """The generic ES loop (used by the study scripts) finds a quadratic's minimum, ignores
    non-finite members, and records one history row per generation."""
    from metaplastic.outer import evolve

    target = jnp.array([1.0, -2.0, 0.5])

    def fitness(p, key):
        f = jnp.sum((p - target) ** 2) + 0.01 * jax.random.normal(key)
        return jnp.where(p[0] > 3.0, jnp.nan, f)  # a diverging region

    res = evolve(
        fitness,
        jnp.zeros(3),
        jax.random.key(0),
        generations=120,
        sigma=0.2,
        lr=0.05,
        progress=False,
    )
    assert np.allclose(np.asarray(res.params), np.asarray(target), atol=0.1)
    assert len(res.history) == 120 and res.history[-1]["mean_fitness"] < 0.05
    assert res.best_fitness < 0.05


#: Strategies whose first-generation scale metaplastic corrects (see ``_start_at_sigma``),
#: plus one of each family, in the default run; the rest under slow.
SIGMA_FAST = {"xNES", "iAMaLGaM_Full", "iAMaLGaM_Univariate", "open_es", "cma_es", "PSO"}


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=() if n in SIGMA_FAST else pytest.mark.slow) for n in strategy_names()],
)
def test_first_generation_searches_at_sigma(name):
    """``train.sigma`` is the scale of the first generation's search around the rule, for
    every strategy: evosax's xNES alone would search at sigma**2 and iAMaLGaM at about 1
    whatever sigma (20x too wide here)."""
    from metaplastic.outer._evolution import strategy_init

    sigma = 0.05
    solution = {"a": jnp.zeros(3), "b": jnp.zeros(2)}
    population = 10 if name == "LM_MA_ES" else 64  # LM-MA-ES: at most 2 x coefficients
    strategy, params = make_strategy(name, solution, population, sigma)
    state = strategy_init(strategy, jax.random.key(0), solution, params, sigma)
    members, _ = strategy.ask(jax.random.key(1), state, params)
    spread = float(jnp.std(jnp.concatenate([members["a"], members["b"]], axis=1)))
    assert 0.3 * sigma < spread < 3.0 * sigma
    if name.startswith("iAMaLGaM"):  # C = sigma^2 I plus std^2: about 1.4 sigma
        assert 1.2 * sigma < spread < 2.2 * sigma


def test_lm_ma_es_population_is_bounded_by_the_coefficients():
    """evosax's LM-MA-ES takes sqrt(c (2 - c)) of a rate c = population / coefficients:
    a larger population than twice the coefficients made every coefficient NaN after one
    generation, and one coefficient stopped the search; both are refused in one line."""
    for n, population in [(3, 8), (1, 2), (10, 22)]:
        with pytest.raises(MetaplasticError, match="LM_MA_ES needs") as err:
            make_strategy("LM_MA_ES", np.zeros(n), population, 0.1)
        assert "\n" not in str(err.value)
    from metaplastic.outer import evolve

    res = evolve(
        lambda p, key: jnp.sum((p - 1.0) ** 2),
        jnp.zeros(3),
        jax.random.key(0),
        strategy="LM_MA_ES",
        population=6,
        generations=20,
        sigma=0.1,
        fitness_shaping="default",  # its recombination weights (centered ranks diverge)
        progress=False,
    )
    assert np.all(np.isfinite(np.asarray(res.params)))
    assert float(jnp.sum((res.params - 1.0) ** 2)) < 0.3  # started at 3


def test_finite_fitness_fills_non_finite_members():
    from metaplastic.outer._evolution import finite_fitness

    raw = jnp.array([0.25, jnp.nan, 0.5, jnp.inf])
    fit, finite, n_bad, worst = finite_fitness(raw)  # default: the worst finite fitness
    np.testing.assert_array_equal(fit, [0.25, 0.5, 0.5, 0.5])
    assert int(n_bad) == 2 and float(worst) == 0.5 and finite.tolist() == [1, 0, 1, 0]
    for penalty in (0.0, 0.5):
        fit = finite_fitness(raw, penalty)[0]
        np.testing.assert_array_equal(fit, [0.25, penalty, 0.5, penalty])
    fit, _, n_bad, worst = finite_fitness(jnp.full(3, jnp.nan))
    assert float(fit[0]) == 1e6 and int(n_bad) == 3 and float(worst) == -np.inf


def test_odd_populations_are_refused_only_with_antithetic_sampling():
    sol = jnp.zeros(4)
    with pytest.raises(MetaplasticError, match="even"):
        make_strategy("open_es", sol, 5, 0.1)  # antithetic by default
    make_strategy("EvoTF_ES", sol, 5, 0.1, antithetic=False)
    with pytest.raises(MetaplasticError, match="even"):
        make_strategy("EvoTF_ES", sol, 5, 0.1)
    with pytest.raises(MetaplasticError, match="even"):
        make_strategy("pgpe", sol, 5, 0.1, antithetic=False)  # PGPE always samples in pairs
    make_strategy("SimpleES", sol, 5, 0.1)  # takes no antithetic setting
    make_strategy("LM_MA_ES", np.zeros(2), 4, 0.1)  # the smallest allowed: 2 coefficients, 2n


def _trace(strategy, params, sigma, sol=None, n=3):
    """The search mean after ``n`` generations on a quadratic (eager, fixed keys)."""
    import equinox as eqx
    from jax.flatten_util import ravel_pytree

    from metaplastic.outer._evolution import search_center, strategy_init

    sol = jnp.zeros(4) if sol is None else eqx.filter(sol, eqx.is_inexact_array)
    state = strategy_init(strategy, jax.random.key(0), sol, params, sigma)
    for i in range(n):
        pop, state = strategy.ask(jax.random.key(10 + i), state, params)
        fit = sum(
            jnp.sum(((x - 1.0) ** 2).reshape(x.shape[0], -1), axis=1)
            for x in jax.tree_util.tree_leaves(pop)
        )
        state, _ = strategy.tell(jax.random.key(20 + i), pop, fit, state, params)
    center = ravel_pytree(search_center(strategy, state))[0]
    return np.asarray(center), float(jnp.mean(state.std))


def test_strategy_and_trainer_defaults_are_the_documented_ones(small_problem):
    """make_strategy: no sigma decay, Adam lr 1e-3, antithetic sampling; the trainer:
    population 16, sigma 0.01, meta-batch 8, no L1, the worst finite fitness for members
    that blew up, the error-rate fitness."""
    sol = jnp.zeros(4)
    default = _trace(*make_strategy("open_es", sol, 4, 0.1), 0.1)
    explicit = make_strategy("open_es", sol, 4, 0.1, 1.0, 1e-3, True)
    np.testing.assert_array_equal(default[0], _trace(*explicit, 0.1)[0])
    assert default[1] == pytest.approx(0.1)
    decayed = _trace(*make_strategy("open_es", sol, 4, 0.1, sigma_decay=0.5), 0.1)
    assert decayed[1] == pytest.approx(0.1 * 0.5**2, rel=1e-5)  # std of the 3rd generation

    rule = TermPoolRule.from_names(POOL_TERMS, [0.05, 0.0, 0.0])
    tr = EvolutionTrainer(small_problem, rule, "open_es")
    assert (tr.strategy.population_size, tr.sigma, tr.meta_batch, tr.l1, tr.penalty) == (
        16,
        0.01,
        8,
        0.0,
        -1.0,
    )
    assert tr.objective == "error"
    ref = EvolutionTrainer(
        small_problem, rule, "open_es", sigma_decay=1.0, lr=1e-3, antithetic=True
    )
    a = _trace(tr.strategy, tr.es_params, 0.01, rule)
    b = _trace(ref.strategy, ref.es_params, 0.01, rule)
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1] == b[1]
    state = tr.init(rule, jax.random.key(0))
    assert int(state.skipped) == 0 and int(state.step) == 0


def test_es_settings_at_their_bounds():
    import dataclasses

    from metaplastic.run._config import TrainConfig

    t = TrainConfig()
    EvolutionTrainer.check_config(dataclasses.replace(t, population=2))
    for bad in ({"population": 1}, {"sigma": 0.0}, {"sigma_decay": 0.0}):
        with pytest.raises(MetaplasticError):
            EvolutionTrainer.check_config(dataclasses.replace(t, **bad))


def test_random_search_draws_around_the_rule():
    from metaplastic.outer._evolution import strategy_init

    sol = jnp.full(3, 2.0)
    strategy, params = make_strategy("RandomSearch", sol, 256, 0.1)
    state = strategy_init(strategy, jax.random.key(0), sol, params, 0.1)
    members, _ = strategy.ask(jax.random.key(1), state, params)
    assert abs(float(jnp.mean(members)) - 2.0) < 0.03
    assert 0.08 < float(jnp.std(members)) < 0.12


class _NaNAboveOne(eqx.Module):
    """A stand-in problem: meta-loss ``(theta_0 - 0.3)^2``, NaN where ``theta_0 > 1``."""

    def meta_loss(self, rule, keys, l1):
        th = rule.theta[0]
        loss = jnp.where(th > 1.0, jnp.nan, (th - 0.3) ** 2)
        aux = {"loss": loss, "query_loss": loss, "query_accuracy": 1.0 - loss}
        return loss, dict(aux, diverged=jnp.isnan(loss).astype(jnp.int32))


def test_a_generation_in_which_every_member_blows_up_is_skipped_and_reported():
    rule = TermPoolRule.from_names(["pseudo_gradient"], [5.0])
    tr = EvolutionTrainer(
        _NaNAboveOne(), rule, "open_es", population=4, sigma=0.01, meta_batch=1, objective="loss"
    )
    state, aux = tr.step(tr.init(rule, jax.random.key(0)))
    assert int(state.skipped) == 1 and int(state.diverged_members) == 4
    assert int(aux["diverged"]) == 4 and not bool(aux["grad_finite"])
    assert float(aux["mean_fitness"]) == 0.0  # no finite member: nothing to average
    rule = TermPoolRule.from_names(["pseudo_gradient"], [0.3])
    state, aux = tr.step(tr.init(rule, jax.random.key(0)))
    assert int(state.skipped) == 0 and bool(aux["grad_finite"])
    # antithetic pairs around 1.0: half the members above 1 (NaN), half below (fitness
    # about 0.7^2); the mean is over the finite ones
    rule = TermPoolRule.from_names(["pseudo_gradient"], [1.0])
    state, aux = tr.step(tr.init(rule, jax.random.key(0)))
    assert int(aux["diverged"]) == 2 and int(state.skipped) == 0
    assert float(aux["mean_fitness"]) == pytest.approx(0.49, abs=0.03)
