"""How close predictive coding's errors come to backprop's, against inference steps.

Usage: python scripts/pc_vs_backprop.py [--samples 50] [--out results/pathways]

On the digits network of the ``digits`` preset (64-50-40-30-20-10 softplus, Xavier init) and
``--samples`` digits images with their labels, computes every layer's error vector by
backprop and by predictive coding (``metaplastic.inner.PredictiveCoding``): the
fixed-prediction variant (rate 1 and 0.5) and strict PC (rate 0.1 and 0.05), for 1 to 200
inference steps. Reports, per variant, rate and step count, the median over samples of the
relative error ``|e_pc - e_bp| / |e_bp|`` and of the cosine similarity, for each layer.
Writes ``pc_vs_backprop.json`` and ``pc_vs_backprop.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from metaplastic.inner import Network, PredictiveCoding, backward
from metaplastic.run import plot_lines
from metaplastic.tasks import load_dataset

STEPS = (1, 2, 3, 4, 5, 8, 12, 20, 50, 100, 200)
SETTINGS = (("fixed_prediction", 1.0), ("fixed_prediction", 0.5), ("strict", 0.1), ("strict", 0.05))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=50)
    ap.add_argument("--out", type=Path, default=Path("results/pathways"))
    args = ap.parse_args()
    if args.samples < 1:
        print("pc_vs_backprop: error: --samples must be at least 1", file=sys.stderr)
        raise SystemExit(2)
    ds = load_dataset("digits")
    x = jnp.asarray(ds.x[: args.samples], jnp.float32)
    y = jnp.asarray(ds.y[: args.samples])
    net = Network((64, 50, 40, 30, 20, 10), beta=10.0)
    state = net.init(jax.random.key(0))

    def errors(pathway, xi, yi):
        hs = net.forward(state, xi)
        e_out = jax.nn.softmax(hs[-1]) - jax.nn.one_hot(yi, 10)
        return backward(net, state, None, hs, e_out, pathway)

    bp = jax.vmap(lambda a, b: errors("backprop", a, b))(x, y)
    rows = []
    for variant, rate in SETTINGS:
        for steps in STEPS:
            pc = jax.vmap(lambda a, b: errors(PredictiveCoding(variant, steps, rate), a, b))(x, y)
            rel, cos = [], []
            for layer in range(net.n_layers):  # e_0 .. e_{L-1}; e_L is the same output error
                a, b = np.asarray(bp[layer]), np.asarray(pc[layer])
                na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
                rel.append(float(np.median(np.linalg.norm(b - a, axis=1) / na)))
                cos.append(float(np.median(np.sum(a * b, axis=1) / np.maximum(na * nb, 1e-30))))
            rows.append(
                {"variant": variant, "rate": rate, "steps": steps, "rel_error": rel, "cosine": cos}
            )
            print(variant, rate, steps, "rel", np.round(rel, 4), "cos", np.round(cos, 3))
    args.out.mkdir(parents=True, exist_ok=True)
    out = {
        "network": list(net.sizes),
        "samples": args.samples,
        "layers": [f"e_{j}" for j in range(net.n_layers)],
        "rows": rows,
        "command": "python scripts/pc_vs_backprop.py " + " ".join(sys.argv[1:]),
    }
    (args.out / "pc_vs_backprop.json").write_text(json.dumps(out, indent=2) + "\n")
    series = {
        f"{v}, rate {r}": (
            [row["steps"] for row in rows if (row["variant"], row["rate"]) == (v, r)],
            [
                max(row["rel_error"][1], 1e-8)
                for row in rows
                if (row["variant"], row["rate"]) == (v, r)
            ],
        )
        for v, r in SETTINGS
    }
    plot_lines(
        series,
        "inference steps",
        "median |e_1 - e_1(backprop)| / |e_1(backprop)|",
        args.out / "pc_vs_backprop.png",
        logx=True,
        logy=True,
    )


if __name__ == "__main__":
    main()
