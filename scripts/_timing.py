"""Timing and JSON output shared by the benchmark scripts (``bench_kernels.py``,
``profile_meta_step.py``). The scripts run as ``python scripts/<name>.py``, which puts this
folder on ``sys.path``.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import jax


def median_ms(fn, *args, repeats: int) -> float:
    """Median wall time of ``fn(*args)`` in ms over ``repeats`` calls, after one call that
    compiles it."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def emit_json(out: dict, path: Path | None) -> None:
    """Print ``out`` as indented JSON and, with ``path``, also write it there."""
    text = json.dumps(out, indent=2)
    print(text)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
