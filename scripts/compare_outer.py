"""Gradient vs evolution-strategy outer loops at an equal wall-clock budget (digits).

Usage: python scripts/compare_outer.py [--seed 0] [--strategies open_es cma_es]
                                       [--es-fitness loss error]
                                       [--out results/outer]

1. Meta-trains the pool rule under FA with the gradient outer loop (Adam, task defaults)
   and records its training wall time W (compilation excluded).
2. For each strategy and each ES fitness (meta-loss, error rate): times a few generations,
   then meta-trains for as many generations as fit in W (population 16, 8 episodes per
   generation shared by all members, sigma 0.01, Adam lr 3e-3 on the mean where the
   strategy uses an optimiser).
3. Meta-trains the FA baseline (learning rate only, gradient, task defaults).
All are tested on the same 500 held-out episodes; writes `table.md` and `meta_test.png`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import jax

from metaplastic.run import (
    build_config,
    build_rule,
    build_setup,
    keep_failed,
    make_trainer,
    plot_meta_test,
    results_table,
    train,
)

ES_SETTINGS = {"meta_batch": 8, "population": 16, "sigma": 0.01, "lr": 0.003}


def seconds_per_generation(cfg, n: int = 5) -> float:
    setup = build_setup(cfg)
    rule = build_rule(cfg, setup.net.n_layers)
    tr = make_trainer(cfg, setup, rule)
    state = tr.init(rule, jax.random.key(0))
    for _ in range(2):  # compile, and make sure no later step recompiles
        state, _ = tr.step(state)
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for _ in range(n):
        state, _ = tr.step(state)
    jax.block_until_ready(state)
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--strategies", nargs="+", default=["open_es", "cma_es"])
    ap.add_argument(
        "--es-fitness",
        nargs="+",
        default=["loss", "error"],
        help="ES fitness: meta-loss and/or query error rate (train.es_fitness)",
    )
    ap.add_argument("--out", type=Path, default=Path("results/outer"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    meta_test, budget = {}, {}
    grad_cfg = build_config("pool", "digits", {"seed": args.seed})
    s = keep_failed(train, grad_cfg, args.out / "adam", label="adam")
    wall = s["train"]["train_s"] - s["train"]["compile_s"]
    meta_test["pool, adam (gradient)"] = s["meta_test"]["adam"]
    budget["pool, adam (gradient)"] = (s["train"]["steps"], wall)
    for name in args.strategies:
        for fitness in args.es_fitness:
            over = [f"train.{k}={v}" for k, v in ES_SETTINGS.items()]
            over += [f"train.outer='{name}'", f"train.es_fitness='{fitness}'"]
            probe = build_config("pool", "digits", {"seed": args.seed}, over)
            gens = max(1, math.floor(wall / seconds_per_generation(probe)))
            cfg = build_config(
                "pool",
                "digits",
                {"seed": args.seed, "episodes": gens * ES_SETTINGS["meta_batch"]},
                over,
            )
            label = f"{name}-{fitness}"
            s = keep_failed(train, cfg, args.out / label, label=label)
            key = f"pool, {name} (ES, fitness = {fitness})"
            meta_test[key] = s["meta_test"][label]
            budget[key] = (gens, s["train"]["train_s"] - s["train"]["compile_s"])
    fa_cfg = build_config("pseudo_gradient", "digits", {"seed": args.seed})
    s = keep_failed(train, fa_cfg, args.out / "fa", label="fa")
    meta_test["FA baseline (lr only, gradient)"] = s["meta_test"]["fa"]
    budget["FA baseline (lr only, gradient)"] = (
        s["train"]["steps"],
        s["train"]["train_s"] - s["train"]["compile_s"],
    )
    lines = [
        results_table(meta_test),
        "",
        "| method | outer steps | training wall time |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {n} | {w:.0f} s |" for k, (n, w) in budget.items()]
    text = (
        f"5-way online digits under FA, seed {args.seed}; ES settings {ES_SETTINGS}.\n\n"
        + "\n".join(lines)
        + "\n"
    )
    (args.out / "table.md").write_text(text)
    (args.out / "budget.json").write_text(json.dumps(budget, indent=2) + "\n")
    plot_meta_test(meta_test, args.out, chance=0.2)
    print(text)


if __name__ == "__main__":
    main()
