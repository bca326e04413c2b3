"""Inhibitory normalisation of activity and errors in EI networks (after Eyono, Levenstein,
Ghosh, Cornford & Richards 2026).

Networks 784-H-H-10 obeying Dale's law (every layer ``h = W_EX x + b - W_EI (W_IX x)`` with
``W_EX, W_IX, W_EI >= 0``, clamped after each update; ``n_I = 0.1 n_E`` inhibitory units,
one in the output layer) are trained by mini-batch SGD on Fashion-MNIST (``--quick``:
digits) under a luminosity shift: every image gets one ``Delta ~ U(-eps, eps)`` added to
all pixels, then clipped to [0, 1], in training and test, for ``eps`` in {0, 0.25, 0.5,
0.75}. The output layer is a plain EI layer trained by backprop in every condition.

Reference conditions: the authors' set-up (their public code), H = 234, ReLU, biases,
cross-entropy with label smoothing 0.1, batch 32, 30 epochs, SGD with momentum 0.5 and
decoupled weight decay 1e-6 on the task weights:

* ``ln_e`` ("LN+", the baseline of their figures): excitatory-only hidden layers
  (``W_EX``, no inhibition) followed by layer norm without affine parameters.
* ``inorm_ref``: I-Norm started as an exact layer norm (``network.inhibition_init =
  "exact"``: ``W_IX`` = the mean row of ``W_EX``, ``B_IX`` from the SVD of the centred
  ``W_EX``). Subtractive inhibition ``W_EI W_IX x`` and divisive inhibition ``sigma_I =
  sqrt(mean_j (B_IX x)_j^2 + 1e-5)`` give ``z = (W_EX x + b - W_EI W_IX x) / sigma_I``;
  ``W_EI`` is frozen; ``W_IX, B_IX`` learn only from the local loss ``L_I = 100
  mean_batch[(mean_j u_j)^2 + (var_j u_j - 1)^2]`` (``u``: ``z`` with the excitatory drive
  held constant) by SGD at 1e-4 with momentum 0.9; the task loss treats the inhibition as
  constant. Forward normalisation only.
* ``inorm_gradnorm_ref``: the same plus GradNorm, identity forward, whose backward pass maps
  the error ``d`` at ``z`` to ``(d - mean(d) - zh mean(d zh)) / sqrt(var(z) + 1e-5)``,
  ``zh = (z - mean z) / sqrt(var z + 1e-5)`` (layer norm's Jacobian at ``z``).

Ablations (the project's earlier set-up; ``--conditions``): ``ei`` (every weight by
backprop), ``ei_ln`` (EI layers + layer norm), ``inorm``, ``inorm_gradnorm``,
``inorm_center`` (``d - mean(d)`` only), all with random lognormal inhibition, every
inhibitory weight on the local loss by Adam at ``--lr-inh``, SGD momentum 0.9, no label
smoothing.

Protocol: each condition's task SGD rate is swept over ``--lrs``; every (condition, rate)
trains ``--seeds`` seeds x the ``eps`` values in parallel (``vmap``) on the training images
with ``--val`` of them held out; per condition and ``eps`` the rate with the best mean
validation accuracy is chosen and its test accuracy reported. The seeds share keys across
conditions (data order, shifts), so differences are paired over seeds; intervals are 95%
percentile bootstrap. A diverged network scores 0. Differences from the authors' set-up,
for CPU budget: 10,000 of the training images by default (``--train-images``; they use all
60,000), 30 of their 50 epochs, shuffled batches (theirs are not), four rates.

Also reported at the largest ``eps``: the moments of the hidden layers' pre-ReLU drive on the
test set and, for I-Norm, the cosine alignment with layer norm of (a) its output against
``LN(W_EX x + b - W_EI W_IX x)`` and (b) the hidden ``W_EX`` task gradient against the one
the same network would get with LN in place of I-Norm.

``--meta`` adds the meta-learned version: the framework's ES outer loop
(:func:`metaplastic.outer.evolve`, OpenAI-ES) learns the inhibitory-plasticity and error-
normalisation coefficients of an I-Norm network (ablation set-up), starting from plain
I-Norm: the weights of the local loss's mean and variance terms (``log10``) and ``alpha,
beta`` of the generalised backward transform ``(d - alpha mean(d) - beta zh mean(d zh)) /
sqrt(var(z) + 1e-5)`` (``alpha = beta = 1`` is GradNorm). Fitness: the error on held-out
*training* images after one epoch, averaged over the ``eps`` values.

Writes ``results.md``, ``results.json``, ``verdict.json``, ``accuracy.png``, ``sweep.png``
(each condition against the LN baseline at the same rate, as the paper plots it) and with
``--meta`` ``meta.png`` under ``--out``; finished (condition, rate) runs are kept in
``progress.json`` and skipped when the script runs again with the same settings.

Usage (repository root)::

    python scripts/inhibitory_normalization.py           # reference set-up, ~80 min
    python scripts/inhibitory_normalization.py --quick   # digits, small (~3 min)
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

from metaplastic.inner import ERROR_NORM_COEFFICIENTS, EINetwork, Inhibition, NetState
from metaplastic.outer import evolve
from metaplastic.run import plot_evolution
from metaplastic.tasks import (
    bootstrap_ci,
    load_dataset,
    luminosity_shift,
    paired_difference,
    train_test_arrays,
)

#: the authors' set-up (reference): E-only hidden layers + layer norm ("LN+"), and I-Norm
#: started as an exact layer norm, with and without GradNorm
REFERENCE = ("ln_e", "inorm_ref", "inorm_gradnorm_ref")
#: the project's earlier set-up, kept as ablations
ABLATIONS = ("ei", "ei_ln", "inorm", "inorm_gradnorm", "inorm_center")
CONDITIONS = REFERENCE + ABLATIONS
EPSILONS = (0.0, 0.25, 0.5, 0.75)


# --------------------------------------------------------------------------- model
# The EI network, I-Norm, GradNorm and the luminosity shift are the library's
# (metaplastic.inner.EINetwork, metaplastic.tasks.luminosity_shift); this script trains them.

NORMS = {"ei": "none", "ei_ln": "layer", "ln_e": "layer"}  # every other condition is I-Norm
#: backward transforms of the I-Norm conditions: (alpha, beta, divide by the std)
BACKWARD = {
    "inorm": None,
    "inorm_gradnorm": ERROR_NORM_COEFFICIENTS["gradnorm"],
    "inorm_center": ERROR_NORM_COEFFICIENTS["center"],
    "inorm_ref": None,
    "inorm_gradnorm_ref": ERROR_NORM_COEFFICIENTS["gradnorm"],
}


def is_inorm(cond: str) -> bool:
    return cond not in NORMS


def network(cond: str, sizes) -> EINetwork:
    """The EI network of a condition (ReLU, biases; the I-Norm error transform is passed
    per call as ``hp["back"]``, so it can be meta-learned). The reference I-Norm
    conditions start as an exact layer norm (``inhibition_init = "exact"``)."""
    init = "exact" if cond in REFERENCE and is_inorm(cond) else "random"
    return EINetwork(
        tuple(sizes),
        bias=True,
        activation="relu",
        norm=NORMS.get(cond, "inorm"),
        inhibition_init=init,
    )


def init_layers(net: EINetwork, cond: str, key) -> NetState:
    """Start weights; ``ln_e``'s hidden layers have no inhibition (``W_IX = 0``, frozen):
    the authors' "LN+" baseline is an excitatory-only network with layer norm."""
    state = net.init(key)
    if cond != "ln_e":
        return state
    last = net.n_layers - 1
    extra = tuple(
        p if i == last else Inhibition(W_IX=jnp.zeros_like(p.W_IX), W_EI=p.W_EI, B_IX=p.B_IX)
        for i, p in enumerate(state.extra)
    )
    return NetState(W=state.W, b=state.b, extra=extra)


def forward(net, state, x, hp, ln_reference=False):
    """Logits, the local inhibitory loss and each hidden layer's pre-ReLU drive ``z``."""
    return net.batch_forward(
        state,
        x,
        local_weights=(hp["lam_mean"], hp["lam_var"]),
        back=hp["back"],
        layer_norm_reference=ln_reference,
    )


def task_loss(state, net, xb, yb, hp, smoothing=0.0):
    logits, local, _ = forward(net, state, xb, hp)
    target = optax.smooth_labels(jax.nn.one_hot(yb, logits.shape[-1]), smoothing)
    ce = optax.softmax_cross_entropy(logits, target).mean()
    return ce + local, (ce, local)


def optimizer(net, cond, args, lr):
    """Reference conditions (the authors' code): SGD with momentum ``--ref-momentum`` and
    decoupled weight decay ``--ref-wd`` on the task weights; in the hidden layers ``W_EI``
    is frozen and ``W_IX, B_IX`` follow the local loss by SGD (``--ref-lr-inh``, momentum
    ``--ref-momentum-inh``); ``ln_e``'s hidden inhibition is frozen (none). Ablations: SGD
    with momentum 0.9; I-Norm inhibitory weights by Adam at ``--lr-inh``."""
    last = net.n_layers - 1
    if cond in REFERENCE:
        task = optax.chain(
            optax.sgd(lr, momentum=args.ref_momentum),
            optax.add_decayed_weights(-lr * args.ref_wd),
        )
        inh = optax.sgd(args.ref_lr_inh, momentum=args.ref_momentum_inh)
    else:
        if not is_inorm(cond):
            return optax.sgd(lr, momentum=0.9)
        task, inh = optax.sgd(lr, momentum=0.9), optax.adam(args.lr_inh)

    def hidden(p):
        if cond == "ln_e":
            return Inhibition(W_IX="frozen", W_EI="frozen", B_IX="frozen")
        w_ei = "frozen" if cond in REFERENCE else "inh"
        return Inhibition(W_IX="inh", W_EI=w_ei, B_IX="inh")

    def labels(state):
        extra = tuple(
            jax.tree_util.tree_map(lambda _: "task", p) if i == last else hidden(p)
            for i, p in enumerate(state.extra)
        )
        task_labels = jax.tree_util.tree_map(lambda _: "task", state)
        return NetState(W=task_labels.W, b=task_labels.b, extra=extra)

    return optax.multi_transform({"task": task, "inh": inh, "frozen": optax.set_to_zero()}, labels)


def train(key, eps, x, y, cond, hp, args, epochs, lr, n_train=None):
    """Mini-batch SGD for ``epochs`` passes over ``x[:n_train]``; returns the weights and
    the per-epoch mean task and local losses."""
    n = x.shape[0] if n_train is None else n_train
    net = network(cond, (x.shape[1], *args.hidden, args.n_classes))
    k_init, k_data = jax.random.split(key)
    layers = init_layers(net, cond, k_init)
    opt = optimizer(net, cond, args, lr)
    o = opt.init(layers)
    n_batches = n // args.batch
    smoothing = args.ref_smoothing if cond in REFERENCE else 0.0
    grad = jax.grad(task_loss, has_aux=True)
    signed_pool = net.inhibition_init == "exact"

    def step(carry, inp):
        layers, o = carry
        idx, k = inp
        xb = luminosity_shift(k, x[idx], eps)
        g, (ce, local) = grad(layers, net, xb, y[idx], hp, smoothing)
        upd, o = opt.update(g, o, layers)
        layers = EINetwork.clamp(optax.apply_updates(layers, upd), signed_pool)
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


def accuracy(layers, key, eps, x, y, cond, hp):
    net = network(cond, (x.shape[1], *(w.shape[0] for w in layers.W)))
    logits, _, _ = forward(net, layers, luminosity_shift(key, x, eps), hp)
    ok = jnp.all(jnp.isfinite(logits))
    return jnp.where(ok, jnp.mean(jnp.argmax(logits, 1) == y), 0.0)  # diverged: 0


def evaluate(layers, key, eps, tx, ty, cond, hp, n_align):
    """Test accuracy (0 if the network diverged), activity moments and (I-Norm) alignment
    with layer norm."""
    net = network(cond, (tx.shape[1], *(w.shape[0] for w in layers.W)))
    xs = luminosity_shift(key, tx, eps)
    logits, _, drives = forward(net, layers, xs, hp)
    acc = jnp.where(jnp.all(jnp.isfinite(logits)), jnp.mean(jnp.argmax(logits, 1) == ty), 0.0)
    means = jnp.stack([d.mean(-1) for d in drives])  # (layers, images)
    stds = jnp.stack([d.std(-1) for d in drives])
    moments = (means.mean(), means.std(-1).mean(), stds.mean())
    if not is_inorm(cond):
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


def run_condition(cond, hp, data, args, eps_values, lr):
    """Train every (seed, eps) pair in parallel at step size ``lr`` on the training images
    (validation images held out); returns numpy arrays: validation accuracy, the test
    evaluation and the losses."""
    x, y, vx, vy, tx, ty = data
    keys = jax.random.split(jax.random.key(args.seed), args.seeds)
    test_keys = jax.random.split(jax.random.key(10_000 + args.seed), len(eps_values))

    def one(key, eps, k_test):
        layers, losses = train(key, eps, x, y, cond, hp, args, args.epochs, lr)
        val = accuracy(layers, jax.random.fold_in(k_test, 1), eps, vx, vy, cond, hp)
        return val, evaluate(layers, k_test, eps, tx, ty, cond, hp, args.n_align), losses

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
        layers, _ = train(k_train, eps, xt, yt, "inorm", coefs(p), args, 1, args.lr, n_train)
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


def summarise(cond, lr, res, eps_values, secs):
    """One row per eps of a (condition, step size) run, with per-seed values."""
    val, (acc, moments, align), losses = res
    rows = []
    for j, eps in enumerate(eps_values):
        row = {"condition": cond, "lr": float(lr), "eps": float(eps), "seconds": round(secs, 1)}
        for name, v in (
            ("val_accuracy", val[j]),
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
            finite = v[np.isfinite(v)]
            m, lo, hi = bootstrap_ci(finite) if finite.size else (np.nan,) * 3
            row[name] = {"mean": m, "ci95": [lo, hi], "per_seed": v.tolist()}
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="digits, small network (smoke run)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, default=None, help="default 5 (quick: 2)")
    ap.add_argument("--epochs", type=int, default=None, help="default 30 (quick: 6)")
    ap.add_argument("--hidden", type=int, default=None, help="default 234 (quick: 30)")
    ap.add_argument(
        "--train-images",
        type=int,
        default=None,
        help="training images (default 10000 of the 50000 left after --val; quick: all)",
    )
    ap.add_argument("--val", type=int, default=None, help="validation images (default 10000)")
    ap.add_argument("--conditions", nargs="+", default=list(REFERENCE), choices=CONDITIONS)
    ap.add_argument("--eps", nargs="+", type=float, default=list(EPSILONS))
    ap.add_argument(
        "--lrs", nargs="+", type=float, default=None, help="task SGD rates swept per condition"
    )
    ap.add_argument("--lr", type=float, default=0.003, help="SGD rate of --meta's search")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr-inh", type=float, default=0.001, help="ablations: Adam rate (I-Norm)")
    ap.add_argument("--ref-momentum", type=float, default=0.5, help="reference: task momentum")
    ap.add_argument("--ref-wd", type=float, default=1e-6, help="reference: decoupled decay")
    ap.add_argument("--ref-lr-inh", type=float, default=1e-4, help="reference: W_IX, B_IX rate")
    ap.add_argument("--ref-momentum-inh", type=float, default=0.9)
    ap.add_argument("--ref-smoothing", type=float, default=0.1, help="reference: label smoothing")
    ap.add_argument("--lam", type=float, default=100.0, help="local inhibitory loss weight")
    ap.add_argument("--n-align", type=int, default=500, help="test images for gradient cosines")
    add_meta_args(ap, (4, 40), "I-Norm")
    args = ap.parse_args()
    resolve_meta_args(args)
    q = args.quick
    args.seeds = args.seeds or (2 if q else 5)
    args.epochs = args.epochs or (6 if q else 30)
    h = args.hidden or (30 if q else 234)
    args.hidden = (h, h)
    args.lrs = args.lrs or ([0.03, 0.1] if q else [0.001, 0.003, 0.01, 0.03, 0.1, 0.3])
    out_dir = args.out or Path("results/inhibitory_normalization" + ("_quick" if q else ""))
    out_dir.mkdir(parents=True, exist_ok=True)
    ds = load_dataset("digits" if q else "fashion_mnist")
    x, y, tx, ty = train_test_arrays(ds)
    args.val = args.val or (300 if q else 10_000)
    x, y, vx, vy = meta_split(x, y, args.val)
    args.train_images = args.train_images or (None if q else 10_000)
    if args.train_images:
        x, y = x[: args.train_images], y[: args.train_images]
    args.n_train = int(x.shape[0])
    args.n_classes = int(np.max(y)) + 1
    args.n_align = min(args.n_align, tx.shape[0])
    data = tuple(jnp.asarray(a) for a in (x, y, vx, vy, tx, ty))
    t_all = time.perf_counter()
    # runs are keyed by (condition, rate): more conditions or rates extend a finished run
    prog_path = out_dir / "progress.json"
    free = ("out", "conditions", "meta", "lrs")
    prog = load_progress(prog_path, args, free, {"runs": {}, "meta": None})
    if args.meta and prog.get("meta") is None:
        t0 = time.perf_counter()
        learned, _, history, n_train, n_val = meta_learn(data, args)
        prog["meta"] = {
            "learned": learned,
            "history": history,
            "train_images": n_train,
            "val_images": n_val,
            "eps": list(args.eps),
            "generations": args.meta_generations,
            "population": args.meta_population,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        prog_path.write_text(json.dumps(prog) + "\n")
    meta = prog.get("meta")
    todo = [(c, hyper(args.lam, args.lam, BACKWARD.get(c))) for c in args.conditions]
    if meta is not None:
        lr_ = meta["learned"]
        hp = hyper(
            10.0 ** lr_["log10_lam_mean"],
            10.0 ** lr_["log10_lam_var"],
            (lr_["alpha"], lr_["beta"], 1.0),
        )
        todo.append(("inorm_meta", hp))
    runs = [(c, hp, lr) for c, hp in todo for lr in args.lrs]
    bar = tqdm(total=len(runs), desc="conditions x step sizes", leave=False)
    for cond, hp, lr in runs:
        key = f"{cond}|{lr:g}"
        if key not in prog["runs"]:
            t0 = time.perf_counter()
            base = "inorm" if cond == "inorm_meta" else cond
            res = run_condition(base, hp, data, args, args.eps, lr)
            prog["runs"][key] = summarise(cond, lr, res, args.eps, time.perf_counter() - t0)
            prog_path.write_text(json.dumps(prog) + "\n")
        rows = prog["runs"][key]
        bar.update(1)
        tqdm.write(
            f"{cond:20s} lr {lr:<6g} "
            + "  ".join(
                f"eps {r['eps']:.2f}: val {r['val_accuracy']['mean']:.3f} "
                f"test {r['test_accuracy']['mean']:.3f}"
                for r in rows
            )
        )
    bar.close()
    all_rows = [r for c, _, lr in runs for r in prog["runs"][f"{c}|{lr:g}"]]
    chosen = select(all_rows)
    claims = verdicts(chosen, args)
    compute = sum(prog["runs"][f"{c}|{lr:g}"][0]["seconds"] for c, _, lr in runs)
    compute += (meta or {}).get("seconds", 0.0)  # across resumed runs too
    total = max(compute, time.perf_counter() - t_all)
    write(out_dir, all_rows, chosen, claims, meta, args, ds.name, total)
    print((out_dir / "results.md").read_text())


def select(rows) -> list[dict]:
    """Per condition and eps, the row of the step size with the best mean validation
    accuracy (the test split plays no part in the choice)."""
    best: dict = {}
    for r in rows:
        k = (r["condition"], r["eps"])
        if k not in best or r["val_accuracy"]["mean"] > best[k]["val_accuracy"]["mean"]:
            best[k] = r
    return list(best.values())


def paired(chosen, a: str, b: str, eps: float) -> dict | None:
    """Paired difference a - b of test accuracy over seeds (same keys: data order, shifts)."""
    by = {(r["condition"], r["eps"]): r for r in chosen}
    if (a, eps) not in by or (b, eps) not in by:
        return None
    return paired_difference(
        by[(a, eps)]["test_accuracy"]["per_seed"], by[(b, eps)]["test_accuracy"]["per_seed"]
    )


#: equivalence margin of "on par" claims (accuracy)
MARGIN = 0.01


def verdicts(chosen, args) -> list[dict]:
    """The paper's three claims, each judged at every eps on the tuned step sizes."""
    eps_values = sorted({r["eps"] for r in chosen})
    spec = [
        (
            "Normalising only the forward activity (I-Norm) learns worse than layer norm",
            "inorm_ref",
            "ln_e",
            lambda d: d["ci"][1] < 0,
            "I-Norm minus LN",
        ),
        (
            "Normalising the errors too (GradNorm) improves I-Norm",
            "inorm_gradnorm_ref",
            "inorm_ref",
            lambda d: d["ci"][0] > 0,
            "I-Norm + GradNorm minus I-Norm",
        ),
        (
            f"I-Norm + GradNorm is on par with layer norm (not worse by more than {MARGIN})",
            "inorm_gradnorm_ref",
            "ln_e",
            lambda d: d["ci"][0] > -MARGIN,
            "I-Norm + GradNorm minus LN",
        ),
    ]
    claims = []
    for claim, a, b, holds, what in spec:
        got = [(e, paired(chosen, a, b, e)) for e in eps_values]
        got = [(e, d) for e, d in got if d is not None]
        if not got:
            continue
        hits = sum(holds(d) for _, d in got)
        ev = "; ".join(
            f"eps {e:g}: {d['mean']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]" for e, d in got
        )
        claims.append(
            {
                "claim": claim,
                "verdict": verdict_of(hits, len(got)),
                "seeds": args.seeds,
                "evidence": f"{what}, test accuracy, paired over seeds, 95% bootstrap "
                f"interval, each at its validation-chosen step size: {ev}",
            }
        )
    return claims


def fmt(v, d=4):
    if v is None:
        return "—"
    return f"{v['mean']:.{d}f} [{v['ci95'][0]:.{d}f}, {v['ci95'][1]:.{d}f}]"


def write(out: Path, rows, chosen, claims, meta, args, data: str, total: float) -> None:
    eps_values = sorted({r["eps"] for r in rows})
    conds = list(dict.fromkeys(r["condition"] for r in rows))
    by = {(r["condition"], r["eps"]): r for r in chosen}
    lines = [
        f"Inhibitory normalisation: {data} ({args.n_train} training images, {args.val} "
        f"validation images held out of the training split, test split for reporting), "
        f"networks {list(args.hidden)} (Dale's law), batch {args.batch}, {args.epochs} epochs, "
        f"{args.seeds} seeds; task SGD rate swept over {args.lrs} per condition and chosen "
        f"per eps on validation accuracy; 95% percentile-bootstrap intervals over seeds. "
        f"Compute {total / 60:.1f} min.",
        "",
        "Test accuracy at the chosen step size (in brackets: its 95% CI; then the step):",
        "",
        "| condition | " + " | ".join(f"eps = {e:g}" for e in eps_values) + " |",
        "|---|" + "---|" * len(eps_values),
    ]
    for c in conds:
        cells = [
            f"{fmt(by[(c, e)]['test_accuracy'])} lr {by[(c, e)]['lr']:g}" if (c, e) in by else "—"
            for e in eps_values
        ]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    base = "ln_e" if "ln_e" in conds else ("ei_ln" if "ei_ln" in conds else None)
    if base is not None:
        lines += [
            "",
            f"Paired difference from {base} (test accuracy, same seeds; 95% bootstrap CI):",
            "",
            "| condition | " + " | ".join(f"eps = {e:g}" for e in eps_values) + " |",
            "|---|" + "---|" * len(eps_values),
        ]
        for c in conds:
            if c == base:
                continue
            cells = []
            for e in eps_values:
                d = paired(chosen, c, base, e)
                cells.append(
                    "—" if d is None else f"{d['mean']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]"
                )
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
    e_hi = max(eps_values)
    lines += [
        "",
        f"At eps = {e_hi:g} (chosen step sizes): moments of the hidden layers' pre-ReLU drive "
        "on the test set (mean of per-image mean across units; spread across images of that "
        "mean; mean per-image std), and cosine alignment with layer norm (I-Norm conditions):",
        "",
        "| condition | drive mean | spread of mean | drive std | output cos with LN "
        "| gradient cos with LN | final local loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in conds:
        r = by.get((c, e_hi))
        if r is None:
            continue
        lines.append(
            f"| {c} | {fmt(r['drive_mean'], 3)} | {fmt(r['drive_mean_spread'], 3)} | "
            f"{fmt(r['drive_std'], 3)} | {fmt(r['output_cos_ln'], 3)} | "
            f"{fmt(r['grad_cos_ln'], 3)} | {fmt(r['final_local_loss'], 3)} |"
        )
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
    if claims:
        lines += ["", "Verdicts:", "", *verdict_table(claims)]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(
        json.dumps(
            {"rows": rows, "chosen": chosen, "meta": meta, "args": _jsonable(vars(args))},
            indent=2,
        )
        + "\n"
    )
    if claims:
        write_verdict(out, claims, args.quick)
    plot(out, rows, chosen, conds, eps_values, meta)


def _jsonable(d):
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


def plot(out, rows, chosen, conds, eps_values, meta):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {(r["condition"], r["eps"]): r for r in chosen}
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for c in conds:
        es = [e for e in eps_values if (c, e) in by]
        m = np.array([by[(c, e)]["test_accuracy"]["mean"] for e in es])
        lo = np.array([by[(c, e)]["test_accuracy"]["ci95"][0] for e in es])
        hi = np.array([by[(c, e)]["test_accuracy"]["ci95"][1] for e in es])
        ax.errorbar(es, m, yerr=[m - lo, hi - m], marker="o", capsize=3, label=c)
    ax.set_xlabel("luminosity shift eps")
    ax.set_ylabel("test accuracy (step size chosen on validation)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=110)
    plt.close(fig)
    # the paper's view: each condition against the LN baseline at the same step size
    base = "ln_e" if "ln_e" in conds else ("ei_ln" if "ei_ln" in conds else None)
    others = [c for c in conds if c != base]
    if base is not None and others:
        run = {(r["condition"], r["lr"], r["eps"]): r for r in rows}
        fig, axes = plt.subplots(1, len(others), figsize=(4 * len(others), 3.8), squeeze=False)
        colours = plt.cm.viridis(np.linspace(0, 0.9, len(eps_values)))
        for ax, c in zip(axes[0], others, strict=True):
            for col, e in zip(colours, eps_values, strict=True):
                pts = [
                    (run[(base, lr, e)]["test_accuracy"]["mean"], r["test_accuracy"]["mean"])
                    for (cc, lr, ee), r in run.items()
                    if cc == c and ee == e and (base, lr, e) in run
                ]
                if pts:
                    xs, ys = zip(*pts)
                    ax.scatter(xs, ys, color=col, label=f"eps {e:g}")
            lim = [0, 1]
            ax.plot(lim, lim, "k--", lw=0.8)
            ax.set_xlabel(f"{base} test accuracy")
            ax.set_ylabel(f"{c} test accuracy")
            ax.set_title("one point per step size", fontsize=8)
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "sweep.png", dpi=110)
        plt.close(fig)
    if meta is not None:
        names = ["log10 lambda_mean", "log10 lambda_var", "alpha", "beta"]
        plot_evolution(meta["history"], names, out / "meta.png", "held-out training error")


if __name__ == "__main__":
    main()
