"""Drive meta-training and evaluation; write the run directory."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
import tomli_w

from ._config import RunConfig
from ._data import ImagePool, load_dataset, split_pools
from ._errors import MetaplasticError
from ._export import write_rule_files
from ._meta import Problem, evaluate_rule, mean_ci95
from ._network import Network
from ._report import plot_training
from ._rules import TermPoolRule
from ._tasks import ClassificationTask
from .outer import GradientTrainer, make_optimizer

#: Stop a run whose first this-many meta-steps all had non-finite meta-gradients.
ALL_DIVERGED_PATIENCE = 20


@dataclass
class Setup:
    """The objects a config resolves to."""

    net: Network
    task: ClassificationTask
    meta_train: ImagePool
    meta_test: ImagePool

    def problem(self, cfg: RunConfig, pool: str = "train") -> Problem:
        return Problem(
            net=self.net,
            feedback=cfg.train.feedback,
            task=self.task,
            pool=self.meta_train if pool == "train" else self.meta_test,
            remat=cfg.train.remat,
        )


_DATA_CACHE: dict[str, Any] = {}


def build_setup(cfg: RunConfig) -> Setup:
    key = cfg.task.dataset
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = load_dataset(key)
    ds = _DATA_CACHE[key]
    meta_train, meta_test = split_pools(ds, cfg.task.test_fraction, cfg.task.split_seed)
    task = ClassificationTask(cfg.task.n_way, cfg.task.k_shot, cfg.task.q_query)
    task.check(meta_train, f"task {cfg.task.name} (meta-train split)")
    task.check(meta_test, f"task {cfg.task.name} (meta-test split)")
    net = Network(
        sizes=(ds.dim, *cfg.network.hidden, cfg.task.n_way),
        beta=cfg.network.beta,
        bias=cfg.network.bias,
        activation=cfg.network.activation,
    )
    return Setup(net, task, meta_train, meta_test)


def build_rule(cfg: RunConfig, n_layers: int) -> TermPoolRule:
    r = cfg.rule
    init = list(r.init) if r.init else [0.0] * len(r.terms)
    mask = list(r.mask) if r.mask else None
    return TermPoolRule.from_names(r.terms, init, mask, None if r.shared else n_layers)


def eval_key(cfg: RunConfig) -> jax.Array:
    """Meta-test episodes depend only on the seed, so methods are compared on the same ones."""
    return jax.random.fold_in(jax.random.key(cfg.train.seed), 2**20)


def _to_float(x) -> float | None:
    v = float(x)
    return v if np.isfinite(v) else None


def train(
    cfg: RunConfig,
    out: Path,
    *,
    progress: bool = True,
    label: str = "learned",
    evaluate: bool = True,
) -> dict[str, Any]:
    """Meta-train ``cfg``'s rule, evaluate it on held-out episodes, write ``out``.

    Returns the summary dict (also written to ``out/summary.json``).
    """
    from tqdm.auto import tqdm

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.toml").write_text(tomli_w.dumps(cfg.to_dict()))
    setup = build_setup(cfg)
    rule = build_rule(cfg, setup.net.n_layers)
    t = cfg.train
    trainer = GradientTrainer(
        setup.problem(cfg, "train"),
        rule,
        make_optimizer(t.outer, t.lr, t.clip),
        meta_batch=t.meta_batch,
        l1=t.l1,
        mode=t.gradient,
    )
    state = trainer.init(rule, jax.random.key(t.seed))
    n_steps = t.episodes // t.meta_batch
    metrics: list[dict] = []
    t0 = time.perf_counter()
    compile_s = None
    bar = tqdm(total=n_steps, desc=f"meta-train {label}", disable=not progress, unit="step")
    with open(out / "metrics.jsonl", "w") as log:
        for i in range(n_steps):
            state, aux = trainer.step(state)
            if compile_s is None:
                jax.block_until_ready(state)
                compile_s = time.perf_counter() - t0
            step = i + 1
            if step % t.log_every == 0 or step == n_steps:
                row = {
                    "step": step,
                    "episodes": step * t.meta_batch,
                    "loss": _to_float(aux["loss"]),
                    "query_loss": _to_float(aux["query_loss"]),
                    "query_accuracy": _to_float(aux["query_accuracy"]),
                    "diverged_episodes": int(aux["diverged"]),
                    "grad_finite": bool(aux["grad_finite"]),
                    "skipped_total": int(state.skipped),
                    "coefficients": trainer.rule(state).coefficients(),
                    "time_s": round(time.perf_counter() - t0, 3),
                }
                metrics.append(row)
                log.write(json.dumps(row) + "\n")
                log.flush()
                bar.set_postfix(loss=row["loss"], acc=row["query_accuracy"], refresh=False)
            bar.update(1)
            if step == ALL_DIVERGED_PATIENCE and int(state.skipped) == step:
                bar.close()
                raise MetaplasticError(
                    f"every one of the first {step} meta-steps had a non-finite meta-gradient "
                    "(the rule diverges); lower the rule's init coefficients or train.lr "
                    f"(metrics so far are in {out / 'metrics.jsonl'})"
                )
    bar.close()
    train_s = time.perf_counter() - t0
    learned = trainer.rule(state)
    rule_data = write_rule_files(out, learned, t.prune_threshold)
    plot_training(metrics, out, title=f"{label}: {cfg.rule.name} on {cfg.task.name}")
    summary: dict[str, Any] = {
        "rule_equation": rule_data["equation"],
        "rule_latex": rule_data["latex"],
        "coefficients": learned.coefficients(),
        "meta_test": {},
        "train": {
            "steps": n_steps,
            "episodes": n_steps * t.meta_batch,
            "meta_batch": t.meta_batch,
            "gradient_mode": trainer.mode,
            "skipped_steps": int(state.skipped),
            "compile_s": round(compile_s or 0.0, 2),
            "train_s": round(train_s, 2),
            "seed": t.seed,
            "feedback": t.feedback,
        },
    }
    if evaluate:
        summary["meta_test"][label] = evaluate_run(cfg, learned, setup)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def evaluate_run(
    cfg: RunConfig, rule, setup: Setup | None = None, episodes: int | None = None
) -> dict[str, Any]:
    """Held-out accuracy of ``rule``: mean, 95% CI, on meta-test images."""
    setup = setup or build_setup(cfg)
    n = episodes or cfg.train.eval_episodes
    accs = evaluate_rule(setup.problem(cfg, "test"), rule, eval_key(cfg), n)
    m, lo, hi = mean_ci95(accs)
    return {"accuracy": m, "ci95": [lo, hi], "episodes": int(n)}


DISCOVER_TASK = "digits"
#: (label, rule preset, feedback) of the methods ``discover`` meta-trains and compares.
DISCOVER_METHODS = (
    ("learned", "pool", "fa"),
    ("fa", "pseudo_gradient", "fa"),
    ("backprop", "pseudo_gradient", "backprop"),
)


def discover(
    out: Path, train_table: dict[str, Any], *, progress: bool = True, task: str = DISCOVER_TASK
) -> dict[str, Any]:
    """Meta-train the pool rule under FA and the two baselines with the same budget.

    The learned rule's run is ``out``; the baselines' runs are ``out/baselines/{fa,backprop}``.
    All three are evaluated on the same held-out episodes. Writes ``summary.json`` (with
    ``meta_test`` for ``learned``, ``fa`` and ``backprop``), ``results.md`` and
    ``meta_test.png`` in ``out``.
    """
    from ._config import build_config
    from ._report import plot_meta_test, results_table

    t0 = time.perf_counter()
    summaries = {}
    for label, rule, feedback in DISCOVER_METHODS:
        cfg = build_config(rule, task, dict(train_table, feedback=feedback))
        run_dir = out if label == "learned" else out / "baselines" / label
        summaries[label] = train(cfg, run_dir, progress=progress, label=label)
    summary = summaries["learned"]
    summary["meta_test"] = {k: s["meta_test"][k] for k, s in summaries.items()}
    summary["baselines"] = {
        k: {"coefficients": s["coefficients"], "run_dir": str(out / "baselines" / k)}
        for k, s in summaries.items()
        if k != "learned"
    }
    summary["discover_s"] = round(time.perf_counter() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "results.md").write_text(results_table(summary["meta_test"]) + "\n")
    plot_meta_test(summary["meta_test"], out, chance=1.0 / cfg.task.n_way)
    return summary
