"""Where the time of one reference episode goes: a jax.profiler trace, summed per XLA op.

Runs one episode of the reference set-up (``reference_pool`` on ``fashion_mnist_reference``)
as a forward-only episode and as a forward-mode meta-gradient (``jax.jacfwd``, as the
gradient outer loop computes it). Traces ``--runs`` calls of each after compilation and
prints JSON: wall time per episode, and the busy time per op group (XLA op names with their
numeric suffix dropped: ``dot``, ``add_add_fusion``, ``copy``, ``sort``, ...) summed over all
CPU threads, in ms per episode. Also the read+write bandwidth XLA reaches on a plain scan
over arrays the size of the weights plus one tangent per coefficient (a roofline for the
memory-bound inner loop), and the weights' size. Op names come from XLA and change between
versions; the grouping is only a guide to which kind of kernel dominates.

Usage: ``python scripts/profile_meta_step.py [--runs 5] [--json FILE] [--top 12]
[--rule R --task T]`` (another rule preset and task; the test suite profiles a small digits
set-up this way).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
from _timing import emit_json, median_ms

from metaplastic import MetaplasticError
from metaplastic.run import bench_trainer


def _trace_ops(fn, args_for, runs: int) -> tuple[float, dict[str, float]]:
    """Median wall ms per call and busy ms per op group per call (from a perfetto trace)."""
    jax.block_until_ready(fn(*args_for(0)))  # compile
    walls = []
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp, create_perfetto_trace=True)
        for i in range(runs):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args_for(i + 1)))
            walls.append(time.perf_counter() - t0)
        jax.profiler.stop_trace()
        files = sorted(Path(tmp).rglob("*.trace.json.gz"))
        if not files:
            sys.exit("profile_meta_step: the profiler wrote no perfetto trace")
        data = json.load(gzip.open(files[-1]))
    events = data["traceEvents"] if isinstance(data, dict) else data
    groups: collections.Counter[str] = collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") != "X" or name.startswith("$") or "Thunk" in name or " " in name:
            continue
        groups[re.sub(r"(\.\d+)+$", "", name)] += e["dur"] / 1e3 / runs
    return 1e3 * statistics.median(walls), dict(groups)


def _stream_gb_s(sizes, copies: int, steps: int = 250, repeats: int = 10) -> float:
    """Read+write bandwidth XLA reaches here on a scan that updates ``copies`` sets of the
    network's weight matrices in place ``steps`` times (an upper bound for the passes the
    inner loop makes over weights and tangents)."""
    mats = tuple(jnp.ones((copies, o, i), jnp.float32) for o, i in sizes)

    def body(ms, t):
        return tuple(m * 0.999 + t for m in ms), None

    fn = jax.jit(lambda ms: jax.lax.scan(body, ms, jnp.arange(steps, dtype=jnp.float32))[0])
    nbytes = 2 * steps * sum(m.size for m in mats) * 4
    return nbytes / (median_ms(fn, mats, repeats=repeats) / 1e3) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--rule", default="reference_pool")
    ap.add_argument("--task", default="fashion_mnist_reference")
    args = ap.parse_args()
    if args.runs < 1 or args.top < 1:
        ap.error("--runs and --top must be at least 1")
    try:
        cfg, setup, rule, _ = bench_trainer(args.rule, args.task, "forward")
    except MetaplasticError as e:
        print(f"profile_meta_step: error: {e}", file=sys.stderr)
        sys.exit(2)
    problem = setup.problem(cfg)
    params, static = eqx.partition(rule, eqx.is_inexact_array)

    def query_loss(p, key):
        return problem.episode(eqx.combine(p, static), key).query_loss

    out = {
        "rule": args.rule,
        "task": args.task,
        "jax": jax.__version__,
        "device": str(jax.devices()[0]),
        "runs": args.runs,
    }
    for label, fn in (
        ("forward_episode", jax.jit(query_loss)),
        ("forward_mode_meta_gradient", jax.jit(jax.jacfwd(query_loss))),
    ):
        wall, groups = _trace_ops(fn, lambda i: (params, jax.random.key(i)), args.runs)
        top = sorted(groups.items(), key=lambda kv: -kv[1])[: args.top]
        out[label] = {
            "wall_ms_per_episode": round(wall, 1),
            "busy_ms_per_episode_all_threads": round(sum(groups.values()), 1),
            "top_op_groups_ms": {k: round(v, 2) for k, v in top},
        }
    shapes = setup.net.shapes
    n_coef = sum(x.size for x in jax.tree_util.tree_leaves(params))
    out["weights_mb"] = round(sum(o * i for o, i in shapes) * 4 / 2**20, 3)
    out["stream_read_write_gb_s_weights_and_tangents"] = round(_stream_gb_s(shapes, 1 + n_coef), 1)
    emit_json(out, args.json)


if __name__ == "__main__":
    main()
