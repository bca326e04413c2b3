"""How well ``train.gradient = "reconstruct"`` rebuilds the inner loop's weights backwards at
the reference size: the drift monitor (``episode_reconstruction_drift``) for the reference
pool at several coefficient vectors, without anchors and with anchors every 16 (sqrt(T), the
default), 4 and 1 steps.

    python scripts/reconstruct_drift.py [--json results/bench/reconstruct_drift.json]

A drift of about 1e-6 is float32 rounding. Terms that contract the weights (Oja's
``-eta y y^T W``) have inverses that expand them, so rounding errors grow exponentially over
the steps between anchors; a drift of order one or NaN means the reconstruction is not usable
at that spacing, and closer anchors (or ``checkpoint`` mode) are the fallback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from metaplastic.inner import episode_reconstruction_drift, run_episode
from metaplastic.rules import TermPoolRule
from metaplastic.run import bench_trainer

TERMS = ["pseudo_gradient", "error_hebbian", "oja"]
#: no anchors, sqrt(T) = 16 steps between anchors (the default), 4, every step
REMATS = ("reconstruct:0", "reconstruct", "reconstruct:4", "reconstruct:1")
COEFFS = [
    [1e-3, 0.0, 0.0],  # the reference initialisation
    [1e-3, 1e-3, 0.0],
    [1e-3, 0.0, 1e-4],
    [1e-3, 1e-3, 1e-3],
    [1e-2, 1e-3, 1e-2],
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, default=Path("results/bench/reconstruct_drift.json"))
    ap.add_argument("--episodes", type=int, default=3, help="episodes per rule (default 3)")
    args = ap.parse_args(argv)
    _, _, _, tr = bench_trainer("reference_pool", "fashion_mnist_reference", "forward")
    pr = tr.problem
    keys = jax.random.split(jax.random.key(0), args.episodes)
    eps = [pr.task.sample(jax.random.fold_in(k, 1), pr.pool) for k in keys]
    rows = []
    for remat in REMATS:
        f = jax.jit(
            lambda r, k, e, remat=remat: episode_reconstruction_drift(
                r, pr.net, pr.feedback, k, e, remat=remat
            )
        )
        for th in COEFFS:
            rule = TermPoolRule.from_names(TERMS, th)
            drift = [float(f(rule, k, e)) for k, e in zip(keys, eps, strict=True)]
            div = [
                bool(run_episode(rule, pr.net, pr.feedback, k, e).diverged)
                for k, e in zip(keys, eps, strict=True)
            ]
            rows.append({"remat": remat, "coefficients": th, "drift": drift, "diverged": div})
            print(f"{remat:14s} {th}: drift {drift} diverged {div}", flush=True)
    out = {
        "command": "python scripts/reconstruct_drift.py " + " ".join(argv or sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "terms": TERMS,
        "task": "fashion_mnist_reference",
        "unroll_steps": int(eps[0].train_x.shape[0]),
        "network": list(pr.net.sizes),
        "dtype": str(jnp.zeros(()).dtype),
        "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
