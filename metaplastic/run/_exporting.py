"""Export and distillation of a run: the application layer around :mod:`metaplastic.export`.

:func:`export_run` prunes a run's rule (by magnitude; by effect on validation episodes,
optionally refitting the kept coefficients with the run's gradient outer loop), formats it
and checks the round trip on meta-test episodes; :func:`distill_run` fits a sparse Taylor
polynomial to a run's rule and compares both on meta-test episodes. Both write their record
(``export.json``, ``distilled.json``) into the run directory.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._errors import MetaplasticError, unknown_name
from ..export._distill import METHODS, distill
from ..export._export import (
    FORMATS,
    coefficient_getter,
    equation_rule_from_export,
    exported_texts,
    format_rule,
    prune_by_effect,
    rule_expression,
    rule_to_json,
)
from ..rules._rules import AbstractRule
from ..tasks._problem import evaluate_rule
from ._report import results_table
from ._run import build_setup, evaluate_run, make_trainer, validation_key


def _refitter(cfg, setup, steps: int):
    """``refit(rule, keep)`` for :func:`prune_by_effect`: ``steps`` meta-steps of the run's
    gradient outer loop (its units, lr schedule over these steps, L1, meta-batch) on
    meta-train episodes, with the coefficients where ``keep`` is False frozen at 0."""

    t = dataclasses.replace(cfg.train, episodes=steps * cfg.train.meta_batch)
    refit_cfg = dataclasses.replace(cfg, train=t)
    key = jax.random.fold_in(jax.random.key(cfg.train.seed), 2**23)

    def refit(rule: AbstractRule, keep: np.ndarray) -> AbstractRule:
        where = coefficient_getter(rule)
        params, _ = eqx.partition(rule, eqx.is_inexact_array)
        trainable = jax.tree_util.tree_map(jnp.zeros_like, params)
        trainable = eqx.tree_at(where, trainable, jnp.asarray(keep, jnp.float32))
        trainer = make_trainer(refit_cfg, setup, rule, trainable=trainable)
        state = trainer.init(rule, key)
        for _ in range(steps):
            state, _aux = trainer.step(state)
        return jax.tree_util.tree_map(np.asarray, trainer.rule(state))

    return refit


def export_run(
    run_dir: Path,
    cfg,
    rule: AbstractRule,
    fmt: str,
    threshold: float,
    *,
    prune_effect: float | None = None,
    prune_episodes: int = 200,
    prune_refit: int = 0,
    check: bool = True,
    check_episodes: int | None = None,
) -> tuple[str, str]:
    """Prune (by magnitude, optionally by effect), format, and check the round trip.

    The round trip parses the exported equation text back into a rule
    (:func:`equation_rule_from_export`) and evaluates it on the run's meta-test episodes
    next to the learned parameters. Writes ``export.json`` in ``run_dir``. Returns the
    formatted rule and a report (empty when there is nothing to report).
    """

    if fmt not in FORMATS:
        raise unknown_name("format", fmt, FORMATS, "--format")
    setup = None
    record: dict[str, Any] = {"threshold": threshold, "prune_effect": prune_effect}
    exported = rule
    if prune_effect is not None:
        setup = build_setup(cfg)
        problem = setup.problem(cfg, "val")
        key = validation_key(cfg)

        def accuracy(r):
            scores = evaluate_rule(problem, r, key, prune_episodes, metric="score")
            return float(np.mean(np.where(np.isfinite(scores), scores, -1.0)))

        refit = _refitter(cfg, setup, prune_refit) if prune_refit > 0 else None
        exported, steps = prune_by_effect(rule, accuracy, prune_effect, refit=refit)
        record["prune_by_effect"] = {
            "episodes": prune_episodes,
            "refit_steps": prune_refit,
            "steps": steps,
        }
    text = format_rule(exported, fmt, threshold)
    record["equations"] = exported_texts(exported, threshold)
    record["coefficients"] = {
        k: v for k, v in exported.coefficients().items() if abs(v) > threshold
    }
    report = ""
    if check:
        setup = setup or build_setup(cfg)
        eq_rule = equation_rule_from_export(exported, threshold)
        res = {
            "learned": evaluate_run(cfg, rule, setup, episodes=check_episodes),
            "exported equation": evaluate_run(cfg, eq_rule, setup, episodes=check_episodes),
        }
        gap = res["exported equation"]["accuracy"] - res["learned"]["accuracy"]
        record["round_trip"] = dict(res, difference=gap)
        report = (
            results_table(res)
            + f"\nround trip: the exported equation scores {gap:+.4f} against the learned "
            "parameters on the same held-out episodes"
        )
    (run_dir / "export.json").write_text(json.dumps(record, indent=2) + "\n")
    return text, report


def distill_run(
    run_dir: Path,
    cfg,
    rule: AbstractRule,
    *,
    episodes: int = 20,
    samples: int = 20000,
    method: str = "stlsq",
    alpha: float | None = None,
    check_episodes: int | None = None,
) -> dict[str, Any]:
    """Distil a run's rule, evaluate both on held-out episodes, write ``distilled.json``."""

    if cfg.task.kind != "classification":
        raise MetaplasticError("distill samples signals from classification tasks only")
    if method not in METHODS:
        raise unknown_name("distillation method", method, METHODS, "--method")
    setup = build_setup(cfg)
    problem = setup.problem(cfg, "val")
    poly, info = distill(problem, rule, validation_key(cfg), episodes, samples, method, alpha)
    res = {
        "learned": evaluate_run(cfg, rule, setup, episodes=check_episodes),
        "distilled polynomial": evaluate_run(cfg, poly, setup, episodes=check_episodes),
    }
    data = rule_to_json(poly, 0.0)
    data["distillation"] = dict(
        info,
        meta_test=res,
        difference=res["distilled polynomial"]["accuracy"] - res["learned"]["accuracy"],
    )
    (run_dir / "distilled.json").write_text(json.dumps(data, indent=2) + "\n")
    eq = "dW = " + str(rule_expression(poly, 0.0))
    return dict(info, equation=eq, table=results_table(res), meta_test=res)
