"""Kill a training process at chosen points and resume it: checks that resume is exact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ._checkpoint import checkpoint_dir


def _rows(metrics: Path) -> int:
    try:
        return len(metrics.read_text().splitlines())
    except FileNotFoundError:
        return 0


def kill_and_resume(
    train_args: Sequence[str], run_dir: Path, kill_at_rows: Sequence[int], timeout: float = 600
) -> int:
    """Start ``metaplastic train *train_args --out run_dir``; SIGKILL it when
    ``metrics.jsonl`` reaches each of ``kill_at_rows`` (ascending), resuming with
    ``--resume run_dir`` after every kill (starting over with ``--force`` if the kill came
    before the first checkpoint); finally let the last resume finish.

    Returns the number of kills that landed (a kill is skipped if the run finished first).
    Raises ``RuntimeError`` if the final resume fails.
    """
    base = [sys.executable, "-m", "metaplastic", "train", "--quiet"]
    first = base + list(train_args) + ["--out", str(run_dir)]
    resume = base + ["--resume", str(run_dir)]
    metrics = run_dir / "metrics.jsonl"

    def again() -> list[str]:
        # a kill before the first checkpoint leaves nothing to resume: start over
        if any(checkpoint_dir(run_dir).glob("ckpt-*")):
            return resume
        return first + ["--force"]

    kills = 0
    for i, target in enumerate(kill_at_rows):
        proc = subprocess.Popen(
            first if i == 0 else again(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            if _rows(metrics) >= target:
                os.kill(proc.pid, signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.002)
        proc.wait(timeout=timeout)
    done = subprocess.run(again(), capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"final resume failed: {done.stderr.strip()[-500:]}")
    return kills
