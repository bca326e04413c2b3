"""Synaptic scaling as normalisation (after Shen, Wang & Navlakha 2021).

An MLP (``n_in``-128-128-classes, ReLU) is trained by mini-batch SGD on Fashion-MNIST and
MNIST-1D (``--quick``: digits) under eight conditions: no normalisation, batch norm, layer
norm, weight norm, and four synaptic-scaling steps applied to every hidden layer's incoming
weights after each SGD update, with ``ybar`` each hidden unit's running-average activity
(rate ``tau`` per batch), ``nrm0`` the rows' initial norms and ``rho`` each layer's mean
activity at initialisation (first batch):

* ``scaling_fixed``: ``W_i <- W_i + gamma (rho - ybar_i) W_i`` (unbounded: a silent ReLU
  unit's weights grow as ``(1 + gamma rho)^t``);
* ``scaling_layer_mean``: ``W_i <- W_i + gamma (mean_k ybar_k - ybar_i) W_i``;
* ``scaling_norm``: ``W_i <- W_i + gamma (nrm0_i / ||W_i|| - 1) W_i``;
* ``scaling_bounded`` (the variant the verdicts judge): ``W_i <- W_i exp(gamma r_i)``,
  ``r_i = tanh(1 - ybar_i / rho) - log(||W_i|| / nrm0_i) / log 4``: multiplicative (a
  unit's incoming weights keep their ratios, as in biological scaling) and bounded (one step
  changes a row by at most ``e^(2 gamma)``, and a row's gain settles inside ``(1/4, 4)``:
  a silent unit's weights grow to at most ``4^tanh(1) ~ 2.9`` times their start).

Tuning protocol: every condition gets the same budget of configurations, searched on a
validation split (the last ``--val`` of the training images) and reported on the test
split: the SGD rates of the data set (``LRS``; ``--lrs`` overrides) for every condition,
crossed with the two strengths
``--gammas`` for ``scaling_bounded`` (twice the budget, which can only favour the judged
variant); the other scaling steps use the first strength. All seeds of a configuration
train in parallel (``vmap``) and share their keys with the other conditions, so differences
are paired over seeds.
Diverged networks score 0.

Reported per data set and condition (at its chosen configuration; 95% percentile-bootstrap
intervals over seeds): test accuracy after the last and the first epoch, the paired
difference from no normalisation, and load balancing of the hidden units on the test set:
the coefficient of variation of their mean activities (lower = more even use) and the
fraction of dead units (mean activity 0). Writes ``results.md``, ``results.json``,
``verdict.json`` and ``accuracy.png`` under ``--out``; finished configurations are kept in
``progress.json`` and skipped when the script runs again with the same settings.

Usage (repository root)::

    python scripts/scaling_normalization.py           # 2 data sets, 8 conditions, 5 seeds
    python scripts/scaling_normalization.py --quick   # digits, 2 seeds, ~2 min

``--meta`` adds the meta-learned version (``scaling_meta``): the framework's ES outer loop
(:func:`metaplastic.outer.evolve`, OpenAI-ES) learns the coefficients of the three additive
scaling terms at once, starting from zero (no scaling); fitness is the error on held-out
*training* images after a short training run, so the test split never enters the search.
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
from _study import (
    add_meta_args,
    load_progress,
    meta_split,
    resolve_meta_args,
    verdict_of,
    verdict_table,
    write_verdict,
)
from tqdm.auto import tqdm

from metaplastic import MetaplasticError
from metaplastic.inner import NORMALISATIONS, NormalisedMLP, scaling_step
from metaplastic.outer import evolve
from metaplastic.run import plot_evolution
from metaplastic.tasks import (
    DATASETS,
    bootstrap_ci,
    load_dataset,
    paired_difference,
    train_test_arrays,
)

CONDITIONS = (
    "none",
    "batch_norm",
    "layer_norm",
    "weight_norm",
    "scaling_fixed",
    "scaling_layer_mean",
    "scaling_norm",
    "scaling_bounded",
)
SCALING_TERMS = ("scaling_fixed", "scaling_layer_mean", "scaling_norm", "scaling_bounded")
META_TERMS = ("scaling_fixed", "scaling_layer_mean", "scaling_norm")
META_SCALE = 0.01  # search variable 1 = coefficient 0.01 (the hand-set gamma)
#: non-inferiority margin of "on par" claims (accuracy)
MARGIN = 0.01
#: the synaptic-scaling variant the verdicts judge (chosen before any run: the only one
#: that is both multiplicative and bounded)
JUDGED = "scaling_bounded"


def model(cond, sizes) -> NormalisedMLP:
    """The network of a condition (the scaling conditions use no normalisation layer)."""
    return NormalisedMLP(tuple(sizes), norm=cond if cond in NORMALISATIONS else "none")


def train_seed(key, data, cond, args, targets, coefs=None, epochs=None, lr=0.01, val=None):
    """Train one network by SGD (rate ``lr``, momentum 0.9) with the scaling steps
    ``coefs`` (step name -> strength; none by default) after every update. Returns
    (accuracy, CV, dead) on the test images after each epoch, and with ``val`` (images,
    labels) also the final accuracy on them."""
    x, y, tx, ty = data
    coefs = coefs or {}
    net = model(cond, (x.shape[1], *args.hidden, args.n_classes))
    k_init, k_perm = jax.random.split(key)
    p = net.init(k_init)
    opt = optax.sgd(lr, momentum=0.9)
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

    def evaluate(p, bn, tx=tx, ty=ty):
        logits, hidden, _ = net.forward(p, tx, stats=bn if cond == "batch_norm" else None)
        ok = jnp.all(jnp.isfinite(logits))  # a diverged network scores 0, never a guess
        acc = jnp.where(ok, jnp.mean(jnp.argmax(logits, 1) == ty), 0.0)
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
    if val is None:
        return accs
    return accs, evaluate(carry[0], carry[3], *val)[0]


#: SGD rates searched per data set (the same for every condition of a data set); MNIST-1D's
#: small training set favours large rates: its grid was widened after a first run put every
#: condition's choice at 0.1, the grid's top
#: five SGD rates per data set (the same budget for every condition), wide enough that no
#: condition's validation choice sits at an edge of its grid in the committed run
LRS = {"fashion_mnist": [0.003, 0.01, 0.03, 0.1, 0.3], "mnist1d": [0.01, 0.03, 0.1, 0.3, 1.0]}
LRS_QUICK = [0.03, 0.1]


def dataset_lrs(name: str, args) -> list[float]:
    if args.lrs:
        return args.lrs
    return LRS_QUICK if args.quick else LRS.get(name, LRS["fashion_mnist"])


def grid(cond: str, args, lrs) -> list[dict]:
    """The configurations searched for a condition: the SGD rates ``lrs``; the judged
    variant (``scaling_bounded``) crosses them with both strengths ``args.gammas`` (twice
    the budget, which can only favour it), the other scaling steps use the first
    strength."""
    if cond == JUDGED:
        return [{"lr": lr, "gamma": g} for lr in lrs for g in args.gammas]
    gamma = args.gammas[0] if cond in SCALING_TERMS else 0.0
    return [{"lr": lr, "gamma": gamma} for lr in lrs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--datasets",
        nargs="+",
        default=None,
        choices=DATASETS,
        help="default fashion_mnist mnist1d",
    )
    ap.add_argument("--seeds", type=int, default=None, help="default 5 (quick 2)")
    ap.add_argument("--epochs", type=int, default=None, help="default 8 (quick 3)")
    ap.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=CONDITIONS)
    ap.add_argument(
        "--lrs", nargs="+", type=float, default=None, help="SGD rates searched (default: LRS)"
    )
    ap.add_argument("--gammas", nargs=2, type=float, default=[0.01, 0.1], help="scaling strengths")
    ap.add_argument("--val", type=float, default=0.1, help="validation fraction of training")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--tau", type=float, default=0.01, help="running-average rate of ybar")
    add_meta_args(ap, (3, 30), "scaling")
    ap.add_argument("--meta-epochs", type=int, default=2, help="training epochs per fitness")
    args = ap.parse_args()
    resolve_meta_args(args)
    q = args.quick
    args.seeds = args.seeds or (2 if q else 5)
    args.epochs = args.epochs or (3 if q else 8)
    args.datasets = args.datasets or (["digits"] if q else ["fashion_mnist", "mnist1d"])
    args.hidden = (32, 32) if q else (128, 128)
    out = args.out or Path("results/scaling_normalization" + ("_quick" if q else ""))
    out.mkdir(parents=True, exist_ok=True)
    # runs are keyed by (data set, condition, rate, strength): more of them extend a run
    prog_path = out / "progress.json"
    free = ("out", "conditions", "datasets", "lrs", "gammas", "meta")
    prog = load_progress(prog_path, args, free, {"runs": {}, "meta": {}})
    try:  # missing data: one line naming the fix, exit 2, before any work
        loaded = {name: load_dataset(name) for name in args.datasets}
    except MetaplasticError as err:
        ap.error(str(err))
    t_all = time.perf_counter()
    for name in args.datasets:
        ds = loaded[name]
        x, y, tx, ty = train_test_arrays(ds)  # digits: a seeded 70/30 split
        x, y, vx, vy = meta_split(x, y, int(args.val * x.shape[0]))
        args.n_classes = int(np.max(y)) + 1
        data = tuple(jnp.asarray(a) for a in (x, y, tx, ty))
        val = (jnp.asarray(vx), jnp.asarray(vy))
        todo = [(c, None) for c in args.conditions]
        if args.meta:
            if name not in prog["meta"]:
                t0 = time.perf_counter()
                coefs, history = meta_learn(data, args, fixed_targets(data, args, "scaling_meta"))
                prog["meta"][name] = {
                    "learned": coefs,
                    "history": history,
                    "generations": args.meta_generations,
                    "population": args.meta_population,
                    "epochs": args.meta_epochs,
                    "train_images": args.meta_train,
                    "val_images": args.meta_val,
                    "seconds": round(time.perf_counter() - t0, 1),
                }
                prog_path.write_text(json.dumps(prog) + "\n")
            todo.append(("scaling_meta", prog["meta"][name]["learned"]))
        runs = [
            (c, coefs, hp) for c, coefs in todo for hp in grid(c, args, dataset_lrs(name, args))
        ]
        bar = tqdm(total=len(runs), desc=f"{name}: conditions x configurations", leave=False)
        for cond, coefs, hp in runs:
            key = f"{name}|{cond}|{hp['lr']:g}|{hp['gamma']:g}"
            if key not in prog["runs"]:
                prog["runs"][key] = run_condition(name, cond, coefs, hp, data, val, args)
                prog_path.write_text(json.dumps(prog) + "\n")
            r = prog["runs"][key]
            bar.update(1)
            tqdm.write(
                f"{name:13s} {cond:20s} lr {hp['lr']:<6g} gamma {hp['gamma']:<5g} "
                f"val {r['val_accuracy']['mean']:.4f} test {r['test_accuracy']['mean']:.4f} "
                f"CV {r['activity_cv']['mean']:.3f} dead {r['dead_fraction']['mean']:.3f} "
                f"({r['seconds']:.0f} s)"
            )
        bar.close()
    wanted = {
        f"{d}|{c}|{hp['lr']:g}|{hp['gamma']:g}"
        for d in args.datasets
        for c in [*args.conditions, *(["scaling_meta"] if args.meta else [])]
        for hp in grid(c, args, dataset_lrs(d, args))
    }
    rows = [r for k, r in prog["runs"].items() if k in wanted]
    chosen = select(rows)
    claims = verdicts(chosen, args)
    compute = sum(r["seconds"] for r in rows) + sum(
        m["seconds"] for d, m in prog["meta"].items() if d in args.datasets
    )  # across resumed runs too
    meta = {d: m for d, m in prog["meta"].items() if d in args.datasets and args.meta}
    write(out, rows, chosen, claims, meta, args, max(compute, time.perf_counter() - t_all))


def run_condition(name, cond, coefs, hp, data, val, args) -> dict:
    """Train ``args.seeds`` networks (vmapped) at one configuration; validation and test
    scores per seed (the seeds share keys across conditions, so differences are paired)."""
    targets = fixed_targets(data, args, cond)
    if coefs is None and cond in SCALING_TERMS:
        coefs = {cond: hp["gamma"]}
    run = jax.jit(
        jax.vmap(
            partial(
                train_seed,
                data=data,
                cond=cond,
                args=args,
                targets=targets,
                coefs=coefs or {},
                lr=hp["lr"],
                val=val,
            )
        )
    )
    t0 = time.perf_counter()
    accs, val_acc = run(jax.random.split(jax.random.key(1), args.seeds))
    accs = jax.tree_util.tree_map(np.asarray, accs)
    final, cv, dead = accs[-1]
    row = {
        "dataset": name,
        "condition": cond,
        "lr": hp["lr"],
        "gamma": hp["gamma"],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    for metric, v in (
        ("val_accuracy", np.asarray(val_acc)),
        ("test_accuracy", final),
        ("epoch1_accuracy", accs[0][0]),
        ("activity_cv", cv),
        ("dead_fraction", dead),
    ):
        v = np.asarray(v, np.float64)
        v = np.where(np.isfinite(v), v, np.nan)
        finite = v[np.isfinite(v)]
        m, lo, hi = bootstrap_ci(finite) if finite.size else (float("nan"),) * 3
        row[metric] = {"mean": m, "ci95": [lo, hi], "per_seed": v.tolist()}
    return row


def select(rows) -> list[dict]:
    """Per data set and condition, the configuration with the best mean validation
    accuracy (the test split plays no part)."""
    best: dict = {}
    for r in rows:
        k = (r["dataset"], r["condition"])
        score = np.nan_to_num(r["val_accuracy"]["mean"], nan=-1.0)
        if k not in best or score > np.nan_to_num(best[k]["val_accuracy"]["mean"], nan=-1.0):
            best[k] = r
    return list(best.values())


def paired(chosen, dataset, a, b, metric="test_accuracy"):
    by = {(r["dataset"], r["condition"]): r for r in chosen}
    if (dataset, a) not in by or (dataset, b) not in by:
        return None
    va = np.nan_to_num(by[(dataset, a)][metric]["per_seed"], nan=0.0)
    vb = np.nan_to_num(by[(dataset, b)][metric]["per_seed"], nan=0.0)
    return paired_difference(va, vb)


def verdicts(chosen, args) -> list[dict]:
    datasets = sorted({r["dataset"] for r in chosen})
    spec = [
        (
            "Synaptic scaling improves test accuracy over no normalisation",
            [(d, "none") for d in datasets],
            "test_accuracy",
            lambda x: x["ci"][0] > 0,
        ),
        (
            "Synaptic scaling is on par with batch, layer and weight normalisation "
            f"(not worse by more than {MARGIN})",
            [(d, n) for d in datasets for n in ("batch_norm", "layer_norm", "weight_norm")],
            "test_accuracy",
            lambda x: x["ci"][0] > -MARGIN,
        ),
        (
            "Synaptic scaling balances the load across hidden units (lower CV of their mean "
            "activities than no normalisation)",
            [(d, "none") for d in datasets],
            "activity_cv",
            lambda x: x["ci"][1] < 0,
        ),
    ]
    claims = []
    for claim, cases, metric, holds in spec:
        got = [(d, b, paired(chosen, d, JUDGED, b, metric)) for d, b in cases]
        got = [(d, b, x) for d, b, x in got if x is not None]
        if not got:
            continue
        hits = sum(holds(x) for _, _, x in got)
        ev = "; ".join(
            f"{d} vs {b}: {x['mean']:+.4f} [{x['ci'][0]:+.4f}, {x['ci'][1]:+.4f}]"
            for d, b, x in got
        )
        claims.append(
            {
                "claim": claim,
                "verdict": verdict_of(hits, len(got)),
                "seeds": args.seeds,
                "evidence": f"{JUDGED} minus the baseline, {metric.replace('_', ' ')}, paired "
                f"over seeds, 95% bootstrap interval, each at its validation-chosen "
                f"configuration: {ev}",
            }
        )
    return claims


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
        coefs = dict(zip(META_TERMS, META_SCALE * p, strict=True))
        accs = train_seed(
            key, (xt, yt, xv, yv), "scaling_meta", args, targets, coefs, args.meta_epochs, 0.01
        )
        return 1.0 - accs[-1][0]

    res = evolve(
        fitness,
        jnp.zeros(len(META_TERMS)),
        jax.random.key(7),
        population=args.meta_population,
        generations=args.meta_generations,
        sigma=0.5,
        lr=0.1,
        desc="meta-learn scaling",
    )
    learned = np.asarray(res.params, dtype=np.float64) * META_SCALE
    return dict(zip(META_TERMS, learned.tolist(), strict=True)), res.history


def fmt(v, d=4):
    return f"{v['mean']:.{d}f} [{v['ci95'][0]:.{d}f}, {v['ci95'][1]:.{d}f}]"


def write(out: Path, rows, chosen, claims, meta, args, total: float) -> None:
    datasets = list(dict.fromkeys(r["dataset"] for r in chosen))
    lines = [
        f"Synaptic scaling as normalisation: MLP {list(args.hidden)} ReLU, SGD (momentum 0.9, "
        f"batch {args.batch}), {args.epochs} epochs, {args.seeds} seeds per configuration; "
        "each condition searched over the SGD rates of its data set (below; "
        f"{JUDGED}: x strengths gamma "
        f"{args.gammas}, twice the budget; the other scaling steps: gamma {args.gammas[0]}), "
        "chosen "
        f"on a validation split ({args.val:.0%} of the training images), reported on the "
        f"test split; 95% percentile-bootstrap intervals over seeds; scaling tau {args.tau}. "
        f"Compute {total / 60:.1f} min.",
    ]
    for d in datasets:
        lines += [
            "",
            f"**{d}** (SGD rates {dataset_lrs(d, args)})",
            "",
            "| condition | lr, gamma | test accuracy | minus none (paired) | after epoch 1 "
            "| activity CV (lower = more even) | dead units |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in (x for x in chosen if x["dataset"] == d):
            diff = paired(chosen, d, r["condition"], "none")
            dtxt = (
                "—"
                if diff is None or r["condition"] == "none"
                else f"{diff['mean']:+.4f} [{diff['ci'][0]:+.4f}, {diff['ci'][1]:+.4f}]"
            )
            lines.append(
                f"| {r['condition']} | {r['lr']:g}, {r['gamma']:g} | {fmt(r['test_accuracy'])} "
                f"| {dtxt} | {fmt(r['epoch1_accuracy'])} | {fmt(r['activity_cv'], 3)} | "
                f"{fmt(r['dead_fraction'], 3)} |"
            )
    for d, m in meta.items():
        c = m["learned"]
        lines += [
            "",
            f"Meta-learned scaling on {d} (`scaling_meta`): OpenAI-ES, {m['generations']} "
            f"generations x {m['population']} members, fitness = error on {m['val_images']} "
            f"held-out training images after {m['epochs']} epochs on {m['train_images']} "
            f"images ({m['seconds'] / 60:.1f} min), the three additive terms applied together, "
            "starting from 0. Learned: " + ", ".join(f"{k} {v:+.4f}" for k, v in c.items()),
        ]
        plot_evolution(
            m["history"],
            [f"{t} / {META_SCALE}" for t in META_TERMS],
            out / f"meta_{d}.png",
            "held-out training error",
        )
    if claims:
        lines += ["", f"Verdicts (judged on `{JUDGED}`):", "", *verdict_table(claims)]
        write_verdict(out, claims, args.quick)
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(
        json.dumps({"chosen": chosen, "runs": rows, "meta": meta}, indent=2) + "\n"
    )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(datasets), 2, figsize=(11, 3.6 * len(datasets)), squeeze=False)
    for row_axes, d in zip(axes, datasets, strict=True):
        sel = [r for r in chosen if r["dataset"] == d]
        names = [r["condition"] for r in sel]
        for ax, key, label in (
            (row_axes[0], "test_accuracy", f"{d}: test accuracy"),
            (row_axes[1], "activity_cv", f"{d}: CV of hidden-unit mean activity"),
        ):
            m = np.array([r[key]["mean"] for r in sel])
            lo = np.array([r[key]["ci95"][0] for r in sel])
            hi = np.array([r[key]["ci95"][1] for r in sel])
            ax.bar(names, m, yerr=[m - lo, hi - m], capsize=4, color="#4c72b0")
            ax.set_ylabel(label, fontsize=8)
            ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=110)
    plt.close(fig)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
