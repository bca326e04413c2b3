"""Score pure Oja rules next to a pca run's learned Taylor rule, on the same episodes.

For a finished ``--task pca`` run of the Taylor rule this evaluates, on the run's validation
episodes (the split that pruning by effect uses), ``1 - meta-loss`` of

* the learned rule (every coefficient), and
* Oja's pair alone, ``dW = eta (x y - r W y^2)``, over a grid of rates
  ``eta = f * theta_learned(x y)`` and decay ratios ``r``,

and writes ``oja_rate_scan.json`` into the run directory (``--out`` to write elsewhere).
It answers: is a term that pruning keeps really needed, or is the pair alone, with its rate
refitted, as good?

    python scripts/oja_rate_scan.py RUN_DIR [--episodes 200] [--factors F ...] [--ratios R ...]

``--ratios`` with a fine grid of ``--factors`` gives the best score for each ratio at its
own best rate (``best_per_ratio``): is Oja's ratio 1 really worse there than the learned one?
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from metaplastic import MetaplasticError
from metaplastic.export import coefficient_getter, read_rule_file
from metaplastic.run import build_setup, read_run_config, validation_key
from metaplastic.tasks import evaluate_rule

FACTORS = (0.5, 0.7, 0.85, 1.0, 1.2, 1.5, 2.0, 3.0)
RATIOS = (0.8, 0.9, 1.0, 1.1, 1.2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--episodes", type=int, default=200)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--factors",
        type=float,
        nargs="+",
        default=FACTORS,
        help="rates, as factors of the learned theta(x y)",
    )
    ap.add_argument(
        "--ratios", type=float, nargs="+", default=RATIOS, help="decay ratios r to scan"
    )
    args = ap.parse_args()
    try:
        cfg, _ = read_run_config(args.run)
        rule = read_rule_file(args.run)
        if cfg.task.kind != "pca" or cfg.rule.kind != "taylor":
            raise MetaplasticError(f"{args.run}: not a Taylor-rule run on a pca task")
    except MetaplasticError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    setup = build_setup(cfg)
    problem = setup.problem(cfg, "val")
    key = validation_key(cfg)
    where = coefficient_getter(rule)
    names = list(rule.coefficients())
    theta = np.asarray(where(rule), np.float32)

    def score(th) -> float:
        r = eqx.tree_at(where, rule, jnp.asarray(th, jnp.float32))
        s = evaluate_rule(problem, r, key, args.episodes, metric="score")
        return float(np.mean(np.where(np.isfinite(s), s, -1.0)))

    ix, iw = names.index("x*y"), names.index("W*y**2")
    eta0 = float(theta[ix])
    learned = score(theta)
    scan = []
    for f in args.factors:
        for r in args.ratios:
            th = np.zeros_like(theta)
            th[ix], th[iw] = f * eta0, -r * f * eta0
            scan.append({"rate_factor": f, "ratio": r, "eta": f * eta0, "score": score(th)})
    best = max(scan, key=lambda d: d["score"])
    best_per_ratio = [
        max((d for d in scan if d["ratio"] == r), key=lambda d: d["score"]) for r in args.ratios
    ]
    kept = {n: float(v) for n, v in zip(names, theta) if abs(v) > 1e-4}
    result = {
        "run": str(args.run),
        "episodes": args.episodes,
        "learned": {"score": learned, "coefficients_above_1e-4": kept},
        "best_oja": best,
        "best_per_ratio": best_per_ratio,
        "scan": scan,
    }
    out = args.out or args.run / "oja_rate_scan.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    for d in best_per_ratio:
        print(f"ratio {d['ratio']:g}: best score {d['score']:.4f} at eta = {d['eta']:.4g}")
    print(
        f"learned rule: {learned:.4f}; best Oja pair: {best['score']:.4f} at "
        f"eta = {best['rate_factor']:g} x theta(x y) = {best['eta']:.4g}, ratio {best['ratio']:g}"
    )


if __name__ == "__main__":
    main()
