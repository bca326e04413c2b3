"""The reference set-up (DESIGN.md 4.1) meta-trained by an evolution strategy on accuracy.

Usage: python scripts/reference_es.py [--seed 0] [--generations 100] [--eval-episodes 500]
                                      [--reference results/reference] [--out results/reference_es]

With the gradient outer loop, the 3-term pool on the full-size Fashion-MNIST reference set-up
collapses into a rule that makes every output uniform (query loss ln 5, chance accuracy; see
``scripts/reproduce_reference.py``): cross-entropy rewards that hedge. This script meta-trains
the same pool rule (FA, theta_0 = 1e-3) with OpenAI-ES whose fitness is the query **error
rate** (``train.es_fitness = "error"``), which does not reward hedging: population 16, 8
episodes per generation shared by all members, sigma 0.003, Adam 3e-3 on the mean.

It tests the result on the same held-out episodes (test-split images, same seed and count) as
``reproduce_reference.py`` and puts it next to that run's three methods, read from
``--reference/summary.json`` (run that script first). Writes ``table.md`` and the run
directory under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax

from metaplastic._config import build_config
from metaplastic._errors import MetaplasticError
from metaplastic._report import results_table
from metaplastic._run import keep_failed, train

ES = {"outer": "'open_es'", "es_fitness": "'error'", "population": 16, "meta_batch": 8}


def fail(msg: str) -> None:
    """One line on stderr and exit code 2, as the CLI does for bad input."""
    print(f"reference_es: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--generations", type=int, default=100)
    ap.add_argument("--eval-episodes", type=int, default=500)
    ap.add_argument("--sigma", type=float, default=0.003)
    ap.add_argument("--lr", type=float, default=0.003)
    ap.add_argument("--reference", type=Path, default=Path("results/reference"))
    ap.add_argument("--out", type=Path, default=Path("results/reference_es"))
    args = ap.parse_args()
    ref_file = args.reference / "summary.json"
    if not ref_file.exists():
        fail(
            f"{ref_file} not found; run scripts/reproduce_reference.py first (or give --reference)"
        )
    ref = json.loads(ref_file.read_text())
    over = [f"train.{k}={v}" for k, v in ES.items()]
    over += [f"train.sigma={args.sigma}", f"train.lr={args.lr}"]
    cfg = build_config(
        "reference_pool",
        "fashion_mnist_reference",
        {
            "seed": args.seed,
            "feedback": "fa",
            "episodes": args.generations * ES["meta_batch"],
            "eval_episodes": args.eval_episodes,
        },
        over,
    )
    try:
        s = keep_failed(train, cfg, args.out, label="FA + pool (OpenAI-ES, error fitness)")
    except MetaplasticError as err:
        fail(str(err))
    meta_test = {
        "FA + learned pool (gradient, reproduce_reference.py)": ref["meta_test"]["learned"],
        "FA + learned pool (OpenAI-ES, error fitness)": next(iter(s["meta_test"].values())),
        "FA (learning rate learned)": ref["meta_test"]["fa"],
        "backprop (learning rate learned)": ref["meta_test"]["backprop"],
    }
    text = (
        f"Fashion-MNIST reference set-up, seed {args.seed}; OpenAI-ES {args.generations} "
        f"generations x 16 members x 8 episodes (sigma {args.sigma}, lr {args.lr}), "
        f"{args.eval_episodes} held-out episodes from the test split, the same as "
        f"{args.reference}'s (Student-t 95% CIs). jax {jax.__version__}; ES training "
        f"{s['train']['train_s']:.0f} s.\n\n"
        + results_table(meta_test)
        + f"\n\nES rule: `{s['rule_equation']}`\n"
    )
    (args.out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
