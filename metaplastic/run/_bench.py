"""Speed and memory benchmark of the meta-step; prints and writes JSON.

Keys: ``meta_grad_ms_per_episode`` (per gradient mode, ``auto`` included: median over
repeats of a jitted meta-step's time divided by the meta-batch), ``auto_mode`` (the mode
``train.gradient = "auto"`` picks for this rule), ``es_eval_ms_per_episode`` (forward-only
inner loop, vmapped over a batch of episodes, as an evolution-strategy evaluation would run
it), ``compile_s`` (first meta-step, per mode), ``unusable_modes`` (``native`` where the
set-up is outside its scope, with the one-line reason; its timings are then null),
``peak_rss_mb`` (per mode: peak resident memory of a fresh process that runs one meta-step
at unroll lengths T = 250, 1000, 4000, with K scaled so that ``n_way * K = T``),
``device``, ``jax``.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import equinox as eqx
import jax

from .._errors import MetaplasticError
from ..outer._gradient import GRADIENT_MODES  # the modes the benchmark can time and measure
from ._config import build_config
from ._run import build_rule, build_setup, make_trainer

UNROLLS = (250, 1000, 4000)


def bench_trainer(rule_spec: str, task_spec: str, mode: str, overrides=()):
    """The run's own trainer (via :func:`make_trainer`) with the gradient mode forced."""
    extra = [f"train.gradient='{mode}'"]
    cfg = build_config(rule_spec, task_spec, overrides=[*overrides, *extra])
    setup = build_setup(cfg)
    rule = build_rule(cfg, setup.net.n_layers)
    return cfg, setup, rule, make_trainer(cfg, setup, rule)


def _time_meta_step(rule_spec, task_spec, mode, repeats, steps, overrides=()):
    """``(ms per episode, compile seconds, config, the mode the trainer resolved)``."""
    cfg, _, rule, tr = bench_trainer(rule_spec, task_spec, mode, overrides)
    state = tr.init(rule, jax.random.key(0))
    t0 = time.perf_counter()
    state, _ = tr.step(state)
    jax.block_until_ready(state)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            state, _ = tr.step(state)
        jax.block_until_ready(state)
        times.append((time.perf_counter() - t0) / steps / cfg.train.meta_batch)
    return 1e3 * statistics.median(times), compile_s, cfg, tr.mode


def _time_es_eval(rule_spec, task_spec, batch, repeats):
    cfg, setup, rule, _ = bench_trainer(rule_spec, task_spec, "forward")
    problem = setup.problem(cfg)
    f = eqx.filter_jit(lambda r, k: problem.meta_loss(r, jax.random.split(k, batch), 0.0)[0])
    jax.block_until_ready(f(rule, jax.random.key(0)))
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(rule, jax.random.key(i + 1)))
        times.append((time.perf_counter() - t0) / batch)
    return 1e3 * statistics.median(times)


def _child_rss(rule_spec: str, task_spec: str, T: int, mode: str) -> dict[str, float]:
    """Run in a fresh process: one meta-step at unroll length T.

    Returns the process's peak RSS and how far the meta-step (compile + run) raised it
    above the resident size just before it, both in MB.
    """
    cfg = build_config(rule_spec, task_spec)
    k = max(1, T // cfg.task.n_way)
    overrides = [f"task.k_shot={k}", "train.meta_batch=1", "train.episodes=1"]
    _, _, rule, tr = bench_trainer(rule_spec, task_spec, mode, overrides)
    state = tr.init(rule, jax.random.key(0))
    jax.block_until_ready(state)
    with open("/proc/self/statm") as f:  # resident pages before the meta-step (Linux)
        before = int(f.read().split()[1]) * resource.getpagesize() / 2**20
    state, _ = tr.step(state)
    jax.block_until_ready(state)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return {"peak": peak, "step": peak - before}


def run_bench(
    rule_spec: str = "reference_pool",
    task_spec: str = "fashion_mnist_reference",
    repeats: int = 5,
    steps: int = 10,
    es_batch: int = 8,
    unrolls=UNROLLS,
    progress=print,
    meta_batch: int = 0,
    modes=GRADIENT_MODES,
    vmap_width: int | None = None,
) -> dict[str, Any]:
    """``meta_batch > 0`` overrides the task's meta-batch for the timings (the per-episode
    time is amortised over it); memory is always measured at meta-batch 1. ``modes``: some
    of :data:`GRADIENT_MODES`, timed and measured (``auto`` is timed only: its memory is
    that of the mode it picks). ``vmap_width`` overrides ``train.vmap_width`` for
    the timed meta-steps (the default, 1, runs a meta-batch's episodes one after another;
    -1 vmaps them all at once)."""
    modes = tuple(modes)
    if not modes or any(m not in GRADIENT_MODES for m in modes):
        raise MetaplasticError(
            f"bench modes {list(modes)}: give some of {', '.join(GRADIENT_MODES)}, comma-separated"
        )
    if meta_batch < 0:
        raise MetaplasticError(f"--meta-batch must be >= 0 (0 = the task's), got {meta_batch}")
    if vmap_width is not None and vmap_width < -1:
        raise MetaplasticError(
            f"--vmap-width must be >= -1 (0 = auto, -1 = the whole meta-batch), got {vmap_width}"
        )
    out: dict[str, Any] = {
        "rule": rule_spec,
        "task": task_spec,
        "jax": jax.__version__,
        "device": str(jax.devices()[0]),
        "device_kind": jax.devices()[0].device_kind,
    }
    grad, compile_s, auto_mode = {}, {}, None
    over = [f"train.meta_batch={meta_batch}"] if meta_batch > 0 else []
    if vmap_width is not None:
        over.append(f"train.vmap_width={vmap_width}")
    unusable: dict[str, str] = {}
    cfg = None
    for mode in modes:
        progress(f"timing {mode}-mode meta-gradients ...")
        try:
            ms, cs, cfg, resolved = _time_meta_step(
                rule_spec, task_spec, mode, repeats, steps, over
            )
        except MetaplasticError as err:  # a mode this set-up cannot use (native's scope)
            if mode != "native":
                raise
            unusable[mode] = str(err)
            grad[mode] = compile_s[mode] = None
            progress(f"  {err}")
            continue
        grad[mode], compile_s[mode] = round(ms, 2), round(cs, 2)
        if mode == "auto":
            auto_mode = resolved
    if cfg is None:
        cfg = bench_trainer(rule_spec, task_spec, "forward", over)[0]
    out["meta_batch"] = cfg.train.meta_batch
    out["vmap_width"] = cfg.train.vmap_width
    out["unroll_steps"] = cfg.task.n_way * cfg.task.k_shot
    out["meta_grad_ms_per_episode"] = grad
    if auto_mode is None:
        auto_mode = bench_trainer(rule_spec, task_spec, "auto", over)[3].mode
    out["auto_mode"] = auto_mode
    out["compile_s"] = compile_s
    out["unusable_modes"] = unusable  # mode -> why it cannot run this set-up (null timings)
    progress("timing forward-only (ES) evaluation ...")
    out["es_eval_ms_per_episode"] = round(_time_es_eval(rule_spec, task_spec, es_batch, repeats), 2)
    out["es_eval_batch"] = es_batch
    rss: dict[str, dict[str, float]] = {}
    extra: dict[str, dict[str, float]] = {}
    for mode in (m for m in modes if m != "auto"):
        rss[mode], extra[mode] = {}, {}
        if mode in unusable:
            rss[mode] = {str(T): None for T in unrolls}
            extra[mode] = dict(rss[mode])
            continue
        for T in unrolls:
            progress(f"peak memory, {mode}, T={T} ...")
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "metaplastic.run._bench",
                    rule_spec,
                    task_spec,
                    str(T),
                    mode,
                ],
                capture_output=True,
                text=True,
                timeout=900,
            )
            if proc.returncode != 0:
                rss[mode][str(T)] = extra[mode][str(T)] = None
                progress(f"  failed: {proc.stderr.strip().splitlines()[-1:]}")
            else:
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                rss[mode][str(T)] = round(r["peak"], 1)
                extra[mode][str(T)] = round(r["step"], 1)
    out["peak_rss_mb"] = rss
    out["meta_step_rss_increase_mb"] = extra
    return out


if __name__ == "__main__":  # child process for the memory measurement
    r, t, T, m = sys.argv[1:5]
    print(json.dumps(_child_rss(r, t, int(T), m)))
