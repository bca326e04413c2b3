"""Shared small fixtures. Everything here is tiny so the suite runs quickly on 2 CPU cores."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

#: Subprocesses the tests start (CLI runs, resumed runs, multi-process runs, scripts) share
#: a persistent JAX compilation cache for this session, so a program compiled by one of
#: them is loaded, not recompiled, by the next. Set before JAX is imported; a cache the
#: caller set (the mutation script's) is kept.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="metaplastic-test-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

#: The suite is compile-bound (thousands of small programs, each run briefly): XLA's CPU
#: backend at optimisation level 0 compiles them about 40% faster (tests/test_units.py:
#: 91 s -> 56 s). Flags the caller set are kept; subprocesses inherit the setting.
#: Programs compiled in under a second are cached too (JAX's default skips them): another
#: test compiling the same program loads it (about 6% of the suite's time).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    _flags = os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    os.environ["XLA_FLAGS"] = _flags.strip()

import jax  # noqa: E402
import numpy as np
import pytest

from metaplastic.inner._network import Network
from metaplastic.rules._signals import LocalSignals
from metaplastic.tasks._classification import ClassificationTask
from metaplastic.tasks._data import load_dataset, split_pools
from metaplastic.tasks._problem import Problem

POOL_TERMS = ["pseudo_gradient", "error_hebbian", "oja"]

#: XLA's CPU compiler maps memory for every compiled program; a whole-suite process holds
#: thousands of them and can reach the kernel's per-process limit on memory maps
#: (vm.max_map_count, 65530 by default), after which a compile crashes with a segmentation
#: fault. Past this many maps, the compiled-program caches are dropped between test files.
MAX_MAPS = 40_000


def _memory_maps() -> int:
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux: no such limit to watch
        return 0


@pytest.fixture(autouse=True, scope="module")
def _bounded_compile_caches():
    yield
    if _memory_maps() > MAX_MAPS:
        jax.clear_caches()


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="session")
def pools(digits):
    return split_pools(digits, 0.5, 0)


@pytest.fixture(scope="session")
def small_net():
    return Network((64, 7, 5, 3), beta=10.0)


@pytest.fixture(scope="session")
def small_task():
    return ClassificationTask(n_way=3, k_shot=4, q_query=3)


@pytest.fixture(scope="session")
def small_problem(small_net, small_task, pools):
    return Problem(small_net, "fa", small_task, pools[0])


def random_signals(seed: int, n_out: int = 4, n_in: int = 3, dtype=np.float32) -> LocalSignals:
    rng = np.random.default_rng(seed)
    return LocalSignals(
        x=rng.normal(size=n_in).astype(dtype),
        y=rng.normal(size=n_out).astype(dtype),
        e=rng.normal(size=n_out).astype(dtype),
        e_pre=rng.normal(size=n_in).astype(dtype),
        W=rng.normal(size=(n_out, n_in)).astype(dtype),
        ybar=rng.uniform(0.0, 1.0, size=n_out).astype(dtype),
        theta_M=rng.uniform(0.0, 1.0, size=n_out).astype(dtype),
        nrm0=rng.uniform(0.5, 2.0, size=n_out).astype(dtype),
    )


@pytest.fixture
def key():
    return jax.random.key(0)


def tiny_task(**train) -> str:
    """A task file for plumbing tests of whole runs: 3-way digits, a 6-unit hidden layer,
    3 meta-steps; ``train`` adds or replaces ``[train]`` keys (TOML values)."""
    table = {
        "meta_batch": 2,
        "episodes": 6,
        "eval_episodes": 8,
        "lr": 0.01,
        "require_improvement": False,  # a few steps need not improve the rule
        "val_episodes": 8,
    }
    table.update(train)

    def toml(v):
        return str(v).lower() if isinstance(v, bool) else repr(v)

    lines = [f"{k} = {toml(v)}" for k, v in table.items()]
    return (
        '[task]\ndataset = "digits"\nn_way = 3\nk_shot = 2\nq_query = 2\n\n'
        "[network]\nhidden = [6]\n\n[train]\n" + "\n".join(lines) + "\n"
    )
