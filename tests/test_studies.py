"""The seed-paper study scripts run end to end in their --quick form."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_script(name: str, *args: str) -> None:
    cmd = [sys.executable, str(ROOT / "scripts" / name), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]


STUDIES = ("oja_constraints", "scaling_normalization", "inhibitory_normalization")


def check_verdict(path: Path, quick: bool) -> list[dict]:
    """The contract of a study's verdict.json: claims with a verdict, seeds and evidence."""
    doc = json.loads(path.read_text())
    assert doc["quick"] is quick
    assert doc["claims"], "a verdict file names at least one claim"
    for c in doc["claims"]:
        assert c["verdict"] in ("reproduced", "partly", "not"), c
        assert isinstance(c["claim"], str) and c["claim"]
        assert isinstance(c["seeds"], int) and c["seeds"] >= 1
        assert c["evidence"]
    return doc["claims"]


@pytest.mark.parametrize("study", STUDIES)
def test_committed_verdicts_come_from_full_runs_with_enough_seeds(study):
    """Each committed study verdict is a full run (not --quick) resting on >= 5 seeds
    (>= 3 meta-training seeds for meta-learned rows)."""
    path = ROOT / "results" / study / "verdict.json"
    if not path.exists():
        pytest.skip(f"{study}: no full run committed yet")
    for c in check_verdict(path, quick=False):
        assert c["seeds"] >= (3 if "meta-learned" in c["claim"] else 5), c


def test_the_docs_verdict_table_is_what_the_committed_verdicts_say():
    """docs/results/seed-papers.md carries scripts/seed_paper_verdicts.py's table of the
    committed verdict.json files, so a re-run study cannot leave stale verdicts there."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "seed_paper_verdicts", ROOT / "scripts" / "seed_paper_verdicts.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    page = (ROOT / "docs" / "results" / "seed-papers.md").read_text()
    assert mod.table(ROOT) in page


@pytest.mark.slow  # a study script end to end: 1-3 min each (`-m slow`)
def test_oja_constraints_quick(tmp_path):
    out = tmp_path / "oja"
    args = ["--quick", "--eval-episodes", "8", "--conditions", "deep", "--out", str(out)]
    args += ["--meta", "--meta-seeds", "1", "--meta-conditions", "deep"]
    run_script("oja_constraints.py", *args)
    rows = json.loads((out / "results.json").read_text())
    meta = [r for r in rows if r["method"] == "backprop + Oja (meta-learned)"]
    rows = [r for r in rows if r not in meta]
    assert {r["method"] for r in rows} == {"backprop", "backprop + Oja", "FA", "FA + Oja"}
    assert {r["condition"] for r in rows} == {"deep"}
    # the meta-learned row: one run per outer-loop step size, the validation-best tested
    # (runs that passed their own checks first)
    (m,) = meta
    cands = m["candidates"]
    assert sorted(c["meta_lr"] for c in cands) == [3e-4, 3e-3]
    best = max(cands, key=lambda c: (c["run_status"] == "ok", c["val_accuracy"]))
    assert m["meta_lr"] == best["meta_lr"] and m["run_status"] == best["run_status"]
    assert m["vs_plain"]["n"] == 16 and len(m["seed_means"]) == 2
    for r in rows:
        assert 0.0 <= r["ci95"][0] <= r["accuracy"] <= r["ci95"][1] <= 1.0
        assert len(r["seed_means"]) == 2 and len(r["diverged"]) == 2
        # the same budget for every method, and the winner is the best on validation
        assert len(r["tuning"]) == 4
        best = max(g["val_accuracy"] for g in r["tuning"])
        chosen = [g for g in r["tuning"] if g["eta"] == r["coefficients"]["pseudo_gradient"]]
        assert any(g["oja"] == r["coefficients"]["oja"] for g in chosen)
        assert max(g["val_accuracy"] for g in chosen) == best
        if r["method"].endswith("+ Oja"):  # 0 is in its grid, and it is paired
            assert any(g["oja"] == 0.0 for g in r["tuning"])
            assert r["vs_plain"]["n"] == 16
    check_verdict(out / "verdict.json", quick=True)
    progress = json.loads((out / "progress.json").read_text())
    assert len(progress["rows"]) == 5 and len(progress["meta_runs"]) == 2
    # a second run resumes: every row is taken from progress.json, none is recomputed
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "oja_constraints.py"), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((out / "results.json").read_text()) == rows + meta


@pytest.mark.slow  # a study script end to end: 1-3 min each (`-m slow`)
def test_scaling_normalization_quick(tmp_path):
    out = tmp_path / "scaling"
    run_script(
        "scaling_normalization.py",
        "--quick",
        "--epochs",
        "1",
        "--conditions",
        "none",
        "batch_norm",
        "scaling_fixed",
        "scaling_bounded",
        "--meta",
        "--meta-generations",
        "2",
        "--out",
        str(out),
    )
    res = json.loads((out / "results.json").read_text())
    chosen = res["chosen"]
    assert [r["condition"] for r in chosen] == [
        "none",
        "batch_norm",
        "scaling_fixed",
        "scaling_bounded",
        "scaling_meta",
    ]
    # budgets: two rates each, the judged variant also two strengths
    runs = {(r["condition"], r["lr"], r["gamma"]) for r in res["runs"]}
    assert len([x for x in runs if x[0] == "scaling_bounded"]) == 4
    assert len([x for x in runs if x[0] == "none"]) == 2
    for r in chosen:  # chosen on validation
        same = [x for x in res["runs"] if x["condition"] == r["condition"]]
        assert r["val_accuracy"]["mean"] == max(x["val_accuracy"]["mean"] for x in same)
        assert len(r["test_accuracy"]["per_seed"]) == 2
        assert 0.0 <= r["test_accuracy"]["mean"] <= 1.0
    meta = res["meta"]["digits"]
    assert len(meta["history"]) == 2
    assert set(meta["learned"]) == {"scaling_fixed", "scaling_layer_mean", "scaling_norm"}
    # the scaling step changes training (it is applied, not silently skipped)
    by = {(x["condition"], x["lr"]): x["test_accuracy"]["per_seed"] for x in res["runs"]}
    assert by[("scaling_fixed", 0.1)] != by[("none", 0.1)]
    check_verdict(out / "verdict.json", quick=True)
    assert (out / "accuracy.png").stat().st_size > 0


@pytest.mark.slow  # a study script end to end: 1-3 min each (`-m slow`)
def test_inhibitory_normalization_quick(tmp_path):
    out = tmp_path / "inhib"
    run_script(
        "inhibitory_normalization.py",
        "--quick",
        "--epochs",
        "1",
        "--eps",
        "0",
        "0.75",
        "--lrs",
        "0.1",
        "--conditions",
        "ln_e",
        "inorm_ref",
        "inorm_gradnorm_ref",
        "ei",
        "--meta",
        "--meta-generations",
        "2",
        "--out",
        str(out),
    )
    res = json.loads((out / "results.json").read_text())
    rows = res["rows"]
    conds = ("ln_e", "inorm_ref", "inorm_gradnorm_ref", "ei", "inorm_meta")
    assert {(r["condition"], r["eps"]) for r in rows} == {(c, e) for c in conds for e in (0, 0.75)}
    for r in rows:
        assert len(r["test_accuracy"]["per_seed"]) == 2
        assert 0.0 <= r["test_accuracy"]["mean"] <= 1.0
        if r["condition"] in ("ei", "ln_e"):
            assert r["grad_cos_ln"] is None
        else:  # alignment with layer norm is a cosine
            assert -1.0 <= r["grad_cos_ln"]["mean"] <= 1.0
            assert -1.0 <= r["output_cos_ln"]["mean"] <= 1.0
    # the luminosity shift is applied: the two eps values give different runs
    ei = [r["test_accuracy"]["per_seed"] for r in rows if r["condition"] == "ei"]
    assert ei[0] != ei[1]
    assert len(res["meta"]["history"]) == 2
    claims = check_verdict(out / "verdict.json", quick=True)
    assert len(claims) == 3
    assert (out / "accuracy.png").stat().st_size > 0 and (out / "sweep.png").stat().st_size > 0


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
