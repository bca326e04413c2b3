"""Reference set-up (Shervani-Tabar & Rosenbaum 2023, DESIGN.md 4.1) on Fashion-MNIST.

Usage: python scripts/reproduce_reference.py [--seed 0] [--episodes 600]
                                             [--eval-episodes 500] [--out results/reference]

Meta-trains three methods with the same budget on the `fashion_mnist_reference` task
(784-170-130-100-70-5, softplus beta=10, no biases, 5-way, K=50 online updates per class,
Q=10, Adam 1e-3, one episode per meta-step): FA with the learned pool {pseudo-gradient,
error-Hebbian, Oja} (`learned`), FA with only its learning rate learned (`fa`), and backprop
with only its learning rate learned (`backprop`). All start from theta_0 = 1e-3. Meta-training
draws from the training split; every method is tested on the same held-out episodes drawn
from the test split. Writes `table.md`, `meta_test.png`, `meta_accuracy.png`,
`coefficients.png` (the pool run's) and each method's run directory under --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import jax

from metaplastic._report import plot_curves, results_table
from metaplastic._run import discover, keep_failed

METHODS = (
    ("learned", "reference_pool", "fa"),
    ("fa", "reference_pseudo_gradient", "fa"),
    ("backprop", "reference_pseudo_gradient", "backprop"),
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--episodes", type=int, default=600)
    ap.add_argument("--eval-episodes", type=int, default=500)
    ap.add_argument("--out", type=Path, default=Path("results/reference"))
    args = ap.parse_args()
    table = {"seed": args.seed, "episodes": args.episodes, "eval_episodes": args.eval_episodes}
    summary = keep_failed(
        discover, args.out, table, task="fashion_mnist_reference", methods=METHODS
    )
    runs = {"learned": args.out}
    runs.update({k: args.out / "baselines" / k for k in ("fa", "backprop")})
    rows = {
        k: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        for k, d in runs.items()
    }
    plot_curves(
        rows,
        "query_accuracy",
        "query accuracy (meta-train episodes)",
        args.out / "meta_accuracy_all.png",
    )
    shutil.copy(args.out / "coefficients.png", args.out / "coefficients_learned.png")
    header = (
        f"Fashion-MNIST reference set-up, seed {args.seed}, {args.episodes} meta-training "
        f"episodes per method, {args.eval_episodes} held-out episodes from the test split "
        f"(Student-t 95% CIs). jax {jax.__version__}, {jax.devices()[0].platform}; "
        f"{summary['discover_s']:.0f} s in all.\n\n"
    )
    text = (
        header
        + results_table(summary["meta_test"])
        + (
            f"\n\nLearned rule: `{summary['rule_equation']}`\n"
            f"FA learning rate: {summary['baselines']['fa']['coefficients']}, backprop: "
            f"{summary['baselines']['backprop']['coefficients']}\n"
        )
    )
    (args.out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
