"""Oja's rule under biological constraints (Shervani-Tabar, Mirhoseini & Rosenbaum,
arXiv 2408.08408): does adding an Oja term help online learning in deep or poorly
initialised networks, with backprop and with feedback alignment?

Set-up (all online, batch 1): each episode learns a fresh network on a stream of
``n_way * k_shot`` images presented once (10-way: every class, labels permuted per episode),
then is tested on ``n_way * q_query`` query images. Conditions (network shape and initial
weight scale, a multiple of Xavier-uniform): ``standard`` (3 hidden layers of 100, scale 1),
``deep`` (8 hidden layers), ``small init`` (scale 0.3) and ``large init`` (scale 3). Methods:
backprop, backprop + Oja, FA, FA + Oja, where "+ Oja" adds ``theta (y x^T - y y^T W)`` to the
step ``eta * (pseudo-gradient)`` at every layer.

Tuning protocol (the same for every method and condition):

* Both hyperparameters are searched jointly on **validation episodes** (images of the
  meta-train side that the test never sees), with the **same budget** for every method:
  ``B`` configurations each. A plain method has one hyperparameter, so its ``B`` points are
  a fine log grid of the step ``eta``; a "+ Oja" method gets a coarser ``eta`` grid (a
  subset of the plain grid) crossed with ``theta`` values, 0 included, so it can fall back
  to the plain method. The configuration with the best mean validation accuracy wins.
* Diverged episodes (non-finite weights or outputs) score 0 and are counted; they never pass
  as a class guess.
* The winners are tested on **held-out episodes** (test-split images) in ``--seeds``
  independent groups (seed ``s``: its own networks and episodes); plain and "+ Oja" see the
  same episodes, so their difference is **paired**. Reported: mean accuracy with a
  percentile-bootstrap 95% interval, the paired difference "+ Oja minus plain" with its
  bootstrap interval over episodes, and how many seeds favour each side.
* ``--meta``: the paper's own route, the Oja coefficient meta-learned together with the step
  by the framework's gradient outer loop (start: the tuned plain step, theta 0; train
  ``grad_limit`` on), on ``--meta-seeds`` meta-training seeds, tested on the same episodes.
  The outer loop's step size is tuned too: one meta-training run per value of
  ``--meta-lrs``, the best on the validation episodes tested (runs that passed their own
  divergence checks first).

Also reported: the effective rank (participation ratio ``(sum l)^2 / sum l^2`` of the
covariance eigenvalues) of the last hidden layer's activity on the query images after
learning (seed 0), the paper's activation-subspace statistic.

Writes ``results.md``, ``results.json``, ``verdict.json``, ``accuracy.png`` and
``tuning.png`` under ``--out``; a finished (condition, method) is kept in ``progress.json``
and skipped when the script is run again with the same settings (resume after a stop).

Usage (repository root)::

    python scripts/oja_constraints.py --meta   # Fashion-MNIST, 5 seeds, ~75 min on 2 cores
    python scripts/oja_constraints.py --quick  # digits, small, ~2 min
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
from _study import load_progress, verdict_of, verdict_table, write_verdict
from tqdm.auto import tqdm

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
from metaplastic.tasks import bootstrap_ci, evaluate_outcomes, paired_difference

FEEDBACKS = {"backprop": "backprop", "FA": "fa"}
#: a "+ Oja" method's Oja coefficients (0 = its plain method); log-spaced over the stable
#: range: on validation, theta >= 1e-2 diverged in every condition
OJA_VALUES = (0.0, 3e-4, 1e-3, 3e-3)
OJA_VALUES_QUICK = (0.0, 1e-2)
ETA_RANGE = (1e-3, 0.3)


def eta_grids(budget_oja: int, n_theta: int) -> tuple[np.ndarray, np.ndarray]:
    """(plain grid, "+ Oja" grid of eta): the plain method gets ``budget`` log-spaced step
    sizes; "+ Oja" gets ``budget / n_theta`` of them (every k-th, ends kept), so both
    searches evaluate the same number of configurations."""
    fine = np.geomspace(*ETA_RANGE, budget_oja)
    n = budget_oja // n_theta
    coarse = fine[np.round(np.linspace(0, budget_oja - 1, n)).astype(int)]
    return fine, coarse


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


def make_config(
    rule, task, feedback, cond, seed, episodes=10, n_eval=10, grad_limit=0.0, init=None, lr=3e-3
):
    return build_config(
        rule,
        task,
        {
            "feedback": feedback,
            "episodes": episodes,
            "meta_batch": 8,
            "lr": lr,
            "seed": seed,
            "eval_episodes": n_eval,
            "checkpoint_every": 0,
        },
        [
            f"network.hidden={cond['hidden']}",
            f"network.init_scale={cond['init_scale']}",
            f"train.grad_limit={grad_limit}",
            *([f"rule.init={list(init)}"] if init is not None else []),
        ],
    )


def pool_rule(cfg, setup, eta: float, theta: float):
    """The (pseudo_gradient, oja) pool rule with coefficients ``(eta, theta)``."""
    base = build_rule(cfg, setup.net.n_layers)
    return eqx.tree_at(lambda r: r.theta, base, jnp.asarray([eta, theta], jnp.float32))


@eqx.filter_jit
def _final_hidden(problem, rule, keys):
    """Last hidden layer's activity on the query images after each episode's learning."""

    def one(k):
        k_task, k_net = jax.random.split(k)
        ep = problem.task.sample(k_task, problem.pool)
        res = run_episode(rule, problem.net, problem.feedback, k_net, ep)
        hs = jax.vmap(lambda x: problem.net.forward(res.state, x))(ep.query_x)
        return hs[-2]

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


def _grid_of(row: dict | None) -> list[tuple[float, float]] | None:
    """The ``(eta, theta)`` grid a finished row was tuned on (None: no row)."""
    return None if row is None else [(p["eta"], p["oja"]) for p in row["tuning"]]


def validate(problem, cfg, rule, episodes: int) -> dict:
    """``rule``'s mean accuracy on the validation episodes (diverged episodes score 0)."""
    acc, bad = evaluate_outcomes(problem, rule, validation_key(cfg), episodes)
    return {"val_accuracy": float(np.mean(acc)), "val_diverged": int(np.sum(bad))}


def tune(cfg, setup, grid, episodes: int):
    """Mean validation accuracy of every ``(eta, theta)`` in ``grid`` (diverged episodes
    score 0); returns the curve and the best point (ties: smaller |theta|, then eta)."""
    problem = setup.problem(cfg, "train")
    curve = []
    for eta, theta in grid:
        rule = pool_rule(cfg, setup, eta, theta)
        curve.append(
            {"eta": float(eta), "oja": float(theta), **validate(problem, cfg, rule, episodes)}
        )
    best = max(curve, key=lambda c: (c["val_accuracy"], -abs(c["oja"]), -c["eta"]))
    return curve, best


def test(cfg, setup, rule, seeds: int, episodes: int, rank: bool) -> dict:
    """Held-out accuracy per episode for ``seeds`` groups of ``episodes`` (same keys for
    every method: paired), diverged counts, and the effective rank on seed 0."""
    problem = setup.problem(cfg, "test")
    acc, bad = [], []
    for s in range(seeds):
        a, d = evaluate_outcomes(problem, rule, jax.random.fold_in(eval_key(cfg), s), episodes)
        acc.append(a.tolist())
        bad.append(int(d.sum()))
    out = {"accuracy_per_episode": acc, "diverged": bad}
    if rank:
        hid = np.asarray(_final_hidden(problem, rule, jax.random.split(eval_key(cfg), 32)))
        ranks = [r for r in (effective_rank(h) for h in hid) if np.isfinite(r)]
        out["effective_rank"] = float(np.mean(ranks)) if ranks else float("nan")
    return out


def summarise(row: dict, plain: dict | None) -> dict:
    """Accuracy with its bootstrap interval, per-seed means and, against ``plain``, the
    paired difference over episodes and the seeds' sign agreement."""
    per_ep = np.asarray(row["accuracy_per_episode"])
    m, lo, hi = bootstrap_ci(per_ep.ravel())
    row["accuracy"], row["ci95"] = m, [lo, hi]
    row["seed_means"] = per_ep.mean(axis=1).tolist()
    if plain is not None:
        base = np.asarray(plain["accuracy_per_episode"])
        d = paired_difference(per_ep.ravel(), base.ravel())
        seeds = per_ep.mean(axis=1) - base.mean(axis=1)
        d["seeds_better"] = int(np.sum(seeds > 0))
        d["seeds_worse"] = int(np.sum(seeds < 0))
        row["vs_plain"] = d
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small smoke run on digits")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=0, help="base seed of every key")
    ap.add_argument("--seeds", type=int, default=None, help="test seeds (default 5; quick 2)")
    ap.add_argument("--eval-episodes", type=int, default=None, help="per test seed")
    ap.add_argument("--tune-episodes", type=int, default=None, help="per configuration")
    ap.add_argument("--budget", type=int, default=None, help="configurations per method")
    ap.add_argument("--conditions", nargs="+", default=None, help="subset of the conditions")
    ap.add_argument("--meta", action="store_true", help="add the meta-learned Oja rows")
    ap.add_argument("--meta-seeds", type=int, default=3)
    ap.add_argument("--meta-episodes", type=int, default=None, help="default 320 (quick 16)")
    ap.add_argument("--meta-conditions", nargs="+", default=["standard", "deep"])
    ap.add_argument(
        "--meta-lrs",
        nargs="+",
        type=float,
        default=None,
        help="outer-loop step sizes tried per meta seed, chosen on validation "
        "(default 3e-3 3e-4 1e-4; quick 3e-3 3e-4)",
    )
    ap.add_argument("--grad-limit", type=float, default=1e12, help="train.grad_limit (--meta)")
    args = ap.parse_args()
    q = args.quick
    out = args.out or Path("results/oja_constraints" + ("_quick" if q else ""))
    out.mkdir(parents=True, exist_ok=True)
    args.seeds = args.seeds or (2 if q else 5)
    args.eval_episodes = args.eval_episodes or (16 if q else 100)
    args.tune_episodes = args.tune_episodes or (8 if q else 32)
    thetas = OJA_VALUES_QUICK if q else OJA_VALUES
    args.budget = args.budget or (4 if q else 24)
    if args.budget % len(thetas):
        ap.error(f"--budget must be a multiple of {len(thetas)} (the Oja values)")
    args.meta_episodes = args.meta_episodes or (16 if q else 320)
    args.meta_lrs = args.meta_lrs or ([3e-3, 3e-4] if q else [3e-3, 3e-4, 1e-4])
    if min(args.meta_lrs) <= 0:
        ap.error("--meta-lrs must be positive")
    conds = conditions(q)
    for name in (args.conditions or []) + (args.meta_conditions if args.meta else []):
        if name not in conds:
            ap.error(f"unknown condition {name!r}; choose from {sorted(conds)}")
    if args.conditions:
        conds = {k: v for k, v in conds.items() if k in args.conditions}
    fine, coarse = eta_grids(args.budget, len(thetas))
    grids = {
        "plain": [(float(e), 0.0) for e in fine],
        "oja": [(float(e), float(t)) for e in coarse for t in thetas],
    }
    prog_path = out / "progress.json"
    free = ("out", "conditions", "meta", "meta_seeds", "meta_conditions", "meta_lrs")
    prog = load_progress(prog_path, args, free, {"rows": {}, "meta_runs": {}})
    rule_path, task = str(rule_file(out)), str(task_file(out, q))
    t_start = time.perf_counter()
    todo = [(c, fb) for c in conds for fb in FEEDBACKS]
    bar = tqdm(total=len(todo) * 2, desc="tune + test", leave=False)
    for cname, fb in todo:
        cfg = make_config(rule_path, task, FEEDBACKS[fb], conds[cname], args.seed)
        setup = build_setup(cfg)
        plain_row = None
        for kind, label in (("plain", fb), ("oja", fb + " + Oja")):
            key = f"{cname}|{label}"
            if _grid_of(prog["rows"].get(key)) != grids[kind]:  # absent, or another grid
                t0 = time.perf_counter()
                curve, best = tune(cfg, setup, grids[kind], args.tune_episodes)
                rule = pool_rule(cfg, setup, best["eta"], best["oja"])
                res = test(cfg, setup, rule, args.seeds, args.eval_episodes, rank=True)
                prog["rows"][key] = {
                    "condition": cname,
                    "method": label,
                    "width": conds[cname]["hidden"][-1],
                    "coefficients": {"pseudo_gradient": best["eta"], "oja": best["oja"]},
                    "tuning": curve,
                    "seconds": round(time.perf_counter() - t0, 1),
                    **res,
                }
                prog_path.write_text(json.dumps(prog) + "\n")
            row = prog["rows"][key]
            summarise(row, plain_row)
            plain_row = plain_row or row
            bar.update(1)
            tqdm.write(line(row))
    bar.close()
    if args.meta:
        meta_rows(args, prog, prog_path, rule_path, task, conds)
    rows = list(prog["rows"].values())
    for r in rows:  # re-summarise against each row's plain method
        base = prog["rows"].get(f"{r['condition']}|{r['method'].split(' ')[0]}")
        summarise(r, None if base is r else base)
    claims = verdicts(rows, args)
    compute_s = sum(r.get("seconds") or 0.0 for r in rows)  # across resumed runs too
    write(out, rows, claims, args, max(compute_s, time.perf_counter() - t_start))


def meta_rows(args, prog, prog_path, rule_path, task, conds) -> None:
    """The Oja coefficient meta-learned with the step size (backprop), per meta seed.

    The outer loop's Adam step moves every coefficient by about ``lr`` per meta-step, so
    ``lr`` sets how far theta can travel; it is tuned like every other hyperparameter: one
    meta-training run per value of ``--meta-lrs``, each scored on the validation episodes
    (diverged episodes 0), and the best run (runs that passed their own checks first) is the
    one tested. Every candidate is kept in ``progress.json`` under ``meta_runs``."""
    runs = prog.setdefault("meta_runs", {})
    for cname in args.meta_conditions:
        base = prog["rows"].get(f"{cname}|backprop")
        if base is None:
            continue
        eta0 = base["coefficients"]["pseudo_gradient"]
        cfg_test = make_config(rule_path, task, "backprop", conds[cname], args.seed)
        setup = build_setup(cfg_test)
        val_problem = setup.problem(cfg_test, "train")
        for ms in range(args.meta_seeds):
            cands = []
            for lr in args.meta_lrs:
                ckey = f"{cname}|{ms}|{lr:g}"
                rdir = prog_path.parent / "runs" / f"{cname}-meta-{ms}-lr{lr:g}".replace(" ", "_")
                if ckey not in runs:
                    t0 = time.perf_counter()
                    cfg = make_config(
                        rule_path,
                        task,
                        "backprop",
                        conds[cname],
                        args.seed + 100 + ms,
                        args.meta_episodes,
                        16,
                        args.grad_limit,
                        init=(eta0, 0.0),
                        lr=lr,
                    )
                    s = keep_failed(train, cfg, rdir, progress=False, label="meta", evaluate=False)
                    runs[ckey] = {
                        "meta_lr": lr,
                        "run_status": s.get("status", "ok"),
                        "coefficients": s.get("coefficients", {}),
                        "seconds": round(time.perf_counter() - t0, 1),
                    }
                c = runs[ckey]
                if "val_accuracy" not in c and (rdir / "rule.json").exists():
                    c.update(
                        validate(val_problem, cfg_test, read_rule_file(rdir), args.tune_episodes)
                    )
                prog_path.write_text(json.dumps(prog) + "\n")
                cands.append((c, rdir))
            _pick_meta(args, prog, prog_path, cname, ms, cands, cfg_test, setup, base)


def _pick_meta(args, prog, prog_path, cname, ms, cands, cfg_test, setup, base) -> None:
    """Test the validation-best candidate of one meta seed (once) as its row."""
    key = f"{cname}|backprop + Oja (meta-learned)|{ms}"
    scored = [(c, d) for c, d in cands if "val_accuracy" in c]
    row = {
        "condition": cname,
        "method": "backprop + Oja (meta-learned)",
        "meta_seed": ms,
        "width": base["width"],
        "candidates": [{k: v for k, v in c.items() if k != "test"} for c, _ in cands],
    }
    if not scored:  # no run left a rule
        row.update(run_status=cands[0][0]["run_status"], seconds=None)
        prog["rows"][key] = row
        prog_path.write_text(json.dumps(prog) + "\n")
        print(f"{cname} meta seed {ms}: no rule ({row['run_status']})", flush=True)
        return
    best, rdir = max(scored, key=lambda x: (x[0]["run_status"] == "ok", x[0]["val_accuracy"]))
    if "test" not in best:  # kept with the candidate: a later resume does not test again
        best["test"] = test(
            cfg_test, setup, read_rule_file(rdir), args.seeds, args.eval_episodes, True
        )
    row.update(
        meta_lr=best["meta_lr"],
        run_status=best["run_status"],
        coefficients=best["coefficients"],
        seconds=sum(c.get("seconds") or 0.0 for c, _ in cands),
        **best["test"],
    )
    prog["rows"][key] = row
    prog_path.write_text(json.dumps(prog) + "\n")
    print(line(summarise(row, base)), flush=True)


def line(r: dict) -> str:
    c = r.get("coefficients", {})
    txt = f"{r['condition']:11s} {r['method']:30s} acc {r['accuracy']:.3f} "
    txt += f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] eta {c.get('pseudo_gradient', 0):.4g} "
    txt += f"oja {c.get('oja', 0):.3g} diverged {sum(r['diverged'])}"
    if "vs_plain" in r:
        d = r["vs_plain"]
        txt += f"  vs plain {d['mean']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]"
    return txt


def _better(rows, cond, method) -> tuple[bool, str] | None:
    """(significantly better than plain?, the evidence) of one row, or None if absent."""
    r = next((x for x in rows if x["condition"] == cond and x["method"] == method), None)
    if r is None or "vs_plain" not in r:
        return None
    d = r["vs_plain"]
    ok = d["significant"] and d["mean"] > 0
    ev = (
        f"{cond}: {d['mean']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}], "
        f"{d['seeds_better']}/{len(r['seed_means'])} seeds better"
    )
    return ok, ev


def verdicts(rows, args) -> list[dict]:
    """One claim per headline of the paper, judged on the paired differences."""
    spec = [
        ("Oja's rule improves online backprop in deep networks", "backprop + Oja", ["deep"]),
        (
            "Oja's rule improves online backprop at poor initialisation",
            "backprop + Oja",
            ["small init", "large init"],
        ),
        (
            "Oja's rule improves online learning with feedback alignment",
            "FA + Oja",
            ["standard", "deep", "small init", "large init"],
        ),
    ]
    claims = []
    for claim, method, conds in spec:
        got = [g for g in (_better(rows, c, method) for c in conds) if g is not None]
        if not got:
            continue
        hits = sum(ok for ok, _ in got)
        claims.append(
            {
                "claim": claim,
                "verdict": verdict_of(hits, len(got)),
                "seeds": args.seeds,
                "evidence": "; ".join(ev for _, ev in got)
                + " (accuracy gain of the jointly tuned + Oja over the tuned plain method, "
                "paired 95% bootstrap interval over test episodes)",
            }
        )
    meta = [r for r in rows if r["method"].endswith("(meta-learned)")]
    if meta:
        conds = sorted({r["condition"] for r in meta})
        hits, ev = 0, []
        for c in conds:
            rs = [r for r in meta if r["condition"] == c]
            gains = [r["vs_plain"]["mean"] if "vs_plain" in r else float("nan") for r in rs]
            sig = [("vs_plain" in r and r["vs_plain"]["significant"]) for r in rs]
            thetas = [r.get("coefficients", {}).get("oja", float("nan")) for r in rs]
            # a hit is the Oja term's doing: a significant gain with a learned theta > 0 (a
            # gain at theta <= 0 comes from the step eta the outer loop also moves)
            good = all(
                np.isfinite(g) and g > 0 and s and t > 0
                for g, s, t in zip(gains, sig, thetas, strict=True)
            )
            hits += good
            lrs = [r.get("meta_lr", float("nan")) for r in rs]
            ev.append(
                f"{c}: gains "
                + ", ".join(f"{g:+.3f}" for g in gains)
                + " (theta "
                + ", ".join(f"{t:.2g}" for t in thetas)
                + "; meta lr "
                + ", ".join(f"{x:g}" for x in lrs)
                + ")"
            )
        claims.append(
            {
                "claim": "A meta-learned Oja coefficient improves online backprop",
                "verdict": verdict_of(hits, len(conds)),
                "seeds": len({r["meta_seed"] for r in meta}),
                "evidence": "; ".join(ev) + " (per meta-training seed, vs the tuned plain "
                "backprop on the same test episodes; a condition counts when every seed gains "
                "significantly with a learned theta > 0)",
            }
        )
    return claims


def write(out: Path, rows, claims, args, total_s: float) -> None:
    data = "digits" if args.quick else "Fashion-MNIST"
    lines = [
        f"Oja's rule under constraints: {data}, online (batch 1). Every method tuned with the "
        f"same budget of {args.budget} configurations on {args.tune_episodes} validation "
        f"episodes each; tested on {args.seeds} seeds x {args.eval_episodes} held-out episodes "
        f"(test-split images); 95% percentile-bootstrap intervals; diverged episodes score 0. "
        f"Compute {total_s / 60:.1f} min.",
        "",
        "| condition | method | held-out accuracy | 95% CI | + Oja minus plain (paired 95% CI) "
        "| seeds better | diverged | effective rank | eta, theta |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "accuracy_per_episode" not in r:
            lines.append(
                f"| {r['condition']} | {r['method']} seed {r.get('meta_seed')} | — | — | — | — "
                f"| — | — | run failed: {r['run_status'].split(':')[0]} |"
            )
            continue
        c = r.get("coefficients", {})
        d = r.get("vs_plain")
        diff = f"{d['mean']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]" if d else "—"
        better = f"{d['seeds_better']}/{len(r['seed_means'])}" if d else "—"
        name = r["method"] + (f" seed {r['meta_seed']}" if "meta_seed" in r else "")
        if "meta_lr" in r:
            name += f", meta lr {r['meta_lr']:g}"
        if r.get("run_status", "ok") != "ok":  # the rule of a run that failed its checks
            name += f" (run failed: {r['run_status'].split(':')[0]})"
        lines.append(
            f"| {r['condition']} | {name} | {r['accuracy']:.3f} | "
            f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] | {diff} | {better} | "
            f"{sum(r['diverged'])} | {r.get('effective_rank', float('nan')):.1f} "
            f"(of {r['width']}) | {c.get('pseudo_gradient', float('nan')):.3g}, "
            f"{c.get('oja', float('nan')):.3g} |"
        )
    lines += ["", "Verdicts:", "", *verdict_table(claims)]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    slim = [{k: v for k, v in r.items() if k != "accuracy_per_episode"} for r in rows]
    (out / "results.json").write_text(json.dumps(slim, indent=2) + "\n")
    write_verdict(out, claims, args.quick)
    plot(out, rows)
    print("\n".join(lines))


def plot(out: Path, rows) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conds = list(dict.fromkeys(r["condition"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows if "meta_seed" not in r))
    fig, ax = plt.subplots(figsize=(1.8 * len(conds) + 2, 3.8))
    w = 0.8 / len(methods)
    for j, m in enumerate(methods):
        by = {r["condition"]: r for r in rows if r["method"] == m}
        nan = {"accuracy": np.nan, "ci95": [np.nan, np.nan]}
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
    # tuning curves: validation accuracy against eta, one line per method and theta
    fig, axes = plt.subplots(1, len(conds), figsize=(3.6 * len(conds), 3.2), squeeze=False)
    for ax, c in zip(axes[0], conds, strict=True):
        for r in rows:
            if r["condition"] != c or "tuning" not in r:
                continue
            for theta in sorted({p["oja"] for p in r["tuning"]}):
                pts = [p for p in r["tuning"] if p["oja"] == theta]
                lab = r["method"] + ("" if "Oja" not in r["method"] else f" theta {theta:g}")
                ls = "-" if "Oja" not in r["method"] else ":"
                ax.plot([p["eta"] for p in pts], [p["val_accuracy"] for p in pts], ls, label=lab)
        ax.set_xscale("log")
        ax.set_title(c, fontsize=9)
        ax.set_xlabel("step eta")
    axes[0][0].set_ylabel("validation accuracy")
    axes[0][-1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "tuning.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
