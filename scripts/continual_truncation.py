"""Meta-training over 5,000-update episodes with truncated meta-gradients; memory vs horizon.

    python scripts/continual_truncation.py [--seeds 0 1 2] [--out results/continual]
                                           [--episodes N] [--skip-memory] [--skip-training]

Task: ``tasks/continual_digits.toml``, class-incremental online learning on digits (10
classes taught in 5 stages of 2, 1,000 online updates per stage: 5,000 per episode; the
query covers all 10 classes after the last update). Meta-gradients are truncated to
segments of 100 updates (``train.truncation = 100``): each segment's loss is the query
cross-entropy at its end over the classes seen so far.

1. **Memory** (``memory.json``): peak resident memory of a fresh process that runs one
   truncated meta-step of the pool rule (meta-batch 1) at episode lengths 1,000 / 5,000 /
   20,000 (``stage_steps`` 200 / 1,000 / 4,000), and of plain reverse mode through the
   whole episode at 1,000 and 5,000 for contrast, and of one episode of persistent-ES
   generations (population 8).
2. **Meta-training** (``results.json``, ``results.md``): for each seed, the built-in pool
   rule and the FA baseline (pseudo-gradient only, its rate meta-learned the same way), and
   the pool rule meta-learned by persistent ES over the same segments (``PES`` below), each
   tested on the same 500 held-out meta-test episodes: accuracy over all 10 classes after
   the last update.

Finished runs are reused when the script is run again (delete a run's directory to redo it).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from metaplastic.run import build_config, keep_failed, train

TASK = "tasks/continual_digits.toml"
LENGTHS = {1000: 200, 5000: 1000, 20000: 4000}  # episode length -> stage_steps
METHODS = {"learned": "pool", "fa": "pseudo_gradient", "pes": "pool"}
#: Persistent ES over the same segments (one generation per segment of 100 updates, 50 per
#: episode): 4 antithetic pairs on meta-batches of 4 episodes, the preset's search scale (a
#: tenth of the start's pseudo-gradient coefficient) and Adam step of 1e-3 per episode (2e-5
#: per segment), as the gradient runs' 1e-3 per meta-step
PES = {"outer": "persistent_es", "population": 8, "meta_batch": 4, "sigma": 0.003, "lr": 1e-3}
#: meta-training episodes per method (None: the preset's 800); PES cost about 2.5x a
#: truncated meta-gradient per episode on this CPU
EPISODES = {"pes": 400}


def child(stage_steps: int, truncation: int, outer: str = "") -> None:
    """In a fresh process: one meta-step (one episode of PES generations with ``outer =
    "pes"``); prints the peak RSS in MB."""
    import jax

    from metaplastic.run import build_rule, build_setup, make_trainer

    over = [f"task.stage_steps={stage_steps}", "train.meta_batch=1", "train.episodes=1"]
    over.append(f"train.truncation={truncation}")
    table = {k: v for k, v in PES.items() if k != "meta_batch"} if outer == "pes" else None
    cfg = build_config("pool", TASK, table, overrides=over)
    setup = build_setup(cfg)
    rule = build_rule(cfg, setup.net.n_layers)
    tr = make_trainer(cfg, setup, rule)
    state = tr.init(rule, jax.random.key(0))
    t0 = time.perf_counter()
    state, _ = tr.step(state)
    jax.block_until_ready(state)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps({"peak_rss_mb": round(peak, 1), "first_step_s": round(wall, 2)}))


def memory(out: Path) -> dict:
    rows = {}
    cases = [(T, 100, "") for T in LENGTHS] + [(1000, 0, ""), (5000, 0, "")]
    cases += [(T, 100, "pes") for T in LENGTHS]
    for T, trunc, outer in cases:
        label = f"truncation {trunc}" if trunc else "whole episode (reverse)"
        if outer:
            label = f"persistent ES, segments of {trunc}, population {PES['population']}"
        print(f"peak memory: T = {T}, {label} ...", flush=True)
        proc = subprocess.run(
            [sys.executable, __file__, "--child", str(LENGTHS[T]), str(trunc), outer],
            capture_output=True,
            text=True,
            timeout=1800,
        )
        if proc.returncode != 0:
            rows.setdefault(label, {})[str(T)] = None
            print("  failed:", proc.stderr.strip().splitlines()[-1:], flush=True)
            continue
        rows.setdefault(label, {})[str(T)] = json.loads(proc.stdout.strip().splitlines()[-1])
    (out / "memory.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def run(out: Path, method: str, seed: int, episodes) -> dict:
    done = out / "summary.json"
    label = "fa" if method == "fa" else "learned"
    episodes = episodes or EPISODES.get(method)
    if done.is_file():
        s = json.loads(done.read_text())
        if label in s.get("meta_test", {}) or s.get("status", "ok") != "ok":
            return s
    table = {"seed": seed, "episodes": episodes}
    if method == "fa":
        table["require_improvement"] = False  # a baseline is reported as it is
    if method == "pes":
        table.update(PES)
    table = {k: v for k, v in table.items() if v is not None}
    cfg = build_config(METHODS[method], TASK, table)
    return keep_failed(train, cfg, out, progress=True, label=label)


def training(out: Path, seeds: list[int], episodes) -> list[dict]:
    rows = []
    for method in METHODS:
        label = "fa" if method == "fa" else "learned"
        for seed in seeds:
            t0 = time.perf_counter()
            s = run(out / method / f"seed{seed}", method, seed, episodes)
            rows.append(
                {
                    "method": method,
                    "seed": seed,
                    "status": s.get("status", "ok"),
                    "accuracy": s.get("meta_test", {}).get(label, {}).get("accuracy"),
                    "validation_start": s.get("validation", {}).get("start", {}).get("score"),
                    "validation_learned": s.get("validation", {}).get("learned", {}).get("score"),
                    "coefficients": s.get("coefficients"),
                    "wall_s": round(time.perf_counter() - t0, 1),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
            (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def table(rows: list[dict], seeds: list[int]) -> str:
    by = {(r["method"], r["seed"]): r for r in rows}
    lines = [
        "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd |",
        "|---" * (len(seeds) + 2) + "|",
    ]
    for m in METHODS:
        cells, vals = [], []
        for s in seeds:
            r = by.get((m, s), {})
            a = r.get("accuracy")
            mark = "" if r.get("status", "ok") == "ok" else f" ({r['status'].split(':')[0]})"
            cells.append("—" if a is None else f"{a:.3f}{mark}")
            if a is not None:
                vals.append(a)
        v = np.array(vals)
        sd = v.std(ddof=1) if v.size > 1 else 0.0
        lines.append(
            f"| {m} | "
            + " | ".join(cells)
            + (f" | {v.mean():.3f} ± {sd:.3f} |" if vals else " | — |")
        )
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) in (4, 5) and sys.argv[1] == "--child":
        child(int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=Path("results/continual"))
    ap.add_argument("--episodes", type=int, default=None, help="meta-training episodes")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-training", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.skip_memory:
        print(json.dumps(memory(args.out), indent=1))
    if not args.skip_training:
        rows = training(args.out, args.seeds, args.episodes)
        (args.out / "results.md").write_text(table(rows, args.seeds) + "\n")
        print(table(rows, args.seeds))


if __name__ == "__main__":
    main()
