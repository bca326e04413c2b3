"""Inhibitory normalisation of activity and errors in EI networks (after Eyono, Levenstein,
Ghosh, Cornford & Richards 2026).

Networks 784-H-H-10 obeying Dale's law (every layer ``h = W_EX x + b - W_EI (W_IX x)`` with
``W_EX, W_IX, W_EI >= 0``, clamped after each update; ``n_I = 0.1 n_E`` inhibitory units;
lognormal init with mean-matched inhibition, ``W_EI`` rows summing to 1) are trained by
mini-batch SGD on Fashion-MNIST (``--quick``: digits) under a luminosity shift: every image
gets one ``Delta ~ U(-eps, eps)`` added to all pixels, then clipped to [0, 1], in training and
test, for ``eps`` in {0, 0.25, 0.5, 0.75}. Hidden-layer conditions:

* ``ei``: EI layers, no normalisation; every weight trained by backprop.
* ``ei_ln``: EI layers followed by layer norm (no affine parameters), backprop through it.
* ``inorm``: I-Norm layers. Subtractive inhibition ``W_EI W_IX x`` and divisive inhibition
  ``sigma_I = sqrt(mean_j (B_IX x)_j^2 + 1e-5)`` give ``z = (W_EX x + b - W_EI W_IX x) /
  sigma_I``. ``W_IX, W_EI, B_IX`` learn only from the local loss ``L_I = lambda *
  mean_batch[(mean_j u_j)^2 + (var_j u_j - 1)^2]`` (``lambda = 100``; ``u`` is ``z`` with a
  stop-gradient on the excitatory part and on the layer input); the task loss treats the
  inhibition as constant. Forward normalisation only.
* ``inorm_gradnorm``: I-Norm plus GradNorm, an identity in the forward pass whose backward
  pass maps the error ``d`` at ``z`` to ``(d - mean(d) - zh mean(d zh)) / sqrt(var(z) +
  1e-5)`` with ``zh = (z - mean z) / sqrt(var z + 1e-5)``: the layer-norm Jacobian at ``z``
  (a formula that writes ``z`` for ``zh`` because I-Norm's ``z`` is already close to
  normalised).
* ``inorm_center``: I-Norm plus the "center" ablation, ``d - mean(d)`` only.

The output layer is a plain EI layer trained by backprop in every condition.

Reported per condition and ``eps`` (mean and Student-t 95% CI over seeds; all seeds and all
``eps`` values train in parallel with ``vmap``): test accuracy; the moments of excitatory
activity (the pre-ReLU drive ``z`` of the hidden layers on the test set: the mean over images
of the per-image mean across units, the spread across images of that mean, and the mean
per-image standard deviation); and for the I-Norm conditions, the cosine alignment with
layer norm of (a) the I-Norm output against ``LN(W_EX x + b - W_EI W_IX x)`` and (b) the
task-loss gradient of the hidden ``W_EX`` against the gradient the same network would get
with LN in place of I-Norm (inhibition constant in both).

``--meta`` adds the meta-learned version: the framework's ES outer loop
(:func:`metaplastic.outer.evolve`, OpenAI-ES) learns the inhibitory-plasticity and error-
normalisation coefficients of an I-Norm network, starting from plain I-Norm: the weights of
the local loss's mean and variance terms (``log10``) and ``alpha, beta`` of the generalised
backward transform ``(d - alpha mean(d) - beta zh mean(d zh)) / sqrt(var(z) + 1e-5)``
(``alpha = beta = 1`` is GradNorm). Fitness: the error on held-out *training* images after a
short training run, averaged over the ``eps`` values; the learned coefficients are then trained and
tested like the other conditions (test images never enter the search).

Writes ``results.md``, ``results.json``, ``accuracy.png`` (and ``meta.png`` with ``--meta``)
under ``--out``.

Usage (repository root)::

    python scripts/inhibitory_normalization.py --meta           # Fashion-MNIST, 5 seeds
    python scripts/inhibitory_normalization.py --quick --meta   # digits, small (CI)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _study import add_meta_args, meta_split, resolve_meta_args

from metaplastic.inner import ERROR_NORM_COEFFICIENTS, EINetwork, NetState
from metaplastic.outer import evolve
from metaplastic.run import plot_evolution
from metaplastic.tasks import load_dataset, luminosity_shift, mean_ci95, train_test_arrays

CONDITIONS = ("ei", "ei_ln", "inorm", "inorm_gradnorm", "inorm_center")
EPSILONS = (0.0, 0.25, 0.5, 0.75)


# --------------------------------------------------------------------------- model
# The EI network, I-Norm, GradNorm and the luminosity shift are the library's
# (metaplastic.inner.EINetwork, metaplastic.tasks.luminosity_shift); this script trains them.

NORMS = {"ei": "none", "ei_ln": "layer"}  # every other condition is I-Norm
#: backward transforms of the I-Norm conditions: (alpha, beta, divide by the std)
BACKWARD = {
    "inorm": None,
    "inorm_gradnorm": ERROR_NORM_COEFFICIENTS["gradnorm"],
    "inorm_center": ERROR_NORM_COEFFICIENTS["center"],
}


def network(cond: str, sizes) -> EINetwork:
    """The EI network of a condition (ReLU, biases; the I-Norm error transform is passed
    per call as ``hp["back"]``, so it can be meta-learned)."""
    return EINetwork(tuple(sizes), bias=True, activation="relu", norm=NORMS.get(cond, "inorm"))


def forward(net, state, x, hp, ln_reference=False):
    """Logits, the local inhibitory loss and each hidden layer's pre-ReLU drive ``z``."""
    return net.batch_forward(
        state,
        x,
        local_weights=(hp["lam_mean"], hp["lam_var"]),
        back=hp["back"],
        layer_norm_reference=ln_reference,
    )


def task_loss(state, net, xb, yb, hp):
    logits, local, _ = forward(net, state, xb, hp)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
    return ce + local, (ce, local)


def optimizer(net, cond, args):
    """SGD with momentum; I-Norm layers' inhibitory weights (trained by the local loss only)
    use Adam at ``lr_inh``, whose bounded steps keep the large early local-loss gradients
    from clamping them to zero."""
    if not cond.startswith("inorm"):
        return optax.sgd(args.lr, momentum=0.9)
    last = net.n_layers - 1

    def labels(state):
        inh = [
            jax.tree_util.tree_map(lambda _: "inh" if i < last else "task", p)
            for i, p in enumerate(state.extra)
        ]
        task = jax.tree_util.tree_map(lambda _: "task", state)
        return NetState(W=task.W, b=task.b, extra=tuple(inh))

    return optax.multi_transform(
        {"task": optax.sgd(args.lr, momentum=0.9), "inh": optax.adam(args.lr_inh)}, labels
    )


def train(key, eps, x, y, cond, hp, args, epochs, n_train=None):
    """SGD (momentum 0.9) for ``epochs`` passes over ``x[:n_train]``; returns the weights
    and the per-epoch mean task and local losses."""
    n = x.shape[0] if n_train is None else n_train
    net = network(cond, (x.shape[1], *args.hidden, args.n_classes))
    k_init, k_data = jax.random.split(key)
    layers = net.init(k_init)
    opt = optimizer(net, cond, args)
    o = opt.init(layers)
    n_batches = n // args.batch
    grad = jax.grad(task_loss, has_aux=True)

    def step(carry, inp):
        layers, o = carry
        idx, k = inp
        xb = luminosity_shift(k, x[idx], eps)
        g, (ce, local) = grad(layers, net, xb, y[idx], hp)
        upd, o = opt.update(g, o, layers)
        layers = EINetwork.clamp(optax.apply_updates(layers, upd))
        return (layers, o), (ce, local)

    def epoch(carry, e):
        k_perm, k_shift = jax.random.split(jax.random.fold_in(k_data, e))
        perm = jax.random.permutation(k_perm, n)
        idx = perm[: n_batches * args.batch].reshape(n_batches, args.batch)
        carry, (ce, local) = jax.lax.scan(step, carry, (idx, jax.random.split(k_shift, n_batches)))
        return carry, (ce.mean(), local.mean())

    (layers, _), losses = jax.lax.scan(epoch, (layers, o), jnp.arange(epochs))
    return layers, losses


def cosine(a, b):
    a, b = a.ravel(), b.ravel()
    return jnp.dot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b) + 1e-12)


def evaluate(layers, key, eps, tx, ty, cond, hp, n_align):
    """Test accuracy, activity moments and (I-Norm) alignment with layer norm."""
    net = network(cond, (tx.shape[1], *(w.shape[0] for w in layers.W)))
    xs = luminosity_shift(key, tx, eps)
    logits, _, drives = forward(net, layers, xs, hp)
    acc = jnp.mean(jnp.argmax(logits, 1) == ty)
    means = jnp.stack([d.mean(-1) for d in drives])  # (layers, images)
    stds = jnp.stack([d.std(-1) for d in drives])
    moments = (means.mean(), means.std(-1).mean(), stds.mean())
    if not cond.startswith("inorm"):
        return acc, moments, (jnp.nan, jnp.nan)
    ln_hp = dict(hp, back=None)
    _, _, ln_drives = forward(net, layers, xs, ln_hp, ln_reference=True)
    out_cos = jnp.mean(
        jnp.stack([jax.vmap(cosine)(d, r).mean() for d, r in zip(drives, ln_drives)])
    )

    def ce(ls, ln):
        logits, _, _ = forward(net, ls, xs[:n_align], ln_hp if ln else hp, ln_reference=ln)
        return optax.softmax_cross_entropy_with_integer_labels(logits, ty[:n_align]).mean()

    g_in = jax.grad(ce)(layers, False)
    g_ln = jax.grad(ce)(layers, True)
    grad_cos = jnp.mean(
        jnp.stack([cosine(a, b) for a, b in zip(g_in.W[:-1], g_ln.W[:-1], strict=True)])
    )
    return acc, moments, (out_cos, grad_cos)


def hyper(lam_mean, lam_var, back):
    """I-Norm coefficients: the local loss's two weights and the backward transform
    ``(alpha, beta, divide)`` (``None``: plain I-Norm)."""
    return {
        "lam_mean": jnp.asarray(lam_mean, jnp.float32),
        "lam_var": jnp.asarray(lam_var, jnp.float32),
        "back": None if back is None else tuple(jnp.asarray(v, jnp.float32) for v in back),
    }


def run_condition(cond, hp, data, args, eps_values):
    """Train and test every (seed, eps) pair in parallel; returns numpy arrays."""
    x, y, tx, ty = data
    keys = jax.random.split(jax.random.key(args.seed), args.seeds)
    test_keys = jax.random.split(jax.random.key(10_000 + args.seed), len(eps_values))

    def one(key, eps, k_test):
        layers, losses = train(key, eps, x, y, cond, hp, args, args.epochs)
        return evaluate(layers, k_test, eps, tx, ty, cond, hp, args.n_align), losses

    per_eps = jax.vmap(one, in_axes=(0, None, None))  # seeds
    fn = jax.jit(jax.vmap(per_eps, in_axes=(None, 0, 0)))  # eps values
    out = fn(keys, jnp.asarray(eps_values, jnp.float32), test_keys)
    return jax.tree_util.tree_map(np.asarray, out)


# --------------------------------------------------------------------------- meta-learning


def meta_learn(data, args):
    """ES over (log10 lam_mean, log10 lam_var, alpha, beta) of an I-Norm network."""
    xt, yt, xv, yv = meta_split(data[0], data[1], args.meta_val)
    n_train, n_val = min(args.meta_train, xt.shape[0]), xv.shape[0]
    eps_values = jnp.asarray(args.eps, jnp.float32)

    def coefs(p):
        return hyper(10.0 ** p[0], 10.0 ** p[1], (p[2], p[3], 1.0))

    def error(p, key, eps):
        k_train, k_val = jax.random.split(key)
        layers, _ = train(k_train, eps, xt, yt, "inorm", coefs(p), args, 1, n_train)
        net = network("inorm", (xv.shape[1], *args.hidden, args.n_classes))
        logits, _, _ = forward(net, layers, luminosity_shift(k_val, xv, eps), coefs(p))
        err = 1.0 - jnp.mean(jnp.argmax(logits, 1) == yv)
        return jnp.where(jnp.all(jnp.isfinite(logits)), err, jnp.nan)

    def fitness(p, key):  # mean over the luminosity shifts studied
        return jnp.mean(jax.vmap(lambda e: error(p, key, e))(eps_values))

    start = jnp.array([2.0, 2.0, 0.0, 0.0], jnp.float32)  # plain I-Norm, lambda = 100
    res = evolve(
        fitness,
        start,
        jax.random.key(args.seed + 77),
        population=args.meta_population,
        generations=args.meta_generations,
        sigma=0.3,
        lr=0.1,
        desc="meta-learn I-Norm",
    )
    p = np.asarray(res.params, dtype=np.float64)
    learned = {"log10_lam_mean": p[0], "log10_lam_var": p[1], "alpha": p[2], "beta": p[3]}
    return learned, coefs(jnp.asarray(p, jnp.float32)), res.history, n_train, n_val


# --------------------------------------------------------------------------- main


def summarise(cond, out, eps_values, secs):
    (acc, moments, align), losses = out
    rows = []
    for j, eps in enumerate(eps_values):
        row = {"condition": cond, "eps": float(eps), "seconds": round(secs, 1)}
        for name, v in (
            ("test_accuracy", acc[j]),
            ("drive_mean", moments[0][j]),
            ("drive_mean_spread", moments[1][j]),
            ("drive_std", moments[2][j]),
            ("output_cos_ln", align[0][j]),
            ("grad_cos_ln", align[1][j]),
            ("final_task_loss", losses[0][j][:, -1]),
            ("final_local_loss", losses[1][j][:, -1]),
        ):
            v = np.asarray(v, dtype=np.float64)
            if np.all(np.isnan(v)):
                row[name] = None
                continue
            m, lo, hi = mean_ci95(v)
            row[name] = {"mean": m, "ci95": [lo, hi], "per_seed": v.tolist()}
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="digits, small network (CI)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, default=None, help="default 5 (quick: 3)")
    ap.add_argument("--epochs", type=int, default=None, help="default 3 (quick: 10)")
    ap.add_argument("--hidden", type=int, default=None, help="default 100 (quick: 30)")
    ap.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=CONDITIONS)
    ap.add_argument("--eps", nargs="+", type=float, default=list(EPSILONS))
    ap.add_argument("--lr", type=float, default=0.003, help="SGD rate (0.01 kills the EI baseline)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument(
        "--lr-inh", type=float, default=0.001, help="Adam rate of I-Norm inhibitory weights"
    )
    ap.add_argument("--lam", type=float, default=100.0, help="local inhibitory loss weight")
    ap.add_argument("--n-align", type=int, default=500, help="test images for gradient cosines")
    add_meta_args(ap, (4, 40), "I-Norm")
    args = ap.parse_args()
    resolve_meta_args(args)
    q = args.quick
    args.seeds = args.seeds or (3 if q else 5)
    args.epochs = args.epochs or (10 if q else 3)
    h = args.hidden or (30 if q else 100)
    args.hidden = (h, h)
    out_dir = args.out or Path("results/inhibitory_normalization" + ("_quick" if q else ""))
    out_dir.mkdir(parents=True, exist_ok=True)
    ds = load_dataset("digits" if q else "fashion_mnist")
    data = train_test_arrays(ds)
    args.n_classes = int(np.max(data[1])) + 1
    args.n_align = min(args.n_align, data[2].shape[0])
    data = tuple(jnp.asarray(a) for a in data)
    t_all = time.perf_counter()
    rows, meta = [], None
    if args.meta:
        t0 = time.perf_counter()
        learned, hp_meta, history, n_train, n_val = meta_learn(data, args)
        meta = {
            "learned": learned,
            "history": history,
            "train_images": n_train,
            "val_images": n_val,
            "eps": list(args.eps),
            "generations": args.meta_generations,
            "population": args.meta_population,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        print("meta-learned:", {k: round(v, 3) for k, v in learned.items()}, flush=True)
    todo = [(c, hyper(args.lam, args.lam, BACKWARD.get(c))) for c in args.conditions]
    if meta is not None:
        todo.append(("inorm_meta", hp_meta))
    for cond, hp in todo:
        t0 = time.perf_counter()
        res = run_condition(cond if cond != "inorm_meta" else "inorm", hp, data, args, args.eps)
        secs = time.perf_counter() - t0
        new = summarise(cond, res, args.eps, secs)
        rows += new
        accs = "  ".join(f"eps {r['eps']:.2f}: {r['test_accuracy']['mean']:.4f}" for r in new)
        print(f"{cond:16s} {accs}  ({secs:.0f} s)", flush=True)
        write(out_dir, rows, meta, args, ds.name, time.perf_counter() - t_all)  # incremental
    print((out_dir / "results.md").read_text())


def fmt(v, d=4):
    if v is None:
        return "—"
    return f"{v['mean']:.{d}f} [{v['ci95'][0]:.{d}f}, {v['ci95'][1]:.{d}f}]"


def write(out: Path, rows, meta, args, data: str, total: float) -> None:
    eps_values = sorted({r["eps"] for r in rows})
    conds = list(dict.fromkeys(r["condition"] for r in rows))
    by = {(r["condition"], r["eps"]): r for r in rows}
    lines = [
        f"Inhibitory normalisation: {data}, EI network {list(args.hidden)} (Dale's law, "
        f"n_I = 0.1 n_E), SGD (lr {args.lr}, momentum 0.9, batch {args.batch}), "
        f"{args.epochs} epochs, {args.seeds} seeds (95% CIs over seeds), local loss "
        f"lambda {args.lam}. Total {total / 60:.1f} min.",
        "",
        "Test accuracy per luminosity shift eps:",
        "",
        "| condition | " + " | ".join(f"eps = {e:g}" for e in eps_values) + " |",
        "|---|" + "---|" * len(eps_values),
    ]
    for c in conds:
        cells = [fmt(by[(c, e)]["test_accuracy"]) if (c, e) in by else "—" for e in eps_values]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    e_hi = max(eps_values)
    lines += [
        "",
        f"At eps = {e_hi:g}: moments of the hidden layers' pre-ReLU drive on the test set "
        "(mean of per-image mean across units; spread across images of that mean; mean "
        "per-image std), and cosine alignment with layer norm (I-Norm conditions):",
        "",
        "| condition | drive mean | spread of mean | drive std | output cos with LN "
        "| gradient cos with LN |",
        "|---|---|---|---|---|---|",
    ]
    for c in conds:
        r = by.get((c, e_hi))
        if r is None:
            continue
        lines.append(
            f"| {c} | {fmt(r['drive_mean'], 3)} | {fmt(r['drive_mean_spread'], 3)} | "
            f"{fmt(r['drive_std'], 3)} | {fmt(r['output_cos_ln'], 3)} | "
            f"{fmt(r['grad_cos_ln'], 3)} |"
        )
    inorm = [c for c in conds if c.startswith("inorm")]
    if inorm:
        lines += [
            "",
            "Cosine alignment with layer norm of the task-loss gradient of the hidden W_EX "
            "(I-Norm conditions; 1 = the gradient layer norm would give), per eps:",
            "",
            "| condition | " + " | ".join(f"eps = {e:g}" for e in eps_values) + " |",
            "|---|" + "---|" * len(eps_values),
        ]
        for c in inorm:
            cells = [fmt(by[(c, e)]["grad_cos_ln"], 3) if (c, e) in by else "—" for e in eps_values]
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
    if meta is not None:
        lr = meta["learned"]
        lines += [
            "",
            f"Meta-learned I-Norm (`inorm_meta`): OpenAI-ES, {meta['generations']} generations "
            f"x {meta['population']} members, fitness = error on {meta['val_images']} held-out "
            f"training images after 1 epoch on {meta['train_images']} images, averaged over "
            f"eps in {meta['eps']} ({meta['seconds'] / 60:.1f} min). Learned: local-loss weights "
            f"lambda_mean = {10 ** lr['log10_lam_mean']:.3g}, lambda_var = "
            f"{10 ** lr['log10_lam_var']:.3g}; error transform alpha = {lr['alpha']:.3f}, "
            f"beta = {lr['beta']:.3f} (GradNorm: 1, 1; plain I-Norm: 0, 0).",
        ]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(
        json.dumps({"rows": rows, "meta": meta, "args": _jsonable(vars(args))}, indent=2) + "\n"
    )
    plot(out, rows, conds, eps_values, meta)


def _jsonable(d):
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


def plot(out, rows, conds, eps_values, meta):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {(r["condition"], r["eps"]): r for r in rows}
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for c in conds:
        es = [e for e in eps_values if (c, e) in by]
        m = np.array([by[(c, e)]["test_accuracy"]["mean"] for e in es])
        lo = np.array([by[(c, e)]["test_accuracy"]["ci95"][0] for e in es])
        hi = np.array([by[(c, e)]["test_accuracy"]["ci95"][1] for e in es])
        ax.errorbar(es, m, yerr=[m - lo, hi - m], marker="o", capsize=3, label=c)
    ax.set_xlabel("luminosity shift eps")
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=110)
    plt.close(fig)
    if meta is not None:
        names = ["log10 lambda_mean", "log10 lambda_var", "alpha", "beta"]
        plot_evolution(meta["history"], names, out / "meta.png", "held-out training error")


if __name__ == "__main__":
    main()
