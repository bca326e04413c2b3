"""Property-based tests (hypothesis): export round trips, config round trips and the IDX
reader, on generated inputs rather than a few hand-picked ones.

Every property runs a fixed number of derandomized examples (reproducible in CI; the
examples change when a test's source does), and the array shapes stay fixed across examples
so JAX compiles each operation once. Edge cases that the search hits only for some seeds are
pinned with ``@example`` (the inputs that crashed the library before this file's fixes, and
two validation boundaries).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import re
import tempfile
import typing
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import sympy as sp
import tomli_w
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from metaplastic._errors import MetaplasticError
from metaplastic.export._export import equation_rule_from_export, format_rule, rule_from_json
from metaplastic.inner._episode import OBJECTIVES
from metaplastic.inner._feedback import FEEDBACK_MODES, PC_VARIANTS
from metaplastic.inner._network import ACTIVATIONS, ERROR_NORMS, INHIBITION_INITS
from metaplastic.outer import GRADIENT_MODES, OPTIMIZERS
from metaplastic.outer._evolution import ES_OBJECTIVES, FITNESS_SHAPING, strategy_names
from metaplastic.outer._units import UNITS
from metaplastic.rules._rule_kinds import MONOMIALS, EquationRule, TaylorRule, monomial_expr
from metaplastic.rules._rules import PlasticFeedback, TermPoolRule
from metaplastic.rules._symbolic import is_matrix
from metaplastic.rules._terms import TERMS
from metaplastic.run._config import (
    SECTIONS,
    NetworkConfig,
    RunConfig,
    TaskConfig,
    apply_overrides,
    build_config,
    config_from_dict,
    load_task,
)
from metaplastic.run._run import read_run_config, start_run_dir
from metaplastic.tasks._data import DATASETS, EMNIST_SPLITS, read_idx

from .conftest import random_signals

#: Significant digits the export rounds every coefficient to (``rule_expression(digits=4)``).
EXPORT_DIGITS = 4


def _settings(n: int, shrink: bool = True):
    """``n`` derandomized examples; ``shrink=False`` reports the first failing example as
    found (shrinking an export example at ~0.3 s each takes minutes)."""
    phases = [Phase.explicit, Phase.generate] + ([Phase.shrink] if shrink else [])
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        phases=phases,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# --- export -> parse back -------------------------------------------------------------------

POOL = tuple(sorted(TERMS))
N_OUT, N_IN = 4, 3


def _round(v: float) -> float:
    """``v`` as the export prints it: rounded to EXPORT_DIGITS significant digits (read back
    from the printed text, not the 17-bit binary value sympy keeps at that precision)."""
    return float(sp.sstr(sp.Float(float(v), EXPORT_DIGITS)))


def _bound(expr: sp.Basic, env: dict[str, np.ndarray]) -> np.ndarray:
    """Elementwise bound on |expr| with every sum replaced by the sum of absolute values:
    the scale of float32 rounding error in evaluating ``expr`` in any order."""

    def b(node):
        if isinstance(node, sp.MatrixSymbol | sp.Symbol):
            return np.abs(env[node.name])
        if node.is_Number:
            return abs(float(node))
        if isinstance(node, sp.ZeroMatrix):
            return 0.0
        if isinstance(node, sp.Add | sp.MatAdd):
            return sum(b(a) for a in node.args)
        if isinstance(node, sp.MatMul):
            out, mats = 1.0, None
            for a in node.args:
                if isinstance(a, sp.MatrixExpr):
                    mats = b(a) if mats is None else mats @ b(a)
                else:
                    out = out * b(a)
            return out if mats is None else out * mats
        if isinstance(node, sp.Mul | sp.HadamardProduct):
            out = 1.0
            for a in node.args:
                out = out * b(a)
            return out
        if isinstance(node, sp.Pow | sp.HadamardPower):
            # negative/fractional powers only appear on sums of squares and on n_out here,
            # where the bound is the value itself
            return b(node.args[0]) ** float(node.args[1])
        if isinstance(node, sp.Transpose):
            return b(node.arg).T
        raise AssertionError(f"no bound for {type(node).__name__}")

    return np.broadcast_to(b(expr), (N_OUT, N_IN))


def _env(s, matrix: bool) -> dict[str, np.ndarray]:
    f = lambda v: np.asarray(v, np.float64)  # noqa: E731
    pre = (lambda v: f(v)[:, None]) if matrix else (lambda v: f(v)[None, :])
    env = {n: pre(getattr(s, n)) for n in ("x", "e_pre")}
    env.update({n: f(getattr(s, n))[:, None] for n in ("y", "e", "ybar", "theta_M", "nrm0")})
    env.update(W=f(s.W), one_in=np.ones((N_IN, 1)), one_out=np.ones((N_OUT, 1)))
    env.update(n_in=float(N_IN), n_out=float(N_OUT))
    return env


#: float32 evaluation error allowed, relative to :func:`_bound` (observed: below 4e-7).
#: 100x below 5e-4, the largest relative change that rounding to 4 significant digits
#: makes, so the comparison cannot absorb a coefficient printed or parsed differently.
EVAL_RTOL = 5e-6


def _assert_same_update(got, want, ref_rule, layer, s):
    """``got == want`` up to float32 evaluation error of ``ref_rule``'s sympy form."""
    expr = ref_rule.to_sympy(layer=layer)
    tol = EVAL_RTOL * _bound(expr, _env(s, is_matrix(expr))) + 1e-30
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.all(np.isfinite(want))
    err = np.abs(got - want)
    assert np.all(err <= tol), (
        f"max error {err.max():.3g} (allowed {tol[np.argmax(err - tol)]:.3g} there)"
    )


def _theta_of(rule):
    return rule.rule.theta if isinstance(rule, PlasticFeedback) else rule.theta


def _check_round_trip(rule, ref, threshold, n_layers, seed):
    """The rule rebuilt from its JSON export gives bit-identical updates; the equation rule
    parsed from the exported text (and from the equations stored in the JSON) gives the
    updates of ``ref`` (the rule with its coefficients as the export prints them)."""
    data = json.loads(format_rule(rule, "json", threshold))
    back = rule_from_json(data)
    assert type(back) is type(rule) and back.state_rate() == rule.state_rate()
    np.testing.assert_array_equal(np.asarray(_theta_of(back)), np.asarray(_theta_of(rule)))
    parsed = equation_rule_from_export(rule, threshold)
    assert parsed.state_rate() == rule.state_rate()
    keys = ["all"] if n_layers is None else [f"layer{i}" for i in range(n_layers)]
    assert set(data["equations"]) - {"feedback"} == set(keys)
    from_json = EquationRule.from_text([data["equations"][k]["text"] for k in keys])
    s = random_signals(seed, n_out=N_OUT, n_in=N_IN)
    for layer in range(n_layers or 1):
        want = rule(layer, s)
        np.testing.assert_array_equal(np.asarray(back(layer, s)), np.asarray(want))
        ref_layer = None if n_layers is None else layer
        ref_want = ref(layer, s)
        _assert_same_update(parsed(layer, s), ref_want, _base(ref), ref_layer, s)
        _assert_same_update(from_json(layer, s), ref_want, _base(ref), ref_layer, s)
    return data, back, parsed, s


def _base(rule):
    return rule.rule if isinstance(rule, PlasticFeedback) else rule


#: Coefficient sets whose sums stay at <= 4 significant digits: the export merges the
#: coefficients of terms that share a monomial (``hebbian`` and ``oja`` both hold
#: ``y x^T``) and rounds the sum, so only such sets give a rounding-free expected update.
_hundredths = st.integers(-99, 99)
#: Arbitrary float32 coefficients (one in five zero): a mantissa in [1, 10) at a decade in
#: 1e-4 .. 1e1.
_any_coef = st.builds(
    lambda zero, sign, m, e: 0.0 if zero == 0 else sign * m * 10.0**e,
    st.integers(0, 4),
    st.sampled_from([-1.0, 1.0]),
    st.floats(1.0, 10.0, exclude_max=True),
    st.integers(-4, 1),
)
_thresholds = st.sampled_from([0.0, 1e-4, 3e-3, 0.05])
_seeds = st.integers(0, 2**32 - 1)


@_settings(20, shrink=False)
@given(
    per_layer=st.booleans(),
    coefs=st.lists(_hundredths, min_size=2 * len(POOL), max_size=2 * len(POOL)),
    decade=st.integers(-4, 2),
    mask=st.lists(st.booleans(), min_size=len(POOL), max_size=len(POOL)),
    threshold=_thresholds,
    rate=st.floats(0.0, 1.0, exclude_min=True),
    target=_hundredths,
    feedback=st.one_of(st.none(), st.tuples(_any_coef, _any_coef)),
    seed=_seeds,
)
def test_term_pool_export_parses_back_to_the_same_update(
    per_layer, coefs, decade, mask, threshold, rate, target, feedback, seed
):
    """All 16 built-in terms under a random mask, shared or per layer, with or without
    plastic feedback, pruned at a random threshold. Coefficients are hundredths times one
    power of ten, so even the merged coefficients of terms that share a monomial print
    exactly; the feedback coefficients are arbitrary and compared as printed."""
    n_layers = 2 if per_layer else None
    theta = np.asarray(coefs, np.float64).reshape(2, len(POOL)) / 100 * 10.0**decade
    theta = (theta if per_layer else theta[0]).astype(np.float32)
    terms = TermPoolRule.from_names(POOL, target=target / 100).terms
    rule = TermPoolRule(terms, theta, mask, rate=rate)
    # what the export prints: live coefficients above the threshold, rounded
    live = np.asarray(mask) & (np.abs(theta.astype(np.float64)) > threshold)
    ref_theta = np.where(live, np.vectorize(_round)(theta), 0.0).astype(np.float32)
    np.testing.assert_array_equal(ref_theta[live], theta[live])  # already exact at 4 digits
    ref = TermPoolRule(terms, ref_theta, mask, rate=rate)
    if feedback is not None:
        fb = np.asarray(feedback, np.float32)
        rule = PlasticFeedback(rule, jnp.asarray(fb))
        ref = PlasticFeedback(ref, jnp.asarray([_round(v) for v in fb], jnp.float32))
    data, back, parsed, s = _check_round_trip(rule, ref, threshold, n_layers, seed)
    assert back.coefficients() == rule.coefficients()
    if feedback is not None:
        B = np.random.default_rng(seed).normal(size=(N_OUT, N_IN)).astype(np.float32)
        want = rule.feedback_delta(0, s, B)
        np.testing.assert_array_equal(np.asarray(back.feedback_delta(0, s, B)), want)
        np.testing.assert_array_equal(
            np.asarray(parsed.feedback_delta(0, s, B)), np.asarray(ref.feedback_delta(0, s, B))
        )
        # ... and those are the numbers the exported feedback equation shows
        text = data["equations"]["feedback"]["text"]
        shown = {abs(float(v)) for v in re.findall(r"\d+\.\d+(?:e[-+]?\d+)?", text)}
        assert shown == {abs(_round(v)) for v in fb if v != 0.0}, text


@_settings(15, shrink=False)
@given(
    per_layer=st.booleans(),
    coefs=st.lists(_any_coef, min_size=2 * len(MONOMIALS), max_size=2 * len(MONOMIALS)),
    mask=st.lists(st.booleans(), min_size=len(MONOMIALS), max_size=len(MONOMIALS)),
    threshold=_thresholds,
    seed=_seeds,
)
def test_taylor_export_parses_back_to_the_same_update(per_layer, coefs, mask, threshold, seed):
    """Monomials are distinct, so no coefficients merge: arbitrary coefficients, and the
    expected update is the one with every coefficient rounded as the export prints it."""
    n_layers = 2 if per_layer else None
    theta = np.asarray(coefs, np.float32).reshape(2, len(MONOMIALS))
    theta = theta if per_layer else theta[0]
    rule = TaylorRule(theta, mask)
    live = np.asarray(mask) & (np.abs(theta.astype(np.float64)) > threshold)
    ref = TaylorRule(np.where(live, np.vectorize(_round)(theta), 0.0), mask)
    _, back, _, _ = _check_round_trip(rule, ref, threshold, n_layers, seed)
    assert back.coefficients() == rule.coefficients()


# --- config round trips ---------------------------------------------------------------------

_floats = st.floats(allow_nan=False, allow_infinity=False)
_positive = st.floats(min_value=0.0, exclude_min=True, allow_nan=False, allow_infinity=False)
_nonneg = st.floats(min_value=0.0, allow_nan=False, allow_infinity=False)
_fraction = st.floats(0.0, 1.0)
_open_fraction = st.floats(0.0, 1.0, exclude_min=True, exclude_max=True)
#: Any text TOML can hold (control characters included; lone surrogates are not text).
_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
_count = st.integers(1, 2**31)
_int64 = st.integers(-(2**63), 2**63 - 1)
EQUATIONS = (
    "-0.03*e*x.T + 0.01*(y*x.T - y*y.T*W)",
    "0.5*x*y - 0.25*W*y**2",
    "tanh(e)*x - 1e-3*W",
    "hadamard(y, y - theta_M)*x.T",
)


def _monomial_spec(i: int, as_code: bool) -> str:
    code = MONOMIALS[i]
    return "".join(map(str, code)) if as_code else sp.sstr(monomial_expr(code))


@st.composite
def _rule_tables(draw):
    kind = draw(st.sampled_from(["term_pool", "taylor", "mlp", "equation"]))
    terms = draw(st.lists(st.sampled_from(POOL), min_size=1, max_size=6, unique=True))
    idx = draw(st.lists(st.integers(0, len(MONOMIALS) - 1), max_size=8, unique=True))
    monomials = [_monomial_spec(i, draw(st.booleans())) for i in idx]
    n_init = {"term_pool": len(terms), "taylor": len(idx) or len(MONOMIALS)}.get(kind)
    init_len = st.sampled_from([0, n_init]) if n_init else st.integers(0, 4)
    return {
        "name": draw(_text),
        "kind": kind,
        "terms": terms,
        "init": draw(init_len.flatmap(lambda n: st.lists(_floats, min_size=n, max_size=n))),
        "mask": draw(
            st.sampled_from([[], [True] * len(terms)]).flatmap(
                lambda m: st.lists(st.booleans(), min_size=len(m), max_size=len(m))
            )
        ),
        "shared": draw(st.booleans()),
        "monomials": monomials,
        "mlp_hidden": draw(st.lists(st.integers(1, 64), min_size=1, max_size=3)),
        "mlp_scale": draw(_positive),
        "mlp_seed": draw(_int64),
        "mlp_pseudo_gradient": draw(_floats),
        "equations": draw(st.lists(st.sampled_from(EQUATIONS), min_size=1, max_size=3)),
        "state_rate": draw(st.floats(0.0, 1.0, exclude_min=True)),
        "scaling_target": draw(_floats),
        "feedback_init": draw(st.lists(_floats, min_size=2, max_size=2)),
        "description": draw(_text),
    }


def _task_tables():
    # a kind must leave the keys only the other kind reads at their defaults
    defaults = TaskConfig()
    shared = {"name": _text, "description": _text}
    pca = {
        "dim": _count,
        "steps": _count,
        "eig_decay": _open_fraction,
        "input_scale": _positive,
    }
    classification = {
        "dataset": st.sampled_from(DATASETS),
        "luminosity_shift": st.floats(0.0, 1.0),
        "n_way": st.integers(2, 2**31),
        "k_shot": _count,
        "q_query": _count,
        "test_fraction": _open_fraction,
        "val_fraction": _open_fraction,
        "split_seed": _int64,
        "data_dir": _text,
        "emnist_split": st.one_of(st.sampled_from(EMNIST_SPLITS), _text),
    }

    continual = {"stages": st.integers(1, 2**31), "stage_steps": _count}

    def at_defaults(*groups):
        return {k: st.just(getattr(defaults, k)) for keys in groups for k in keys}

    no_shift = {k: v for k, v in classification.items() if k != "luminosity_shift"}
    return st.one_of(
        st.fixed_dictionaries(
            {**shared, "kind": st.just("pca"), **pca, **at_defaults(classification, continual)}
        ),
        st.fixed_dictionaries(
            {
                **shared,
                "kind": st.just("classification"),
                **classification,
                **at_defaults(pca, continual),
            }
        ),
        st.fixed_dictionaries(
            {
                **shared,
                "kind": st.just("continual"),
                **no_shift,
                **continual,
                **at_defaults(pca, ["luminosity_shift"]),
            }
        ),
    )


#: The [network] keys only kind = "ei" reads, at their defaults.
EI_DEFAULTS = {
    k: getattr(NetworkConfig(), k)
    for k in (
        "inhibitory_fraction",
        "norm",
        "error_norm",
        "inhibitory_rate",
        "local_weight",
        "inhibition_init",
    )
}


def _network_tables():

    shared = {
        "hidden": st.lists(st.integers(1, 4096), max_size=5),
        "n_out": st.integers(0, 2**31),
        "activation": st.sampled_from(ACTIVATIONS),
        "beta": _positive,
        "bias": st.booleans(),
        "init_scale": _positive,
    }
    # an mlp must leave the EI keys at their defaults (a key its kind does not read is refused)
    mlp = {"kind": st.just("mlp"), **{k: st.just(v) for k, v in EI_DEFAULTS.items()}}
    inorm = st.fixed_dictionaries(
        {"norm": st.just("inorm"), "inhibitory_rate": st.floats(0.0, 1e3)}
    )
    plain = st.fixed_dictionaries({"norm": st.just("none"), "inhibitory_rate": st.just(0.0)})
    ei = {
        "kind": st.just("ei"),
        "inhibitory_fraction": st.floats(0.0, 1.0, exclude_min=True),
        "error_norm": st.sampled_from(ERROR_NORMS),
        "local_weight": _positive,
        "inhibition_init": st.sampled_from(INHIBITION_INITS),
    }
    return st.one_of(
        st.fixed_dictionaries({**shared, **mlp}),
        st.tuples(st.fixed_dictionaries({**shared, **ei}), st.one_of(inorm, plain)).map(
            lambda t: {**t[0], **t[1]}
        ),
    )


def _train_tables():

    def episodes(t):  # episodes >= meta_batch
        return st.integers(t["meta_batch"], 2**31).map(lambda n: {**t, "episodes": n})

    def prune_refit(t):  # refitting needs a gradient outer loop
        steps = st.integers(0, 2**31) if t["outer"] in OPTIMIZERS else st.just(0)
        return steps.map(lambda n: {**t, "prune_refit": n})

    return (
        st.fixed_dictionaries(
            {
                "feedback": st.sampled_from(FEEDBACK_MODES),
                "pc_variant": st.sampled_from(PC_VARIANTS),
                "pc_steps": st.integers(0, 2**31),
                "pc_rate": st.floats(0.0, 1.0, exclude_min=True, allow_nan=False),
                "outer": st.sampled_from([*OPTIMIZERS, *strategy_names()]),
                "lr": _positive,
                "lr_end": _fraction,
                "clip": _nonneg,
                "grad_limit": _nonneg,
                "units": st.sampled_from(UNITS),
                "weight_limit": st.one_of(
                    st.just(0.0),
                    st.floats(1.0, exclude_min=True, allow_nan=False, allow_infinity=False),
                ),
                "meta_batch": _count,
                "l1": _nonneg,
                "gradient": st.sampled_from(GRADIENT_MODES),
                "remat": st.booleans(),
                "truncation": st.just(0),  # > 0 needs a task that can cut its episodes
                "seed": st.integers(0, 2**32 - 1),
                "eval_episodes": _count,
                "log_every": _count,
                "prune_threshold": _nonneg,
                "prune_effect": _nonneg,
                "prune_episodes": _count,
                "checkpoint_every": st.integers(0, 2**31),
                "keep_checkpoints": _count,
                "population": st.integers(1, 2**30).map(lambda n: 2 * n),  # antithetic: even
                "sigma": _positive,
                "sigma_decay": _positive,
                "antithetic": st.booleans(),
                "fitness_shaping": st.sampled_from(list(FITNESS_SHAPING)),
                "penalty": _floats,
                "es_fitness": st.sampled_from(ES_OBJECTIVES),
                "devices": st.integers(0, 2**31),
                "vmap_width": st.integers(-1, 2**31),
                "objective": st.sampled_from(OBJECTIVES),
                "query_temperature": _positive,
                "val_episodes": _count,
                "select_every": st.integers(0, 2**31),
                "max_diverged": _fraction,
                "max_step_diverged": _fraction,
                "max_skipped": _fraction,
                "require_improvement": st.booleans(),
            }
        )
        .flatmap(episodes)
        .flatmap(prune_refit)
    )


def _config_tables():
    return st.fixed_dictionaries(
        {
            "rule": _rule_tables(),
            "task": _task_tables(),
            "network": _network_tables(),
            "train": _train_tables(),
        }
    )


def _field_names(section: str) -> set[str]:

    return {f.name for f in dataclasses.fields(SECTIONS[section])}


@_settings(100)
@given(tables=_config_tables())
def test_config_round_trips_through_config_toml(tables):
    """A valid config written the way a run writes its ``config.toml`` reads back equal."""
    for section, table in tables.items():  # a new config field needs a strategy above
        assert set(table) == _field_names(section), section
    cfg = config_from_dict(tables, "generated")
    assert cfg.to_dict() == tables
    assert _write_and_read(cfg) == cfg


def _write_and_read(cfg):
    """``cfg`` written as a run writes its ``config.toml``, and read back as a run is."""
    with tempfile.TemporaryDirectory() as tmp:
        start_run_dir(Path(tmp) / "run", cfg)
        back, manifest = read_run_config(Path(tmp) / "run")
    assert manifest == {}
    return back


def _toml_literal(v) -> str:
    """``v`` as a TOML value on one line (what ``--set section.key=VALUE`` takes)."""
    if isinstance(v, dict):
        return (
            "{"
            + ", ".join(f"{_toml_literal(str(k))} = {_toml_literal(x)}" for k, x in v.items())
            + "}"
        )
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_literal(x) for x in v) + "]"
    if isinstance(v, float) and not np.isfinite(v):
        return "nan" if v != v else ("inf" if v > 0 else "-inf")
    return tomli_w.dumps({"v": v})[4:].strip()


@_settings(60)
@given(tables=_config_tables(), data=st.data())
def test_overrides_in_any_order_give_the_same_config(tables, data):
    """Setting every key with ``--set`` (in any order, on top of a preset) gives the config
    built from the same values, whatever the order of the overrides."""
    overrides = [
        f"{section}.{key}={_toml_literal(value)}"
        for section, table in tables.items()
        for key, value in table.items()
    ]
    overrides = data.draw(st.permutations(overrides))
    cfg = apply_overrides(build_config("pool", "digits"), overrides)
    assert cfg == config_from_dict(tables, "generated")


def _conforms(value, tp) -> bool:
    """Whether ``value`` has the type the config field ``tp`` takes (ranges aside)."""
    if typing.get_origin(tp) is tuple:
        elem = typing.get_args(tp)[0]
        return isinstance(value, list | tuple) and all(_conforms(v, elem) for v in value)
    if tp is bool or isinstance(value, bool):
        return tp is bool and isinstance(value, bool)
    if tp is float:
        if not isinstance(value, int | float):
            return False
        try:
            return bool(np.isfinite(float(value)))
        except OverflowError:  # an integer beyond the float range
            return False
    if tp is str:  # text that can be saved: no lone surrogates
        return isinstance(value, str) and not any(0xD800 <= ord(c) <= 0xDFFF for c in value)
    return isinstance(value, tp)


def _has_none(v) -> bool:
    if isinstance(v, dict):
        return any(_has_none(x) for x in v.values())
    if isinstance(v, list | tuple):
        return any(_has_none(x) for x in v)
    return v is None


#: Smallest valid value of the integer fields that count something.
MIN_COUNT = {
    ("task", "dim"): 1,
    ("task", "steps"): 1,
    ("task", "n_way"): 2,
    ("task", "k_shot"): 1,
    ("task", "q_query"): 1,
    ("network", "n_out"): 0,
    ("train", "meta_batch"): 1,
    ("train", "episodes"): 1,
    ("train", "eval_episodes"): 1,
    ("train", "log_every"): 1,
    ("train", "prune_episodes"): 1,
    ("train", "prune_refit"): 0,
    ("train", "checkpoint_every"): 0,
    ("train", "keep_checkpoints"): 1,
    ("train", "population"): 2,
    ("train", "devices"): 0,
    ("train", "vmap_width"): -1,
    ("train", "val_episodes"): 1,
    ("train", "select_every"): 0,
    ("train", "pc_steps"): 0,
}

#: Numbers at the edges: beyond the float range, beyond int64, not finite.
_edge_numbers = st.sampled_from(
    [10**400, -(10**400), 2**63, -(2**64), 2**1024, float("nan"), float("inf"), -float("inf")]
)
_leaf = st.one_of(
    st.booleans(),
    st.integers(),
    _edge_numbers,
    st.floats(),
    st.text(max_size=8),
    st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=2),
    st.none(),
)
_anything = st.recursive(
    _leaf,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)


@st.composite
def _bad_entries(draw):
    """(section, key, value, must_fail): one entry of a valid config replaced."""
    how = draw(
        st.sampled_from(
            ["anything", "wrong_type", "negative_count", "unknown_key", "edge_number", "edge_text"]
        )
    )
    if how == "negative_count":
        (section, key), low = draw(st.sampled_from(sorted(MIN_COUNT.items())))
        value = draw(st.one_of(st.just(low - 1), st.integers(max_value=low - 1)))
        return section, key, value, True
    section = draw(st.sampled_from(sorted(SECTIONS)))
    names = sorted(_field_names(section))
    if how == "unknown_key":
        key = draw(
            st.from_regex(r"[a-z_][a-z0-9_]{0,12}", fullmatch=True).filter(lambda k: k not in names)
        )
        return section, key, draw(_anything), True
    hints = typing.get_type_hints(SECTIONS[section])
    if how == "edge_text":  # a string field; the text holds a lone surrogate
        names = [n for n in names if hints[n] in (str, tuple[str, ...])]
    if how == "edge_number":  # a number field
        numbers = (int, float, tuple[int, ...], tuple[float, ...])
        names = [n for n in names if hints[n] in numbers]
    key = draw(st.sampled_from(names))
    tp = hints[key]
    value = draw(_anything)
    if how == "edge_text":
        value = draw(st.sampled_from(["\udcff", "a\ud800b"]))
        value = [value] if tp is not str else value
    if how == "edge_number":
        value = draw(_edge_numbers)
        if typing.get_origin(tp) is tuple:
            value = [value]
    if how == "wrong_type":
        value = draw(_anything.filter(lambda v: not _conforms(v, tp)))
    return section, key, value, not _conforms(value, tp)


#: The defaults, a valid config to put the known edge cases in.
DEFAULT_TABLES = RunConfig().to_dict()


@_settings(300)
@given(tables=_config_tables(), entry=_bad_entries())
@example(tables=DEFAULT_TABLES, entry=("train", "lr", 10**400, True))
@example(tables=DEFAULT_TABLES, entry=("rule", "description", "\udcff", True))
@example(tables=DEFAULT_TABLES, entry=("task", "n_way", 1, True))
@example(tables=DEFAULT_TABLES, entry=("network", "beta", float("nan"), True))
def test_invalid_config_values_raise_metaplastic_error(tables, entry):
    """Any value in any place of a run's config (a wrong type, a negative count, an unknown
    key, nested garbage, huge integers, NaN, unsavable text) is accepted or refused with
    MetaplasticError, never another exception; the wrong ones always refused, and what is
    accepted round-trips through config.toml. ``--set`` with the same value
    (on the valid config) agrees with reading it from a config file."""
    section, key, value, must_fail = entry
    bad = {name: dict(t) for name, t in tables.items()}
    bad[section][key] = value
    try:
        cfg = config_from_dict(bad, "config.toml")
        read_ok = True
    except MetaplasticError as err:
        assert "\n" not in str(err) and "config.toml" in str(err)
        read_ok = False
    assert not (must_fail and read_ok), (section, key, value)
    if read_ok:  # what is accepted can be saved as a run's config.toml and read back
        assert _write_and_read(cfg) == cfg
    if _has_none(value):
        return  # TOML has no null
    base = config_from_dict(tables, "generated")
    try:
        apply_overrides(base, [f"{section}.{key}={_toml_literal(value)}"])
        set_ok = True
    except MetaplasticError as err:
        assert "\n" not in str(err)
        set_ok = False
    assert set_ok == read_ok, (section, key, value)


_override_text = st.one_of(
    st.text(max_size=30),
    st.builds(
        lambda section, key, rhs: f"{section}.{key}={rhs}",
        st.sampled_from(["rule", "task", "network", "train", "trian"]),
        st.sampled_from(["lr", "n_way", "hidden", "terms", "init", "kind", "lrr", ""]),
        st.one_of(
            st.text(max_size=20),
            st.sampled_from(
                ["9" * 5000, "1" + "0" * 400, "[" * 50, "{a = 1}", "nan", "-inf", "\udcff"]
            ),
        ),
    ),
)


@_settings(200)
@given(texts=st.lists(_override_text, min_size=1, max_size=3))
@example(texts=["train.lr=" + "9" * 5000])
def test_arbitrary_set_texts_raise_metaplastic_error(texts):
    """``--set`` with any text is applied or refused with one line of MetaplasticError."""
    try:
        apply_overrides(RunConfig(), texts)
    except MetaplasticError as err:
        assert "\n" not in str(err)


@_settings(100)
@given(
    body=st.one_of(
        st.binary(max_size=60),
        st.builds(
            lambda table, key, rhs: f"[{table}]\n{key} = {rhs}\n".encode(),
            st.sampled_from(["task", "network", "train", "rule"]),
            st.sampled_from(["n_way", "hidden", "beta", "lr", "dataset", "x"]),
            st.one_of(
                st.text(max_size=20),
                st.sampled_from(["9" * 5000, "1" + "0" * 400, "[1, [2]]", "{a = 1}", "nan"]),
            ),
        ),
    )
)
@example(body=b"n_way = " + b"9" * 5000 + b"\n")
def test_damaged_task_files_raise_metaplastic_error(body):
    """A task file with any bytes in it loads or is refused with MetaplasticError."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.toml"
        path.write_bytes(b"[task]\n" + body)
        try:
            load_task(str(path))
        except MetaplasticError as err:
            assert "\n" not in str(err)


# --- IDX reader -----------------------------------------------------------------------------

#: IDX type codes and their big-endian element types (the format's definition, written out
#: here rather than taken from the reader under test).
IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@st.composite
def _idx_files(draw):
    """(file bytes, type code, shape, data bytes) of a valid IDX file, random content."""
    code = draw(st.sampled_from(sorted(IDX_TYPES)))
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=1, max_size=4)))
    n = int(np.prod(shape)) * np.dtype(IDX_TYPES[code]).itemsize
    data = np.random.default_rng(draw(_seeds)).bytes(n)
    head = bytes([0, 0, code, len(shape)]) + b"".join(d.to_bytes(4, "big") for d in shape)
    return head + data, code, shape, data


def _read(raw: bytes, gz: bool):

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x-idx-ubyte"
        path.write_bytes(gzip.compress(raw) if gz else raw)
        return read_idx(path), str(path)


@_settings(100)
@given(idx=_idx_files(), gz=st.booleans())
def test_idx_files_read_back_as_written(idx, gz):
    raw, code, shape, data = idx
    arr, _ = _read(raw, gz)
    big = np.dtype(IDX_TYPES[code])
    assert arr.shape == shape and arr.dtype == big.newbyteorder("=")
    assert arr.astype(big).tobytes() == data  # bit for bit, NaN payloads included


def _valid_idx(raw: bytes) -> tuple[np.ndarray | None, str]:
    """What a correct reader returns for ``raw``: the array, or None and the words its
    error message must hold (what is wrong with the file)."""
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except Exception:  # noqa: BLE001 - any damage to the compressed stream
            return None, "corrupt"
    if len(raw) < 4:
        return None, "truncated IDX file"
    if raw[:2] != b"\0\0" or raw[2] not in IDX_TYPES or not 1 <= raw[3] <= 4:
        return None, "wrong IDX magic number"
    head = 4 + 4 * raw[3]
    if len(raw) < head:
        return None, "truncated IDX header"
    dims = [int.from_bytes(raw[i : i + 4], "big") for i in range(4, head, 4)]
    dtype = np.dtype(IDX_TYPES[raw[2]])
    need = math.prod(dims) * dtype.itemsize
    if len(raw) - head != need:
        return None, "truncated" if len(raw) - head < need else "trailing bytes"
    try:
        return np.frombuffer(raw, dtype, offset=head).reshape(dims), ""
    except ValueError:  # a shape numpy cannot hold, e.g. (2**32 - 1, 0, 2**32 - 1)
        return None, "cannot hold"


#: Dimensions a damaged header may claim: small, powers of two (whose product can wrap
#: around 2**64) and the largest uint32.
_header_dims = st.one_of(
    st.integers(0, 6), st.integers(16, 31).map(lambda k: 2**k), st.just(2**32 - 1)
)
#: A header whose dimensions multiply to 2**64 (0 in int64 arithmetic), over no data.
WRAPPING_HEADER = bytes([0, 0, 0x08, 4]) + (2**16).to_bytes(4, "big") * 4
#: An empty array of a shape numpy cannot hold (a zero between two dimensions of 2**32 - 1).
UNHOLDABLE_HEADER = bytes([0, 0, 0x08, 3]) + b"\xff" * 4 + b"\0" * 4 + b"\xff" * 4


def _bad_deflate() -> bytes:
    """A gzip file whose deflate stream starts with an invalid block type (zlib.error)."""
    gz = bytearray(gzip.compress(bytes([0, 0, 0x08, 1, 0, 0, 0, 3, 1, 2, 3]), mtime=0))
    gz[10] |= 0b110  # BTYPE = 11: reserved
    return bytes(gz)


@st.composite
def _damaged(draw):
    raw = draw(_idx_files())[0]
    how = draw(
        st.sampled_from(
            ["truncate", "append", "header_byte", "new_header", "rank", "random", "gzip_damage"]
        )
    )
    if how == "truncate":
        raw = raw[: draw(st.integers(0, len(raw) - 1))]
    elif how == "append":
        raw = raw + draw(st.binary(min_size=1, max_size=8))
    elif how == "header_byte":
        i = draw(st.integers(0, min(len(raw), 8) - 1))
        raw = raw[:i] + bytes([draw(st.integers(0, 255))]) + raw[i + 1 :]
    elif how == "new_header":  # another type code / rank / shape over the same data
        old_head = 4 + 4 * raw[3]
        code = draw(st.one_of(st.sampled_from(sorted(IDX_TYPES)), st.integers(0, 255)))
        dims = draw(st.lists(_header_dims, min_size=0, max_size=5))
        ndim = draw(st.one_of(st.just(len(dims)), st.integers(0, 255)))
        head = bytes([0, 0, code, ndim]) + b"".join(d.to_bytes(4, "big") for d in dims)
        raw = head + (raw[old_head:] if draw(st.booleans()) else b"")
    elif how == "rank":  # the same data under another rank (0 to 6), sizes consistent
        old_head = 4 + 4 * raw[3]
        size = math.prod(int.from_bytes(raw[i : i + 4], "big") for i in range(4, old_head, 4))
        ndim = draw(st.integers(0, 6))
        dims = [size] + [1] * (ndim - 1) if ndim else []
        head = bytes([0, 0, raw[2], ndim]) + b"".join(d.to_bytes(4, "big") for d in dims)
        raw = head + raw[old_head:]
    elif how == "random":
        raw = draw(st.binary(max_size=40))
    if how == "gzip_damage" or draw(st.booleans()):
        gz = bytearray(gzip.compress(raw))
        if how == "gzip_damage":  # a changed byte in the deflate stream, or a cut
            if draw(st.booleans()):  # byte 10 starts the deflate stream: its block header
                i = draw(st.one_of(st.just(10), st.integers(10, len(gz) - 9)))
                gz[i] ^= draw(st.integers(1, 255))
            else:
                gz = gz[: draw(st.integers(1, len(gz) - 1))]
        raw = bytes(gz)
    return raw


@_settings(400)
@given(raw=_damaged())
@example(raw=WRAPPING_HEADER)
@example(raw=UNHOLDABLE_HEADER)
@example(raw=_bad_deflate())
def test_damaged_idx_files_are_refused_with_metaplastic_error(raw):
    """Truncated, extended, re-headed, random or damaged-gzip files: the reader returns
    exactly what a valid file holds, or refuses with one line of MetaplasticError naming
    the file and what is wrong with it (never a numpy, zlib or struct error)."""
    want, reason = _valid_idx(raw)
    try:
        got, _ = _read(raw, gz=False)
    except MetaplasticError as err:
        assert want is None, f"a valid file was refused: {err}"
        msg = str(err)
        assert "\n" not in msg and "x-idx-ubyte" in msg and reason in msg, (reason, msg)
        return
    assert want is not None, f"a damaged file was read as {got.shape} {got.dtype}"
    assert got.shape == want.shape and got.tobytes() == want.astype(got.dtype).tobytes()
