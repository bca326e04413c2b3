"""Synaptic scaling as normalisation (after Shen, Wang & Navlakha 2021).

An MLP (784-128-128-10, ReLU) is trained by mini-batch SGD on Fashion-MNIST (``--quick``:
digits) under seven conditions: no normalisation, batch norm, layer norm, weight norm, and
each synaptic-scaling variant of the framework's term library (``scaling_fixed``,
``scaling_layer_mean``, ``scaling_norm``) applied to every hidden layer's incoming weights
after each SGD update: ``W <- W + gamma * term(W, ybar, nrm0)``, with ``ybar`` each hidden
unit's running-average activity (rate ``tau`` per batch) and ``nrm0`` the rows' initial
norms. The fixed target ``rho`` of ``scaling_fixed`` is each layer's mean activity at
initialisation (on the first batch).

Reported per condition (mean and Student-t 95% CI over seeds; all seeds train in parallel
with ``vmap``): test accuracy after the last epoch, test accuracy after the first epoch
(training speed), and load balancing of the hidden units on the test set: the coefficient
of variation of their mean activities (lower = more even use) and the fraction of dead units
(mean activity 0). Writes ``results.md``, ``results.json``, ``accuracy.png`` under ``--out``.

Usage (repository root)::

    python scripts/scaling_normalization.py --meta    # Fashion-MNIST, 5 seeds, ~15 min
    python scripts/scaling_normalization.py --quick   # digits, 3 seeds, ~1 min (CI)

``--meta`` adds the meta-learned version (``scaling_meta``): the framework's ES outer loop
(:func:`metaplastic.outer.evolve`, OpenAI-ES) learns the coefficients of all three scaling
terms at once, starting from zero (no scaling); fitness is the error on held-out *training*
images after a short training run, so the test split never enters the search. The learned
coefficients are then trained and tested like the hand-set conditions.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _study import add_meta_args, meta_split, resolve_meta_args

from metaplastic.inner import NORMALISATIONS, NormalisedMLP, scaling_step
from metaplastic.outer import evolve
from metaplastic.run import plot_evolution
from metaplastic.tasks import load_dataset, mean_ci95, train_test_arrays

CONDITIONS = (
    "none",
    "batch_norm",
    "layer_norm",
    "weight_norm",
    "scaling_fixed",
    "scaling_layer_mean",
    "scaling_norm",
)
SCALING_TERMS = ("scaling_fixed", "scaling_layer_mean", "scaling_norm")
META_SCALE = 0.01  # search variable 1 = coefficient 0.01 (the hand-set gamma)


def model(cond, sizes) -> NormalisedMLP:
    """The network of a condition (the scaling conditions use no normalisation layer)."""
    return NormalisedMLP(tuple(sizes), norm=cond if cond in NORMALISATIONS else "none")


def train_seed(key, data, cond, args, targets, coefs=None, epochs=None):
    """Train one network; ``coefs`` (scaling term -> coefficient) defaults to ``{cond:
    gamma}`` for the scaling conditions. Returns (accuracy, CV, dead) after each epoch."""
    x, y, tx, ty = data
    if coefs is None:
        coefs = {cond: args.gamma} if cond in SCALING_TERMS else {}
    net = model(cond, (x.shape[1], *args.hidden, args.n_classes))
    k_init, k_perm = jax.random.split(key)
    p = net.init(k_init)
    opt = optax.sgd(args.lr, momentum=0.9)
    o = opt.init(p)
    n_batches = x.shape[0] // args.batch
    nrm0 = [jnp.linalg.norm(w, axis=1) for w in p["W"][:-1]]
    ybar0 = [jnp.full(n, t) for n, t in zip(args.hidden, targets, strict=True)]
    bn0 = [(jnp.zeros(n), jnp.ones(n)) for n in args.hidden]

    def loss_fn(p, xb, yb):
        logits, hidden, bstats = net.forward(p, xb)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
        return ce, (hidden, bstats)

    def step(carry, idx):
        p, o, ybar, bn = carry
        xb, yb = x[idx], y[idx]
        (_, (hidden, bstats)), g = jax.value_and_grad(loss_fn, has_aux=True)(p, xb, yb)
        upd, o = opt.update(g, o, p)
        p = optax.apply_updates(p, upd)
        ybar = [(1 - args.tau) * yb_ + args.tau * h.mean(0) for yb_, h in zip(ybar, hidden)]
        if coefs:
            p = scaling_step(coefs, targets, p, ybar, nrm0)
        if cond == "batch_norm":
            bn = [
                (0.9 * m + 0.1 * bm, 0.9 * v + 0.1 * bv)
                for (m, v), (bm, bv) in zip(bn, bstats, strict=True)
            ]
        return (p, o, ybar, bn), None

    def evaluate(p, bn):
        logits, hidden, _ = net.forward(p, tx, stats=bn if cond == "batch_norm" else None)
        acc = jnp.mean(jnp.argmax(logits, 1) == ty)
        means = [h.mean(0) for h in hidden]
        cv = jnp.mean(jnp.stack([m.std() / (m.mean() + 1e-12) for m in means]))
        dead = jnp.mean(jnp.stack([jnp.mean(m <= 0.0) for m in means]))
        return acc, cv, dead

    carry = (p, o, ybar0, bn0)
    accs = []
    for epoch in range(epochs or args.epochs):
        perm = jax.random.permutation(jax.random.fold_in(k_perm, epoch), x.shape[0])
        idx = perm[: n_batches * args.batch].reshape(n_batches, args.batch)
        carry, _ = jax.lax.scan(step, carry, idx)
        accs.append(evaluate(carry[0], carry[3]))
    return accs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=CONDITIONS)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--gamma", type=float, default=0.01, help="scaling step strength")
    ap.add_argument("--tau", type=float, default=0.01, help="running-average rate of ybar")
    add_meta_args(ap, (3, 30), "scaling")
    ap.add_argument("--meta-epochs", type=int, default=2, help="training epochs per fitness")
    args = ap.parse_args()
    resolve_meta_args(args)
    args.seeds = args.seeds or (3 if args.quick else 5)
    args.epochs = args.epochs or (3 if args.quick else 5)
    args.hidden = (32, 32) if args.quick else (128, 128)
    out = args.out or Path("results/scaling_normalization" + ("_quick" if args.quick else ""))
    out.mkdir(parents=True, exist_ok=True)
    ds = load_dataset("digits" if args.quick else "fashion_mnist")
    data = train_test_arrays(ds)  # digits: a seeded 70/30 split
    args.n_classes = int(np.max(data[1])) + 1
    data = tuple(jnp.asarray(a) for a in data)
    rows, meta = [], None
    t_all = time.perf_counter()
    todo = [(c, None) for c in args.conditions]
    if args.meta:
        t0 = time.perf_counter()
        coefs, history = meta_learn(data, args, fixed_targets(data, args, "scaling_meta"))
        meta = {
            "learned": coefs,
            "history": history,
            "generations": args.meta_generations,
            "population": args.meta_population,
            "epochs": args.meta_epochs,
            "train_images": args.meta_train,
            "val_images": args.meta_val,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        print("meta-learned coefficients:", coefs, flush=True)
        todo.append(("scaling_meta", coefs))
    for cond, coefs in todo:
        targets = fixed_targets(data, args, cond)
        run = jax.jit(
            jax.vmap(
                partial(train_seed, data=data, cond=cond, args=args, targets=targets, coefs=coefs)
            )
        )
        t0 = time.perf_counter()
        accs = run(jax.random.split(jax.random.key(1), args.seeds))
        accs = jax.tree_util.tree_map(np.asarray, accs)
        secs = time.perf_counter() - t0
        final, cv, dead = accs[-1]
        first = accs[0][0]
        row = {"condition": cond, "seconds": round(secs, 1)}
        for name, v in (
            ("test_accuracy", final),
            ("epoch1_accuracy", first),
            ("activity_cv", cv),
            ("dead_fraction", dead),
        ):
            m, lo, hi = mean_ci95(v)
            row[name] = {"mean": m, "ci95": [lo, hi], "per_seed": np.asarray(v).tolist()}
        rows.append(row)
        print(
            f"{cond:20s} test {row['test_accuracy']['mean']:.4f}  "
            f"epoch-1 {row['epoch1_accuracy']['mean']:.4f}  CV {row['activity_cv']['mean']:.3f}"
            f"  dead {row['dead_fraction']['mean']:.3f}  ({secs:.0f} s)",
            flush=True,
        )
    write(out, rows, meta, args, ds.name, time.perf_counter() - t_all)


def fixed_targets(data, args, cond):
    """The fixed target of ``scaling_fixed``: each hidden layer's mean activity at
    initialisation, on the first batch."""
    net = model(cond, (data[0].shape[1], *args.hidden, args.n_classes))
    p0 = net.init(jax.random.key(0))
    return [float(h.mean()) for h in net.forward(p0, data[0][: args.batch])[1]]


def meta_learn(data, args, targets):
    """OpenAI-ES over the three scaling coefficients (applied together, each ``META_SCALE``
    times its search variable, starting from 0 = no scaling). Fitness: error on the last
    ``meta_val`` training images after ``meta_epochs`` epochs on ``meta_train`` others."""
    xt, yt, xv, yv = meta_split(data[0], data[1], args.meta_val)
    xt, yt = xt[: args.meta_train], yt[: args.meta_train]

    def fitness(p, key):
        coefs = dict(zip(SCALING_TERMS, META_SCALE * p, strict=True))
        accs = train_seed(
            key, (xt, yt, xv, yv), "scaling_meta", args, targets, coefs, args.meta_epochs
        )
        return 1.0 - accs[-1][0]

    res = evolve(
        fitness,
        jnp.zeros(len(SCALING_TERMS)),
        jax.random.key(7),
        population=args.meta_population,
        generations=args.meta_generations,
        sigma=0.5,
        lr=0.1,
        desc="meta-learn scaling",
    )
    learned = np.asarray(res.params, dtype=np.float64) * META_SCALE
    return dict(zip(SCALING_TERMS, learned.tolist(), strict=True)), res.history


def write(out: Path, rows, meta, args, data: str, total: float) -> None:
    def fmt(r, k, d=4):
        v = r[k]
        return f"{v['mean']:.{d}f} [{v['ci95'][0]:.{d}f}, {v['ci95'][1]:.{d}f}]"

    lines = [
        f"Synaptic scaling as normalisation: {data}, MLP {list(args.hidden)} ReLU, SGD "
        f"(lr {args.lr}, momentum 0.9, batch {args.batch}), {args.epochs} epochs, "
        f"{args.seeds} seeds (95% CIs over seeds); scaling gamma {args.gamma}, tau "
        f"{args.tau}. Total {total / 60:.1f} min.",
        "",
        "| condition | test accuracy | after epoch 1 | activity CV (lower = more even) "
        "| dead units |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['condition']} | {fmt(r, 'test_accuracy')} | {fmt(r, 'epoch1_accuracy')} | "
            f"{fmt(r, 'activity_cv', 3)} | {fmt(r, 'dead_fraction', 3)} |"
        )
    if meta is not None:
        c = meta["learned"]
        lines += [
            "",
            f"Meta-learned scaling (`scaling_meta`): OpenAI-ES, {meta['generations']} "
            f"generations x {meta['population']} members, fitness = error on "
            f"{meta['val_images']} held-out training images after {meta['epochs']} epochs on "
            f"{meta['train_images']} images ({meta['seconds'] / 60:.1f} min), all three terms "
            "applied together, starting from 0. Learned: "
            + ", ".join(f"{k} {v:+.4f}" for k, v in c.items())
            + f" (hand-set conditions use {args.gamma} for one term).",
        ]
        plot_evolution(
            meta["history"],
            [f"{t} / {META_SCALE}" for t in SCALING_TERMS],
            out / "meta.png",
            "held-out training error",
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    if meta is not None:
        (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    names = [r["condition"] for r in rows]
    for ax, key, label in (
        (axes[0], "test_accuracy", "test accuracy"),
        (axes[1], "activity_cv", "CV of hidden-unit mean activity"),
    ):
        m = np.array([r[key]["mean"] for r in rows])
        lo = np.array([r[key]["ci95"][0] for r in rows])
        hi = np.array([r[key]["ci95"][1] for r in rows])
        ax.bar(names, m, yerr=[m - lo, hi - m], capsize=4, color="#4c72b0")
        ax.set_ylabel(label)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=110)
    plt.close(fig)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
