"""Fixed rules in EI (Dale's law) networks against the MLP, for every credit pathway.

Usage: python scripts/ei_networks.py [--episodes 200] [--out results/networks]

On the ``digits`` preset (5-way, 20 training images per class presented once online,
64-50-40-30-20-10 network) and its validation split, evaluates fixed (not meta-learned) rules
in four networks: the MLP (``network.kind = "mlp"``), the EI network with plain EI layers
(``ei``), with I-Norm hidden layers (``ei_inorm``) and with I-Norm plus GradNorm on the
hidden errors (``ei_inorm_gradnorm``). Rules: the pseudo-gradient rule ``dW = -eta e x^T``
at ``eta`` in {0.003, 0.01, 0.03} (0.03 is the pool preset's start), under each credit
pathway (backprop, fa, dfa, sign_symmetric, predictive_coding). Reports the mean query
accuracy (a diverged episode scores 0) with its 95% CI and the fraction of diverged
episodes. Writes ``ei_networks.json`` and ``ei_networks.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import numpy as np

from metaplastic.run import build_config, build_rule, build_setup
from metaplastic.tasks import evaluate_outcomes, mean_ci95

NETWORKS = {
    "mlp": [],
    "ei": ["network.kind=ei"],
    "ei_inorm": ["network.kind=ei", "network.norm=inorm"],
    "ei_inorm_gradnorm": ["network.kind=ei", "network.norm=inorm", "network.error_norm=gradnorm"],
}
PATHWAYS = ("backprop", "fa", "dfa", "sign_symmetric", "predictive_coding")
RATES = (0.003, 0.01, 0.03)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--episodes", type=int, default=200)
    ap.add_argument("--out", type=Path, default=Path("results/networks"))
    args = ap.parse_args()
    if args.episodes < 2:
        print("ei_networks: error: --episodes must be at least 2", file=sys.stderr)
        raise SystemExit(2)
    rows = []
    for net_name, sets in NETWORKS.items():
        for pathway in PATHWAYS:
            for rate in RATES:
                cfg = build_config(
                    "pool",
                    "digits",
                    {"feedback": pathway},
                    [*sets, f"rule.init=[{rate},0,0]"],
                )
                setup = build_setup(cfg)
                rule = build_rule(cfg, setup.net.n_layers)
                acc, bad = evaluate_outcomes(
                    setup.problem(cfg, "val"), rule, jax.random.key(1), args.episodes
                )
                m, lo, hi = mean_ci95(acc)
                rows.append(
                    {
                        "network": net_name,
                        "feedback": pathway,
                        "eta": rate,
                        "accuracy": m,
                        "ci95": [lo, hi],
                        "diverged": float(np.mean(bad)),
                    }
                )
                print(
                    f"{net_name:18s} {pathway:18s} eta={rate:<6} acc={m:.3f} "
                    f"div={np.mean(bad):.2f}",
                    flush=True,
                )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ei_networks.json").write_text(
        json.dumps(
            {"episodes": args.episodes, "task": "digits (validation split)", "rows": rows}, indent=2
        )
        + "\n"
    )
    lines = [
        f"Fixed pseudo-gradient rules `dW = -eta e x^T`, digits preset, {args.episodes} "
        "validation episodes (5-way on 10 output units, so a network that learns nothing "
        "can score below 1/5); accuracy mean [95% CI], diverged fraction in parentheses.",
        "",
        "| network | feedback | " + " | ".join(f"eta = {r}" for r in RATES) + " |",
        "|---|---|" + "---|" * len(RATES),
    ]
    for net_name in NETWORKS:
        for pathway in PATHWAYS:
            cells = []
            for r in RATES:
                row = next(
                    x
                    for x in rows
                    if x["network"] == net_name and x["feedback"] == pathway and x["eta"] == r
                )
                lo, hi = row["ci95"]
                cells.append(f"{row['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] ({row['diverged']:.2f})")
            lines.append(f"| {net_name} | {pathway} | " + " | ".join(cells) + " |")
    (args.out / "ei_networks.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}/ei_networks.json and .md")


if __name__ == "__main__":
    main()
