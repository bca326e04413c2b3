"""Kill a longer training run with SIGKILL at random points, resume, and compare bit for bit.

Usage: python scripts/kill_resume.py [--rule pool] [--task digits] [--episodes 3200]
                                     [--kills 10] [--seed 0] [--out results/kill_resume]

Runs the same training once uninterrupted and once killed at `--kills` random metrics rows
(resumed with `metaplastic train --resume` after each kill), then prints JSON saying whether
the final coefficients are bit-identical and metrics.jsonl is byte-identical.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from metaplastic.run import kill_and_resume


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rule", default="pool")
    ap.add_argument("--task", default="digits")
    ap.add_argument("--episodes", type=int, default=3200)
    ap.add_argument("--meta-batch", type=int, default=16)
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("results/kill_resume"))
    args = ap.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    common = [
        "--rule",
        args.rule,
        "--task",
        args.task,
        "--episodes",
        str(args.episodes),
        "--meta-batch",
        str(args.meta_batch),
        "--seed",
        str(args.seed),
        "--set",
        "train.checkpoint_every=1",
    ]
    ref = args.out / "uninterrupted"
    subprocess.run(
        [sys.executable, "-m", "metaplastic", "train", "--quiet", *common, "--out", str(ref)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    steps = args.episodes // args.meta_batch
    rng = np.random.default_rng(args.seed)
    targets = sorted(
        rng.choice(np.arange(1, steps), size=min(args.kills, steps - 1), replace=False).tolist()
    )
    run = args.out / "killed"
    kills = kill_and_resume(common, run, targets)

    def final(d: Path):
        return json.loads((d / "rule.json").read_text())["theta"], (d / "metrics.jsonl").read_text()

    (theta_a, m_a), (theta_b, m_b) = final(ref), final(run)
    same = np.array_equal(np.asarray(theta_a, np.float32), np.asarray(theta_b, np.float32))
    print(
        json.dumps(
            {
                "steps": steps,
                "kill_targets": targets,
                "kills_landed": kills,
                "coefficients_bit_identical": bool(same),
                "metrics_identical": m_a == m_b,
            },
            indent=2,
        )
    )
    sys.exit(0 if same and m_a == m_b else 1)


if __name__ == "__main__":
    main()
