"""Reference set-up (Shervani-Tabar & Rosenbaum 2023) on Fashion-MNIST, several seeds.

Usage: python scripts/reproduce_reference.py [--seeds 3] [--seed 0] [--eval-episodes 500]
           [--runs results/reference/runs] [--out results/reference] [--set SECTION.KEY=VALUE]

For each meta-training seed, ``metaplastic discover --rule reference_pool --task
fashion_mnist_reference`` meta-trains three methods by gradient with the same budget (the
``fashion_mnist_reference`` preset: 784-170-130-100-70-47 softplus net, 5-way, 250 online
updates per episode, Adam 1e-3, meta-batch 8, 200 meta-steps, the rule kept is the best on
validation episodes every 20 meta-steps): FA with the learned pool {pseudo-gradient,
error-Hebbian, Oja} (``learned``), FA with only its learning rate learned (``fa``) and
backprop with only its learning rate learned (``backprop``), all from theta_0 = 1e-3.
Meta-training uses training-split images, selection validation images, and each seed's three
methods are tested on the same held-out test-split episodes.

Resumable: a finished seed is read back, an interrupted one continues from its checkpoints.
Writes ``--out``/``summary.json`` (per-seed accuracies, mean ± sd, CIs, gap closure, sign
agreement, the acceptance checks), ``table.md`` and ``meta_test.png``; the run directories
(checkpoints, per-step metrics) stay under ``--runs`` (not committed).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax

from metaplastic import MetaplasticError
from metaplastic.run import (
    aggregate_seeds,
    discover,
    finished_summary,
    keep_failed,
    plot_seeds,
    seeds_table,
)

TASK, RULE = "fashion_mnist_reference", "reference_pool"
#: the trust issue's acceptance: learned >= FA + MARGIN in every seed, mean gap closure
MARGIN, CLOSURE = 0.15, 0.75


def fail(msg: str) -> None:
    print(f"reproduce_reference: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def run_seed(run_dir: Path, seed: int, args) -> dict:
    table = {"seed": seed, "eval_episodes": args.eval_episodes}
    if all(finished_summary(d, k) for d, k in _dirs(run_dir)):
        return json.loads((run_dir / "summary.json").read_text())
    resume = (run_dir / "discover.json").is_file()
    return keep_failed(
        discover, run_dir, table, task=TASK, rule=RULE, overrides=args.set, resume=resume
    )


def _dirs(run_dir: Path):
    return [(run_dir, "learned")] + [(run_dir / "baselines" / k, k) for k in ("fa", "backprop")]


def checks(agg: dict) -> dict:
    t = agg["test"]
    margins = [
        None if a is None or f is None else a - f
        for a, f in zip(t["learned"], t["fa"], strict=True)
    ]
    closure = agg.get("gap_closure_stats", {}).get("mean")
    return {
        "learned_minus_fa": margins,
        "learned_beats_fa_by_15_points_every_seed": all(
            m is not None and m >= MARGIN for m in margins
        ),
        "mean_gap_closure": closure,
        "mean_gap_closure_at_least_75pct": closure is not None and closure >= CLOSURE,
    }


def _r(v):
    return None if v is None else round(v, 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-episodes", type=int, default=500)
    ap.add_argument("--runs", type=Path, default=Path("results/reference/runs"))
    ap.add_argument("--out", type=Path, default=Path("results/reference"))
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = ap.parse_args()
    if args.seeds < 1:
        fail(f"--seeds must be at least 1, got {args.seeds}")
    seeds = list(range(args.seed, args.seed + args.seeds))
    summaries, failed = {}, {}
    try:
        for s in seeds:
            summaries[s] = run_seed(args.runs / f"seed-{s}", s, args)
            if summaries[s].get("status", "ok") != "ok":
                failed[s] = summaries[s]["status"]
    except MetaplasticError as err:
        fail(str(err))
    agg = aggregate_seeds(args.runs, seeds, summaries, failed)
    agg["checks"] = checks(agg)
    agg["rules"] = {str(s): summaries[s].get("rule_equation") for s in seeds}
    agg["selected_steps"] = {
        str(s): summaries[s].get("train", {}).get("selected_step") for s in seeds
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(agg, indent=2) + "\n")
    plot_seeds(agg, args.out / "meta_test.png", chance=0.2, title="Fashion-MNIST reference set-up")
    c = agg["checks"]
    text = (
        f"Fashion-MNIST reference set-up, gradient outer loop, seeds {seeds[0]}..{seeds[-1]}, "
        f"{args.eval_episodes} held-out test-split episodes per seed. jax {jax.__version__}, "
        f"{jax.devices()[0].platform}.\n\n"
        + seeds_table(agg)
        + "\n\nLearned rules:\n"
        + "".join(f"- seed {s}: `{agg['rules'][str(s)]}`\n" for s in seeds)
        + f"\nlearned − FA per seed: {[_r(m) for m in c['learned_minus_fa']]}"
        + f"; ≥ {MARGIN} in every seed: {c['learned_beats_fa_by_15_points_every_seed']}; "
        + f"mean gap closure ≥ {CLOSURE}: {c['mean_gap_closure_at_least_75pct']}\n"
    )
    (args.out / "table.md").write_text(text)
    print(text)
    if failed:
        print(f"reproduce_reference: failed seeds: {agg['status']}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
