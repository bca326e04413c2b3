"""Oja's rule under biological constraints (Shervani-Tabar, Mirhoseini & Rosenbaum,
arXiv 2408.08408): does adding an Oja term help online learning in deep or poorly
initialised networks, with backprop and with feedback alignment?

Set-up (all online, batch 1): each episode learns a fresh network on a stream of
``n_way * k_shot`` images presented once (10-way: every class, labels permuted per episode),
then is tested on ``n_way * q_query`` query images. Held-out episodes use images the meta-
training never saw (the data set's test split).

Conditions (network shape and initial weight scale, a multiple of Xavier-uniform):
``standard`` (3 hidden layers of 100, scale 1), ``deep`` (8 hidden layers), ``small init``
(scale 0.3) and ``large init`` (scale 3). Methods: backprop, backprop + Oja, FA, FA + Oja,
where "+ Oja" adds ``theta_oja (y x^T - y y^T W)`` to the pseudo-gradient step at every
layer. The step size of each plain method is meta-learned by the framework's gradient
outer loop on meta-train episodes. The Oja coefficient is then, by default (``--oja grid``),
chosen from a grid that includes 0 by mean accuracy on validation episodes drawn from the
meta-train images, with the learned step size kept; nothing is chosen on held-out images.
``--oja meta`` meta-learns the Oja coefficient together with the step size instead (with
``train.grad_limit = --grad-limit``; the plain methods are trained as in the default mode).
Without the gradient limit that outer loop failed at full size (backprop + Oja diverged;
FA + Oja's coefficients never moved from their start because its finite meta-gradients of
~1e21 overflowed when squared; see ``results/oja_constraints_meta_partial/``).

Reported: held-out query accuracy (mean and Student-t 95% CI over episodes), and the
effective rank (participation ratio ``(sum l)^2 / sum l^2`` of the covariance eigenvalues)
of the last hidden layer's activity on the query images after learning, as the
activation-subspace statistic. Writes ``results.md``, ``results.json`` and
``accuracy.png`` under ``--out``.

Usage (repository root)::

    python scripts/oja_constraints.py            # Fashion-MNIST, ~25 min on 2 CPU cores
    python scripts/oja_constraints.py --quick    # digits, small, ~2 min (CI runs this)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from metaplastic.export import read_rule_file
from metaplastic.inner import run_episode
from metaplastic.run import (
    build_config,
    build_rule,
    build_setup,
    eval_key,
    keep_failed,
    train,
    validation_key,
)
from metaplastic.tasks import evaluate_rule, mean_ci95

METHODS = {  # label: (rule preset, feedback)
    "backprop": ("pseudo_gradient", "backprop"),
    "backprop + Oja": ("oja_pool", "backprop"),
    "FA": ("pseudo_gradient", "fa"),
    "FA + Oja": ("oja_pool", "fa"),
}


#: Oja coefficients tried by ``--oja grid`` (0 = the plain method)
OJA_GRID = (0.0, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, -1e-4, -3e-4, -1e-3, -3e-3, -1e-2, -3e-2)


def conditions(quick: bool) -> dict[str, dict]:
    width, depth = (32, 2) if quick else (100, 3)
    deep = 5 if quick else 8
    out = {
        "standard": {"hidden": [width] * depth, "init_scale": 1.0},
        "deep": {"hidden": [width] * deep, "init_scale": 1.0},
        "small init": {"hidden": [width] * depth, "init_scale": 0.3},
        "large init": {"hidden": [width] * depth, "init_scale": 3.0},
    }
    return {"standard": out["standard"], "deep": out["deep"]} if quick else out


def rule_file(out: Path) -> Path:
    p = out / "oja_pool.toml"
    p.write_text(
        '[rule]\nkind = "term_pool"\nterms = ["pseudo_gradient", "oja"]\n'
        "init = [0.03, 0.0]\nshared = true\n"
    )
    return p


def task_file(out: Path, quick: bool) -> Path:
    p = out / ("task_quick.toml" if quick else "task.toml")
    if quick:
        p.write_text(
            '[task]\ndataset = "digits"\nn_way = 10\nk_shot = 15\nq_query = 10\n'
            "[network]\nhidden = [32, 32]\n"
        )
    else:
        p.write_text(
            '[task]\ndataset = "fashion_mnist"\nn_way = 10\nk_shot = 60\nq_query = 20\n'
            "[network]\nhidden = [100, 100, 100]\n"
        )
    return p


@eqx.filter_jit
def _final_hidden(problem, rule, keys):
    """Last hidden layer's activity on the query images after each episode's learning."""

    def one(k):
        k_task, k_net = jax.random.split(k)
        ep = problem.task.sample(k_task, problem.pool)
        res = run_episode(rule, problem.net, problem.feedback, k_net, ep)
        hs = jax.vmap(lambda x: problem.net.forward(res.state, x))(ep.query_x)
        return hs[-2], res.query_accuracy

    return jax.vmap(one)(keys)


def effective_rank(h: np.ndarray) -> float:
    """Participation ratio of the covariance eigenvalues (NaN if the activity blew up)."""
    h = np.asarray(h, np.float64)
    if not np.all(np.isfinite(h)):
        return float("nan")
    h = h - h.mean(axis=0, keepdims=True)
    try:
        lam = np.clip(np.linalg.eigvalsh(h.T @ h / max(1, h.shape[0] - 1)), 0.0, None)
    except np.linalg.LinAlgError:
        return float("nan")
    return float(lam.sum() ** 2 / (np.sum(lam**2) + 1e-30))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small CI-sized run on digits")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--episodes", type=int, default=None, help="meta-training episodes")
    ap.add_argument("--eval-episodes", type=int, default=None)
    ap.add_argument("--conditions", nargs="+", default=None, help="subset of the conditions")
    ap.add_argument(
        "--oja",
        choices=("grid", "meta"),
        default="grid",
        help="how the Oja coefficient is set: grid search on meta-train episodes (default) "
        "or meta-learned together with the step size",
    )
    ap.add_argument("--tune-episodes", type=int, default=None, help="per grid point")
    ap.add_argument(
        "--grad-limit",
        type=float,
        default=1e12,
        help="train.grad_limit of the '+ Oja' meta-learning runs (--oja meta; 0 = off)",
    )
    ap.add_argument(
        "--reuse-runs",
        action="store_true",
        help="reuse finished meta-training runs (summary.json) under OUT/runs instead of "
        "training again (only valid if they were made with the same settings)",
    )
    args = ap.parse_args()
    out = args.out or Path("results/oja_constraints" + ("_quick" if args.quick else ""))
    out.mkdir(parents=True, exist_ok=True)
    episodes = args.episodes or (64 if args.quick else 320)
    n_eval = args.eval_episodes or (32 if args.quick else 200)
    args.tune_episodes = args.tune_episodes or (16 if args.quick else 64)
    rules = {"pseudo_gradient": "pseudo_gradient", "oja_pool": str(rule_file(out))}
    task = str(task_file(out, args.quick))
    rows = []
    t_start = time.perf_counter()
    conds = conditions(args.quick)
    if args.conditions:
        unknown = set(args.conditions) - set(conds)
        if unknown:
            ap.error(f"unknown condition(s) {sorted(unknown)}; choose from {sorted(conds)}")
        conds = {k: v for k, v in conds.items() if k in args.conditions}
    for cname, cond in conds.items():
        for mname, (rule, feedback) in METHODS.items():
            plus_oja = rule == "oja_pool"
            if plus_oja and args.oja == "grid":
                continue  # done with the plain method below
            t0 = time.perf_counter()
            limit = args.grad_limit if plus_oja else 0.0
            cfg = make_config(rules[rule], task, feedback, cond, args, episodes, n_eval, limit)
            run_dir = out / "runs" / f"{cname}-{mname}".replace(" ", "_").replace("+", "plus")
            done = run_dir / "summary.json"
            if args.reuse_runs and done.exists():  # a finished meta-training run
                s = json.loads(done.read_text())
                print(f"reusing {run_dir}", flush=True)
            else:
                s = keep_failed(train, cfg, run_dir, progress=False, label=mname, evaluate=False)
            if not (run_dir / "rule.json").exists():  # the run refused or failed: say why
                print(f"{cname:11s} {mname:15s} failed: {s['status']}", flush=True)
                rows.append(failed_row(cname, mname, cond, s["status"]))
                if args.oja == "grid":
                    why = f"not run: the {mname} run has no step size to keep"
                    rows.append(failed_row(cname, mname + " + Oja", cond, why))
                write(out, rows, args, episodes, n_eval, time.perf_counter() - t_start)
                continue
            rule_obj = read_rule_file(run_dir)
            setup = build_setup(cfg)
            row = evaluate(cfg, setup, rule_obj, cname, mname, cond, s["coefficients"], t0)
            if s.get("status", "ok") != "ok":  # a rule, from a run that failed its checks
                row["run_status"] = s["status"]
            rows.append(row)
            write(out, rows, args, episodes, n_eval, time.perf_counter() - t_start)
            if args.oja == "grid":  # + Oja: the learned step size, the Oja coefficient tuned
                t0 = time.perf_counter()
                cfg_oja = make_config(
                    rules["oja_pool"], task, feedback, cond, args, episodes, n_eval
                )
                setup_oja = build_setup(cfg_oja)  # same data and network as `setup`
                step = s["coefficients"]["pseudo_gradient"]
                best, curve = tune_oja(cfg_oja, setup_oja, step, args)
                coefs = {"pseudo_gradient": step, "oja": best}
                rule_oja = pool_rule(cfg_oja, setup_oja, coefs)
                row = evaluate(
                    cfg_oja, setup_oja, rule_oja, cname, mname + " + Oja", cond, coefs, t0
                )
                row["oja_grid"] = curve
                if s.get("status", "ok") != "ok":  # its step size comes from a failed run
                    row["run_status"] = s["status"]
                rows.append(row)
                write(out, rows, args, episodes, n_eval, time.perf_counter() - t_start)
    print((out / "results.md").read_text())


def make_config(rule, task, feedback, cond, args, episodes, n_eval, grad_limit=0.0):
    return build_config(
        rule,
        task,
        {
            "feedback": feedback,
            "episodes": episodes,
            "meta_batch": 8,
            "lr": 0.003,
            "seed": args.seed,
            "eval_episodes": n_eval,
            "checkpoint_every": 0,
        },
        [
            f"network.hidden={cond['hidden']}",
            f"network.init_scale={cond['init_scale']}",
            f"train.grad_limit={grad_limit}",
        ],
    )


def pool_rule(cfg, setup, coefs):
    """The (pseudo_gradient, oja) pool rule with the given coefficients."""
    base = build_rule(cfg, setup.net.n_layers)
    theta = jnp.asarray([coefs["pseudo_gradient"], coefs["oja"]], jnp.float32)
    return eqx.tree_at(lambda r: r.theta, base, theta)


def tune_oja(cfg, setup, step, args):
    """Grid search of the Oja coefficient (step size fixed) by mean accuracy on validation
    episodes drawn from the meta-train images; 0 is in the grid, so "+ Oja" can fall back
    to the plain method. Returns the best coefficient and the whole curve."""
    problem = setup.problem(cfg, "train")
    curve = []
    for g in OJA_GRID:
        acc = evaluate_rule(
            problem,
            pool_rule(cfg, setup, {"pseudo_gradient": step, "oja": g}),
            validation_key(cfg),
            args.tune_episodes,
        )
        curve.append({"oja": g, "val_accuracy": float(np.mean(np.nan_to_num(acc, nan=0.0)))})
    best = max(curve, key=lambda c: (c["val_accuracy"], -abs(c["oja"])))
    return best["oja"], curve


def failed_row(cname, mname, cond, status: str) -> dict:
    """The row of a method whose meta-training run failed (no rule to evaluate)."""
    nan = float("nan")
    return {
        "condition": cname,
        "method": mname,
        "accuracy": nan,
        "ci95": [nan, nan],
        "effective_rank": nan,
        "effective_rank_ci95": [nan, nan],
        "width": cond["hidden"][-1],
        "coefficients": {},
        "status": status,
    }


def evaluate(cfg, setup, rule_obj, cname, mname, cond, coefficients, t0):
    """Held-out accuracy and effective rank of one rule on the test-split episodes."""
    problem = setup.problem(cfg, "test")
    n_eval = cfg.train.eval_episodes
    keys = jax.random.split(eval_key(cfg), n_eval)
    hid, acc = _final_hidden(problem, rule_obj, keys)
    acc = np.asarray(acc)
    ok = np.isfinite(acc)
    m, lo, hi = mean_ci95(np.where(ok, acc, 0.0))
    ranks = [effective_rank(h) for h, o in zip(np.asarray(hid), ok, strict=True) if o]
    ranks = [r for r in ranks if np.isfinite(r)]
    r_m, r_lo, r_hi = mean_ci95(ranks) if ranks else (float("nan"),) * 3
    row = {
        "condition": cname,
        "method": mname,
        "accuracy": m,
        "ci95": [lo, hi],
        "effective_rank": r_m,
        "effective_rank_ci95": [r_lo, r_hi],
        "width": cond["hidden"][-1],
        "coefficients": coefficients,
        "diverged_episodes": int((~ok).sum()),
        "rank_episodes": len(ranks),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(
        f"{cname:11s} {mname:15s} acc {m:.3f} [{lo:.3f}, {hi:.3f}]  "
        f"eff. rank {r_m:.1f}  coef {coefficients}  ({row['seconds']:.0f} s)",
        flush=True,
    )
    return row


def write(out: Path, rows, args, episodes: int, n_eval: int, total_s: float) -> None:
    data = "digits" if args.quick else "Fashion-MNIST"
    lines = [
        f"Oja's rule under constraints: {data}, online (batch 1), seed {args.seed}, "
        f"{episodes} meta-training episodes per method, {n_eval} held-out episodes "
        f"(test-split images), 95% CIs over episodes. Total {total_s / 60:.1f} min.",
        "",
        "| condition | method | held-out accuracy | 95% CI | effective rank (last hidden) "
        "| learned coefficients |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "status" in r:  # failed: the reason, cut at its first clause
            why = r["status"].split(";")[0]
            lines.append(f"| {r['condition']} | {r['method']} | — | — | — | {why} |")
            continue
        coef = ", ".join(f"{k} {v:.4g}" for k, v in r["coefficients"].items())
        if "run_status" in r:  # the learned rule of a run that failed its checks
            coef += f" (run failed: {r['run_status'].split(':')[0]})"
        lines.append(
            f"| {r['condition']} | {r['method']} | {r['accuracy']:.3f} | "
            f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] | {r['effective_rank']:.1f} "
            f"(of {r['width']}) | {coef} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot(out, rows)
    print("\n".join(lines))


def plot(out: Path, rows) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conds = list(dict.fromkeys(r["condition"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, ax = plt.subplots(figsize=(1.8 * len(conds) + 2, 3.8))
    w = 0.8 / len(methods)
    for j, m in enumerate(methods):
        by = {r["condition"]: r for r in rows if r["method"] == m}
        nan = {"accuracy": np.nan, "ci95": [np.nan, np.nan]}  # not run (yet)
        sel = [by.get(c, nan) for c in conds]
        acc = np.array([r["accuracy"] for r in sel])
        err = np.array([[a - r["ci95"][0], r["ci95"][1] - a] for a, r in zip(acc, sel)]).T
        ax.bar(np.arange(len(conds)) + j * w, acc, w, yerr=err, capsize=3, label=m)
    ax.set_xticks(np.arange(len(conds)) + 0.4 - w / 2, conds)
    ax.set_ylabel("held-out query accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
