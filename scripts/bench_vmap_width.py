"""Time one outer step at several ``train.vmap_width`` values (the default's measurement).

    python scripts/bench_vmap_width.py [--task digits] [--widths=-1,1,2,4,8,16] [--repeats 9]
                                       [--json results/bench/vmap_width_cpu.json]

``train.vmap_width = w > 0`` makes every device run ``lax.map`` over chunks of ``w`` vmapped
entries (episodes of the meta-batch for a gradient outer loop, population members for ES;
0 = auto = 1); ``-1`` vmaps a device's whole share at once without ``lax.map`` (the former
default). For each width this builds the run's own trainer (pool rule, the task preset's
network and episodes, one device) for Adam (forward-mode meta-gradients) and for OpenAI-ES,
and reports the median wall time of one outer step divided by the episodes it runs
(``meta_batch`` for Adam; ``population * meta_batch`` members' episodes for ES), after a
first step that compiles it. Repeats go round robin over all cases, so that changes in
machine load hit every case alike.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
from _timing import emit_json

from metaplastic.run import build_config, build_rule, build_setup, make_trainer


def build(task: str, overrides: list[str]):
    """The run's own trainer for ``overrides``, compiled by one first step."""
    cfg = build_config("pool", task, overrides=overrides)
    setup = build_setup(cfg)
    rule = build_rule(cfg, setup.net.n_layers)
    tr = make_trainer(cfg, setup, rule)
    state = tr.init(rule, jax.random.key(0))
    t0 = time.perf_counter()
    state, _ = tr.step(state)
    jax.block_until_ready(state)
    t = cfg.train
    per_step = t.meta_batch * (t.population if t.outer != "adam" else 1)
    return {
        "trainer": tr,
        "state": state,
        "per_step": per_step,
        "compile_s": time.perf_counter() - t0,
        "times": [],
    }


def time_once(case: dict, steps: int) -> None:
    state = case["state"]
    t0 = time.perf_counter()
    for _ in range(steps):
        state, _ = case["trainer"].step(state)
    jax.block_until_ready(state)
    case["times"].append((time.perf_counter() - t0) / steps / case["per_step"])
    case["state"] = state


def summary(case: dict) -> dict:
    times = sorted(case["times"])
    return {
        "ms_per_episode": round(1e3 * times[len(times) // 2], 3),
        "min_ms_per_episode": round(1e3 * times[0], 3),
        "max_ms_per_episode": round(1e3 * times[-1], 3),
        "compile_s": round(case["compile_s"], 2),
        "episodes_per_step": case["per_step"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="digits")
    ap.add_argument("--widths", default="-1,1,2,4,8,16", help="comma-separated vmap widths")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--steps", type=int, default=3, help="outer steps per timed repeat")
    ap.add_argument("--population", type=int, default=16)
    ap.add_argument("--meta-batch", type=int, default=16)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    widths = [int(w) for w in args.widths.split(",")]
    common = [
        "train.devices=1",
        f"train.meta_batch={args.meta_batch}",
        f"train.population={args.population}",
    ]
    out: dict = {
        "task": args.task,
        "meta_batch": args.meta_batch,
        "population": args.population,
        "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
        "adam_forward": {},
        "open_es": {},
    }
    outers = {
        "adam_forward": ["train.outer='adam'", "train.gradient='forward'"],
        "open_es": ["train.outer='open_es'"],
    }
    cases = {
        (name, w): build(args.task, [*common, f"train.vmap_width={w}", *extra])
        for name, extra in outers.items()
        for w in widths
    }
    # round robin: every repeat times each case once, so load changes hit all cases alike
    for _ in range(args.repeats):
        for case in cases.values():
            time_once(case, args.steps)
    for (name, w), case in cases.items():
        out[name][str(w)] = summary(case)
    emit_json(out, args.json)


if __name__ == "__main__":
    main()
