"""The uniform-output trap on digits: which meta-objective / output width lets a hand-made
pool learn with the default outer settings?

Usage: python scripts/objective_study.py [--seeds 0 1 2] [--out results/objective_study]
                                         [--options ce_5 ce_10 prob_5 ...] [--episodes N]

A user-made pool (pseudo-gradient + Hebbian + Oja + weight decay, starting at
[0.03, 0, 0, 0]) is meta-trained under feedback alignment on the digits task with the
default outer settings (Adam 1e-3, meta-batch 16, 4,800 episodes) for each option below and
each seed; the FA baseline (pseudo-gradient only, its step meta-learned) is trained for each
output width. Every run is tested on the same 500 meta-test episodes per seed. Options:

* ``ce_5``: query cross-entropy, 5 output units (= n_way; the trap: uniform outputs cost ln 5)
* ``ce_10``: query cross-entropy, 10 output units (the data set's class count)
* ``prob_5``: 1 − mean probability of the right class (``train.objective = "prob_error"``)
* ``ce_t3_5``: cross-entropy of logits / 3 (``train.query_temperature = 3``)
* ``ce_5_guard``, ``prob_5_guard``, ``ce_t3_5_guard``: the same with the weight guard
  (``train.weight_limit = 100``): an episode whose weights pass 100x their layer's largest
  start value stops there, counts as diverged, and keeps a finite meta-gradient that points
  away from the blow-up (without it the gradient cannot see an episode that overflowed)

Writes ``results.json`` (every run: option, seed, status, meta-test accuracy, validation
scores, coefficients) and ``results.md`` (per option: accuracy per seed, mean ± sd, seeds
that beat FA, seeds that failed). Finished runs are reused when the script is run again
(delete a run's directory to redo it).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from metaplastic.run import build_config, keep_failed, train

USER_POOL = """[rule]
description = "hand-made pool: pseudo-gradient + Hebbian + Oja + weight decay"
terms = ["pseudo_gradient", "hebbian", "oja", "weight_decay"]
init = [0.03, 0.0, 0.0, 0.0]
"""
#: option -> (overrides, FA baseline key)
OPTIONS = {
    "ce_5": (["network.n_out=5"], "fa_5"),
    "ce_10": (["network.n_out=10"], "fa_10"),
    "prob_5": (["network.n_out=5", "train.objective='prob_error'"], "fa_5"),
    "ce_t3_5": (["network.n_out=5", "train.query_temperature=3.0"], "fa_5"),
}
GUARD = "train.weight_limit=100.0"
OPTIONS.update(
    {f"{k}_guard": ([*v[0], GUARD], v[1]) for k, v in list(OPTIONS.items()) if k != "ce_10"}
)
BASELINES = {"fa_5": ["network.n_out=5"], "fa_10": ["network.n_out=10"]}


def run(out: Path, rule: str, overrides: list[str], seed: int, episodes, label: str) -> dict:
    done = out / "summary.json"
    if done.is_file():
        s = json.loads(done.read_text())
        if label in s.get("meta_test", {}) or s.get("status", "ok") != "ok":
            return s
    table = {"seed": seed, "episodes": episodes}
    if label == "fa":
        table["require_improvement"] = False  # a baseline is reported as it is
    cfg = build_config(rule, "digits", table, overrides)
    return keep_failed(train, cfg, out, progress=False, label=label)


def record(option: str, seed: int, s: dict, label: str, wall: float) -> dict:
    return {
        "option": option,
        "seed": seed,
        "status": s.get("status", "ok"),
        "accuracy": s.get("meta_test", {}).get(label, {}).get("accuracy"),
        "validation_start": s.get("validation", {}).get("start", {}).get("score"),
        "validation_learned": s.get("validation", {}).get("learned", {}).get("score"),
        "coefficients": s.get("coefficients"),
        "steps_done": s.get("train", {}).get("steps_done"),
        "skipped_steps": s.get("train", {}).get("skipped_steps"),
        "wall_s": round(wall, 1),
    }


def table(rows: list[dict], seeds: list[int]) -> str:
    by = {(r["option"], r["seed"]): r for r in rows}
    lines = [
        "| option | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd | > FA | failed |",
        "|---" * (len(seeds) + 4) + "|",
    ]
    for opt in dict.fromkeys(r["option"] for r in rows):
        accs = [by.get((opt, s), {}).get("accuracy") for s in seeds]
        cells = []
        for s, a in zip(seeds, accs, strict=True):
            r = by.get((opt, s), {})
            mark = "" if r.get("status", "ok") == "ok" else f" ({r['status'].split(':')[0]})"
            cells.append("—" if a is None else f"{a:.3f}{mark}")
        v = np.array([a for a in accs if a is not None])
        ms = f"{v.mean():.3f} ± {v.std(ddof=1) if v.size > 1 else 0:.3f}" if v.size else "—"
        base = OPTIONS[opt][1] if opt in OPTIONS else None
        beats = "—"
        if base is not None:
            n = 0
            for s in seeds:
                r, f = by.get((opt, s), {}), by.get((base, s), {})
                ok = r.get("status") == "ok" and None not in (r.get("accuracy"), f.get("accuracy"))
                n += bool(ok and r["accuracy"] > f["accuracy"])
            beats = f"{n} of {len(seeds)}"
        failed = sum(by.get((opt, s), {}).get("status", "ok") != "ok" for s in seeds)
        lines.append(f"| {opt} | " + " | ".join(cells) + f" | {ms} | {beats} | {failed} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--options", nargs="+", default=list(OPTIONS), choices=list(OPTIONS))
    ap.add_argument("--out", type=Path, default=Path("results/objective_study"))
    ap.add_argument("--episodes", type=int, default=None, help="meta-training episodes")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rule = args.out / "user_pool.toml"
    rule.write_text(USER_POOL)
    rows = []
    bases = sorted({OPTIONS[o][1] for o in args.options})
    jobs = [(b, "pseudo_gradient", BASELINES[b], "fa") for b in bases]
    jobs += [(o, str(rule), OPTIONS[o][0], "learned") for o in args.options]
    for name, rule_spec, over, label in jobs:
        for seed in args.seeds:
            t0 = time.perf_counter()
            s = run(args.out / name / f"seed{seed}", rule_spec, over, seed, args.episodes, label)
            rows.append(record(name, seed, s, label, time.perf_counter() - t0))
            print(json.dumps(rows[-1]), flush=True)
            (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    (args.out / "results.md").write_text(table(rows, args.seeds) + "\n")
    print(table(rows, args.seeds))


if __name__ == "__main__":
    main()
