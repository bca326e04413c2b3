"""Micro-benchmarks behind the inner-loop speed-ups (docs/performance.md); prints JSON.

Each case is a jitted ``lax.scan`` of 250 steps on the reference network's first layer
(170 x 784), or the episode sampler's per-class draw, timed after compilation (median of
``--repeats``, ms per call):

* ``transposed_matvec``: ``W.T @ y`` against ``y @ W`` (same product).
* ``sampler``: a full permutation of 6,000 images per class against the top 60 of i.i.d.
  uniform keys, for 5 classes (both draw 60 distinct images per class).
* ``rank_one_update``: the weight update as a sum of three outer products against one
  ``U V^T`` product of rank 3.

Usage: ``python scripts/bench_kernels.py [--repeats 20] [--json FILE]``
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
from _timing import emit_json, median_ms

N_OUT, N_IN, T = 170, 784, 250


def _round_ms(fn, *args, repeats: int) -> float:
    return round(median_ms(fn, *args, repeats=repeats), 3)


def _scan(body):
    return jax.jit(lambda w0, xs, ys: jax.lax.scan(body, w0, (xs, ys)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    k = jax.random.split(jax.random.key(0), 4)
    w0 = 0.05 * jax.random.normal(k[0], (N_OUT, N_IN))
    xs = jax.random.uniform(k[1], (T, N_IN))
    ys = jax.random.uniform(k[2], (T, N_OUT))
    r = args.repeats

    def outer_sum(w, xy):
        x, y = xy
        return w + 1e-3 * jnp.outer(y, x) + 2e-3 * jnp.outer(2 * y, 3 * x) + 2e-3 * jnp.outer(
            3 * y, x * x
        ), None

    def low_rank(w, xy):
        x, y = xy
        u = jnp.stack([1e-3 * y, 2e-3 * 2 * y, 2e-3 * 3 * y], axis=1)
        v = jnp.stack([x, 3 * x, x * x])
        return w + u @ v, None

    keys = jax.random.split(k[3], 5)
    out = {
        "jax": jax.__version__,
        "device": str(jax.devices()[0]),
        "steps": T,
        "transposed_matvec": {
            "W.T @ y": _round_ms(_scan(lambda w, xy: (w, w.T @ xy[1])), w0, xs, ys, repeats=r),
            "y @ W": _round_ms(_scan(lambda w, xy: (w, xy[1] @ w)), w0, xs, ys, repeats=r),
        },
        "sampler": {
            "permutation": _round_ms(
                jax.jit(jax.vmap(lambda kk: jax.random.permutation(kk, 6000)[:60])),
                keys,
                repeats=r,
            ),
            "top_k_of_uniform": _round_ms(
                jax.jit(jax.vmap(lambda kk: jax.lax.top_k(jax.random.uniform(kk, (6000,)), 60)[1])),
                keys,
                repeats=r,
            ),
        },
        "rank_one_update": {
            "sum of outer products": _round_ms(_scan(outer_sum), w0, xs, ys, repeats=r),
            "U V^T product": _round_ms(_scan(low_rank), w0, xs, ys, repeats=r),
        },
    }
    emit_json(out, args.json)


if __name__ == "__main__":
    main()
