"""The seed-paper study scripts run end to end in their --quick form."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_script(name: str, *args: str) -> None:
    cmd = [sys.executable, str(ROOT / "scripts" / name), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]


@pytest.mark.slow  # a study script end to end: 10-50 s each (`-m slow`)
def test_oja_constraints_quick(tmp_path):
    out = tmp_path / "oja"
    run_script(
        "oja_constraints.py",
        "--quick",
        "--episodes",
        "16",
        "--eval-episodes",
        "8",
        "--conditions",
        "deep",
        "--out",
        str(out),
    )
    rows = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in rows} == {"backprop", "backprop + Oja", "FA", "FA + Oja"}
    assert {r["condition"] for r in rows} == {"deep"}
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 1.0
        assert np.isfinite(r["effective_rank"]) and 1.0 <= r["effective_rank"] <= r["width"]
        if r["method"].endswith("+ Oja"):  # tuned on meta-train episodes, 0 in the grid
            grid = r["oja_grid"]
            assert any(g["oja"] == 0.0 for g in grid)
            best = max(g["val_accuracy"] for g in grid)
            chosen = next(g for g in grid if g["oja"] == r["coefficients"]["oja"])
            assert chosen["val_accuracy"] == best
    assert (out / "results.md").read_text().count("\n| ") >= 4
    assert (out / "accuracy.png").stat().st_size > 0


@pytest.mark.slow  # a study script end to end: 10-50 s each (`-m slow`)
def test_scaling_normalization_quick(tmp_path):
    out = tmp_path / "scaling"
    run_script(
        "scaling_normalization.py",
        "--quick",
        "--seeds",
        "2",
        "--epochs",
        "1",
        "--conditions",
        "none",
        "batch_norm",
        "scaling_layer_mean",
        "scaling_norm",
        "--meta",
        "--meta-generations",
        "2",
        "--out",
        str(out),
    )
    rows = json.loads((out / "results.json").read_text())
    assert [r["condition"] for r in rows] == [
        "none",
        "batch_norm",
        "scaling_layer_mean",
        "scaling_norm",
        "scaling_meta",
    ]
    meta = json.loads((out / "meta.json").read_text())
    assert len(meta["history"]) == 2
    assert set(meta["learned"]) == {"scaling_fixed", "scaling_layer_mean", "scaling_norm"}
    assert (out / "meta.png").stat().st_size > 0
    for r in rows:
        assert len(r["test_accuracy"]["per_seed"]) == 2
        assert 0.0 <= r["test_accuracy"]["mean"] <= 1.0
        assert r["activity_cv"]["mean"] >= 0.0
    # the scaling step changes training (it is applied, not silently skipped)
    none = rows[0]["test_accuracy"]["per_seed"]
    assert rows[2]["test_accuracy"]["per_seed"] != none
    assert (out / "accuracy.png").stat().st_size > 0


@pytest.mark.slow  # a study script end to end: 10-50 s each (`-m slow`)
def test_inhibitory_normalization_quick(tmp_path):
    out = tmp_path / "inhib"
    run_script(
        "inhibitory_normalization.py",
        "--quick",
        "--seeds",
        "2",
        "--epochs",
        "2",
        "--eps",
        "0",
        "0.75",
        "--conditions",
        "ei",
        "inorm_gradnorm",
        "--meta",
        "--meta-generations",
        "2",
        "--out",
        str(out),
    )
    res = json.loads((out / "results.json").read_text())
    rows = res["rows"]
    assert {(r["condition"], r["eps"]) for r in rows} == {
        (c, e) for c in ("ei", "inorm_gradnorm", "inorm_meta") for e in (0.0, 0.75)
    }
    for r in rows:
        assert len(r["test_accuracy"]["per_seed"]) == 2
        assert 0.0 <= r["test_accuracy"]["mean"] <= 1.0
        if r["condition"] == "ei":
            assert r["grad_cos_ln"] is None
        else:  # alignment with layer norm is a cosine
            assert -1.0 <= r["grad_cos_ln"]["mean"] <= 1.0
            assert -1.0 <= r["output_cos_ln"]["mean"] <= 1.0
    # the luminosity shift is applied: the two eps values give different runs
    ei = [r["test_accuracy"]["per_seed"] for r in rows if r["condition"] == "ei"]
    assert ei[0] != ei[1]
    assert len(res["meta"]["history"]) == 2 and set(res["meta"]["learned"]) == {
        "log10_lam_mean",
        "log10_lam_var",
        "alpha",
        "beta",
    }
    assert (out / "accuracy.png").stat().st_size > 0 and (out / "meta.png").stat().st_size > 0


@pytest.mark.slow  # a study script end to end: 10-50 s each (`-m slow`)
def test_profile_meta_step_small(tmp_path):
    """The profiling script traces a small set-up and reports per-op busy time; an unknown
    preset is one line and exit code 2."""
    out = tmp_path / "profile.json"
    run_script(
        "profile_meta_step.py",
        *("--rule", "pool", "--task", "digits", "--runs", "2", "--top", "5"),
        *("--json", str(out)),
    )
    data = json.loads(out.read_text())
    for key in ("forward_episode", "forward_mode_meta_gradient"):
        part = data[key]
        assert part["wall_ms_per_episode"] > 0 and part["busy_ms_per_episode_all_threads"] > 0
        assert 0 < len(part["top_op_groups_ms"]) <= 5
    bad = subprocess.run(
        [sys.executable, "scripts/profile_meta_step.py", "--rule", "nope"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert bad.returncode == 2 and "error" in bad.stderr and len(bad.stderr.splitlines()) == 1


def test_bench_kernels_runs(tmp_path):
    """The micro-benchmark script times every case and writes JSON."""
    out = tmp_path / "kernels.json"
    run_script("bench_kernels.py", "--repeats", "1", "--json", str(out))
    data = json.loads(out.read_text())
    for case in ("transposed_matvec", "sampler", "rank_one_update"):
        assert len(data[case]) == 2 and all(v > 0 for v in data[case].values())


@pytest.mark.slow  # a study script end to end: 10-50 s each (`-m slow`)
def test_bench_vmap_width_runs(tmp_path):
    """The script behind the train.vmap_width default times every width for both outer
    loops and writes JSON (tiny task, one repeat)."""
    from .test_checkpoint import TASK

    task = tmp_path / "tiny.toml"
    task.write_text(TASK)
    out = tmp_path / "vmap.json"
    run_script(
        "bench_vmap_width.py",
        "--task",
        str(task),
        "--widths=-1",
        "--meta-batch",
        "2",
        "--population",
        "2",
        "--repeats",
        "1",
        "--steps",
        "1",
        "--json",
        str(out),
    )
    data = json.loads(out.read_text())
    for outer in ("adam_forward", "open_es"):
        assert set(data[outer]) == {"-1"}
        assert all(v["ms_per_episode"] > 0 for v in data[outer].values())


@pytest.mark.slow  # a study script end to end: 10-50 s each (`-m slow`)
def test_oja_grid_runs_a_point_and_resumes(tmp_path):
    """One tiny grid point: train + export through the CLI, a record with the exported
    equation, the table; a second call finds the point done and does not re-run it."""
    out = tmp_path / "grid"
    args = ["--dims", "3", "--scales", "2", "--steps", "30", "--decays", "0.5", "--out"]
    sets = ["--set", "train.episodes=32", "--set", "train.eval_episodes=16"]
    sets += ["--set", "train.val_episodes=16", "--set", "train.prune_episodes=16"]
    sets += ["--set", "train.prune_refit=3"]
    run_script("oja_grid.py", *args, str(out), *sets)
    rec = json.loads((out / "results.json").read_text())["points"]
    assert len(rec) == 1 and rec[0]["dim"] == 3 and rec[0]["input_scale"] == 2.0
    assert rec[0]["exit"] in (0, 1) and rec[0]["status"]
    run_dir = out / "runs" / "d3_s2_T30_g0.5_seed0"
    assert (run_dir / "summary.json").exists() and not (run_dir / "checkpoints").exists()
    stamp = (run_dir / "summary.json").stat().st_mtime_ns
    run_script("oja_grid.py", *args, str(out), *sets)
    assert (run_dir / "summary.json").stat().st_mtime_ns == stamp
    assert "Oja rediscovery grid" in (out / "results.md").read_text()
