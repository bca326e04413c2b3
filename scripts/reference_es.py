"""The reference set-up meta-trained by an evolution strategy on the error rate, several seeds.

Usage: python scripts/reference_es.py [--seeds 3] [--seed 0] [--generations 100]
           [--eval-episodes 500] [--reference results/reference]
           [--runs results/reference_es/runs] [--out results/reference_es]

Meta-trains the reference pool (FA, theta_0 = 1e-3, the ``fashion_mnist_reference`` preset)
with OpenAI-ES whose fitness is the query error rate (``train.es_fitness = "error"``, the
default): population 16, 8 episodes per generation shared by all members, sigma 0.003, Adam
3e-3 on the mean, the best mean on validation episodes every 20 generations kept. Each seed
is tested on the same held-out episodes as that seed's gradient run of
``reproduce_reference.py`` (same seed and count; run that script first) and compared with
its FA and backprop baselines, read from ``--reference/runs/seed-<s>/summary.json``.

Resumable (a finished seed is read back, an interrupted one continues from its checkpoint).
Writes ``--out``/``summary.json`` (per-seed accuracies, mean ± sd, gap closure, checks),
``table.md`` and ``meta_test.png``; run directories stay under ``--runs``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
from reproduce_reference import checks

from metaplastic import MetaplasticError
from metaplastic.run import (
    aggregate_seeds,
    build_config,
    keep_failed,
    plot_seeds,
    resume_run,
    seeds_table,
    train,
)

ES = {"outer": "'open_es'", "es_fitness": "'error'", "population": 16, "meta_batch": 8}


def fail(msg: str) -> None:
    """One line on stderr and exit code 2, as the CLI does for bad input."""
    print(f"reference_es: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def run_seed(run: Path, seed: int, args) -> dict:
    try:
        s = json.loads((run / "summary.json").read_text())
        if s.get("meta_test"):
            return s  # finished
    except (OSError, ValueError):
        pass
    if (run / "checkpoints").is_dir():
        return keep_failed(resume_run, run, progress=True)
    over = [f"train.{k}={v}" for k, v in ES.items()]
    over += [f"train.sigma={args.sigma}", f"train.lr={args.lr}"]
    cfg = build_config(
        "reference_pool",
        "fashion_mnist_reference",
        {
            "seed": seed,
            "feedback": "fa",
            "episodes": args.generations * ES["meta_batch"],
            "eval_episodes": args.eval_episodes,
        },
        over,
    )
    return keep_failed(train, cfg, run, label="learned")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--generations", type=int, default=100)
    ap.add_argument("--eval-episodes", type=int, default=500)
    ap.add_argument("--sigma", type=float, default=0.003)
    ap.add_argument("--lr", type=float, default=0.003)
    ap.add_argument("--reference", type=Path, default=Path("results/reference"))
    ap.add_argument("--runs", type=Path, default=Path("results/reference_es/runs"))
    ap.add_argument("--out", type=Path, default=Path("results/reference_es"))
    args = ap.parse_args()
    if args.seeds < 1:
        fail(f"--seeds must be at least 1, got {args.seeds}")
    seeds = list(range(args.seed, args.seed + args.seeds))
    refs = {}
    for s in seeds:
        f = args.reference / "runs" / f"seed-{s}" / "summary.json"
        try:
            refs[s] = json.loads(f.read_text())["meta_test"]
        except (OSError, ValueError, KeyError):
            fail(f"{f}: missing or unreadable; run scripts/reproduce_reference.py first")
        if refs[s].get("learned", {}).get("episodes") != args.eval_episodes:
            fail(f"{f}: tested on another number of episodes than --eval-episodes")
    summaries, failed = {}, {}
    try:
        for s in seeds:
            es = run_seed(args.runs / f"seed-{s}", s, args)
            if es.get("status", "ok") != "ok":
                failed[s] = es["status"]
            meta_test = {"learned": es.get("meta_test", {}).get("learned")}
            meta_test["gradient"] = refs[s]["learned"]
            meta_test.update({k: refs[s][k] for k in ("fa", "backprop") if k in refs[s]})
            summaries[s] = dict(es, meta_test={k: v for k, v in meta_test.items() if v})
    except MetaplasticError as err:
        fail(str(err))
    agg = aggregate_seeds(args.runs, seeds, summaries, failed)
    agg["checks"] = checks(agg)
    agg["rules"] = {str(s): summaries[s].get("rule_equation") for s in seeds}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(agg, indent=2) + "\n")
    plot_seeds(agg, args.out / "meta_test.png", chance=0.2, title="reference set-up, OpenAI-ES")
    c = agg["checks"]
    text = (
        f"Fashion-MNIST reference set-up: `learned` = pool by OpenAI-ES (error-rate fitness, "
        f"{args.generations} generations x 16 members x 8 episodes, sigma {args.sigma}, lr "
        f"{args.lr}), `gradient` = the same pool by the gradient outer loop, `fa`/`backprop` "
        f"= that run's baselines; seeds {seeds[0]}..{seeds[-1]}, {args.eval_episodes} "
        f"held-out test-split episodes per seed, the same for every method of a seed. jax "
        f"{jax.__version__}.\n\n"
        + seeds_table(agg)
        + "\n\nES rules:\n"
        + "".join(f"- seed {s}: `{agg['rules'][str(s)]}`\n" for s in seeds)
        + f"\nES learned − FA per seed: {[_r(m) for m in c['learned_minus_fa']]}; ≥ 0.15 in "
        f"every seed: {c['learned_beats_fa_by_15_points_every_seed']}; mean gap closure ≥ "
        f"0.75: {c['mean_gap_closure_at_least_75pct']}\n"
    )
    (args.out / "table.md").write_text(text)
    print(text)
    if failed:
        print(f"reference_es: failed seeds: {agg['status']}", file=sys.stderr)
        raise SystemExit(1)


def _r(v):
    return None if v is None else round(v, 3)


if __name__ == "__main__":
    main()
