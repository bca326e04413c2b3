"""Multi-process (multi-host) runs with ``jax.distributed``.

Every process runs the same command with the same config; the sharded axis (meta-batch or
population) is split over the devices of all processes, and every process ends up with the
same replicated state. Process 0 writes the run directory; process ``i > 0`` writes its own
copy under ``<run>/process-<i>/`` (so each can resume from its own checkpoints).

Settings come from the ``train`` command's ``--coordinator``, ``--num-processes`` and
``--process-id`` options or the environment variables ``METAPLASTIC_COORDINATOR``,
``METAPLASTIC_NUM_PROCESSES`` and ``METAPLASTIC_PROCESS_ID``.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

from .._errors import MetaplasticError

_STARTED = False


def init_distributed(
    coordinator: str | None, num_processes: int | None, process_id: int | None
) -> bool:
    """Start multi-process JAX if a coordinator is given; returns whether it did."""
    global _STARTED
    coordinator = coordinator or os.environ.get("METAPLASTIC_COORDINATOR")
    if not coordinator:
        return False
    try:
        n = int(
            num_processes if num_processes is not None else os.environ["METAPLASTIC_NUM_PROCESSES"]
        )
        i = int(process_id if process_id is not None else os.environ["METAPLASTIC_PROCESS_ID"])
    except (KeyError, ValueError):
        raise MetaplasticError(
            "a multi-process run needs --num-processes and --process-id (or "
            "METAPLASTIC_NUM_PROCESSES and METAPLASTIC_PROCESS_ID) next to --coordinator"
        ) from None
    if not 0 <= i < n:
        raise MetaplasticError(f"--process-id {i} must be in 0..{n - 1}")
    if _STARTED:
        return True
    # cross-process collectives for CPU devices (GPU devices use their own, e.g. NCCL)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator, num_processes=n, process_id=i)
    except Exception as err:  # noqa: BLE001 - report any start-up failure in one line
        raise MetaplasticError(f"cannot join the run at {coordinator}: {err}") from None
    _STARTED = True
    return True


def process_dir(out: Path) -> Path:
    """Where this process writes: ``out`` for process 0, ``out/process-<i>`` otherwise."""
    i = jax.process_index()
    return out if i == 0 else out / f"process-{i}"
