"""Time one meta-step of the default digits set-up, forward- vs reverse-mode; prints JSON.

Usage: python scripts/bench_digits.py [--rule pool] [--repeats 5] [--steps 50]

Reports, per gradient mode: compile_s (first step), and the median over repeats of the
milliseconds per meta-step and per meta-training episode (meta-batch from the task preset).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax

from metaplastic._config import build_config
from metaplastic._run import build_rule, build_setup
from metaplastic.outer import GradientTrainer, make_optimizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rule", default="pool")
    ap.add_argument("--task", default="digits")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    cfg = build_config(args.rule, args.task)
    setup = build_setup(cfg)
    rule = build_rule(cfg, setup.net.n_layers)
    t = cfg.train
    out = {
        "rule": args.rule,
        "task": args.task,
        "meta_batch": t.meta_batch,
        "unroll_steps": cfg.task.n_way * cfg.task.k_shot,
        "jax": jax.__version__,
        "device": str(jax.devices()[0]),
        "machine": platform.machine(),
    }
    for mode in ("forward", "reverse"):
        tr = GradientTrainer(
            setup.problem(cfg),
            rule,
            make_optimizer(t.outer, t.lr, t.clip),
            meta_batch=t.meta_batch,
            mode=mode,
        )
        state = tr.init(rule, jax.random.key(0))
        t0 = time.perf_counter()
        state, _ = tr.step(state)
        jax.block_until_ready(state)
        compile_s = time.perf_counter() - t0
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for _ in range(args.steps):
                state, _ = tr.step(state)
            jax.block_until_ready(state)
            times.append((time.perf_counter() - t0) / args.steps)
        med = statistics.median(times)
        out[mode] = {
            "compile_s": round(compile_s, 2),
            "ms_per_meta_step": round(1e3 * med, 2),
            "ms_per_episode": round(1e3 * med / t.meta_batch, 3),
        }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
