"""The command line end to end on a tiny configuration, and its error handling."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import tomllib

import numpy as np
import pytest
from click.testing import CliRunner

from metaplastic.run._cli import main

from .conftest import tiny_task

TINY_TASK = tiny_task()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    task = d / "tiny.toml"
    task.write_text(TINY_TASK)
    out = d / "run"
    res = CliRunner().invoke(
        main,
        [
            "train",
            "--rule",
            "pool",
            "--task",
            str(task),
            "--out",
            str(out),
            "--seed",
            "3",
            "--quiet",
            "--set",
            "train.log_every=1",
        ],
    )
    assert res.exit_code == 0, res.output
    return out, res


def test_train_writes_run_directory(tiny_run):
    out, res = tiny_run
    for name in (
        "config.toml",
        "metrics.jsonl",
        "summary.json",
        "rule.json",
        "rule.tex",
        "meta_loss.png",
        "meta_accuracy.png",
        "coefficients.png",
    ):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert isinstance(summary["rule_equation"], str) and summary["rule_equation"].startswith("dW")
    assert set(summary["coefficients"]) == {"pseudo_gradient", "error_hebbian", "oja"}
    mt = summary["meta_test"]["learned"]
    assert 0.0 <= mt["accuracy"] <= 1.0 and mt["ci95"][0] <= mt["accuracy"] <= mt["ci95"][1]
    assert mt["episodes"] == 8
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    cfg = tomllib.loads((out / "config.toml").read_text())
    assert cfg["train"]["seed"] == 3 and cfg["network"]["hidden"] == [6]
    assert "learned rule: dW" in res.output


def test_evaluate_and_export(tiny_run):
    out, _ = tiny_run
    runner = CliRunner()
    res = runner.invoke(main, ["evaluate", str(out), "--episodes", "8"])
    assert res.exit_code == 0, res.output
    ev = json.loads((out / "evaluate.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    # same seed and episodes: evaluation reproduces the run's own meta-test number
    assert ev["learned"]["accuracy"] == pytest.approx(summary["meta_test"]["learned"]["accuracy"])
    res = runner.invoke(main, ["export", str(out), "--format", "latex", "--no-check"])
    assert res.exit_code == 0 and res.stdout.startswith(r"\Delta W =")
    res = runner.invoke(main, ["export", str(out), "--format", "json", "--check-episodes", "8"])
    data = json.loads(res.stdout)  # the round-trip report goes to stderr for json
    assert data["terms"] == ["pseudo_gradient", "error_hebbian", "oja"]
    rt = json.loads((out / "export.json").read_text())["round_trip"]
    # the exported equation (4 significant digits) performs like the learned parameters
    assert abs(rt["difference"]) < 0.05
    res = runner.invoke(main, ["export", str(out), "--threshold", "10", "--no-check"])
    assert res.stdout.strip() == "dW = 0"
    res = runner.invoke(main, ["export", str(out), "--python", "--no-check"])
    assert res.exit_code == 2
    res = runner.invoke(main, ["export", str(out), "--format", "python", "--no-check"])
    assert res.exit_code == 0 and "def delta_w(" in res.stdout


def test_list_commands():
    runner = CliRunner()
    assert "oja" in runner.invoke(main, ["list", "terms"]).output
    assert "pool" in runner.invoke(main, ["list", "rules"]).output
    assert "digits" in runner.invoke(main, ["list", "tasks"]).output


@pytest.mark.parametrize(
    "args,msg",
    [
        (["train", "--rule", "pol", "--task", "digits"], "did you mean 'pool'"),
        (["train", "--rule", "pool", "--task", "digits", "--set", "train.lr=-1"], "positive"),
        (["train", "--rule", "pool", "--task", "digits", "--feedback", "fb"], "feedback mode"),
        (["evaluate", "/nonexistent/run"], "no such run directory"),
        (["export", "/nonexistent/run", "--format", "text"], "no such run directory"),
    ],
)
def test_user_errors_exit_2_with_one_line(args, msg):
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2
    assert msg in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert "Traceback" not in res.output


def test_corrupt_rule_json_is_reported(tiny_run, tmp_path):
    out, _ = tiny_run
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.toml").write_text((out / "config.toml").read_text())
    (bad / "rule.json").write_text('{"kind": "term_pool", "the')
    res = CliRunner().invoke(main, ["export", str(bad)])
    assert res.exit_code == 2 and "corrupt JSON" in res.stderr


def test_malformed_rule_file_subprocess(tmp_path):
    rule = tmp_path / "bad.toml"
    rule.write_text("[rule]\nterms = ['pseudo_gradient', 'ojja']\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "metaplastic",
            "train",
            "--rule",
            str(rule),
            "--task",
            "digits",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "did you mean 'oja'" in lines[0] and "bad.toml" in lines[0]


@pytest.mark.parametrize(
    "args",
    [
        ["--modes", "sideways"],
        ["--modes", ","],
        ["--meta-batch", "-1"],
        ["--unrolls", "a,b"],
        ["--vmap-width", "-2"],
    ],
)
def test_bench_rejects_bad_options(args):
    """Bad bench options fail before any timing, with exit code 2 and a one-line reason."""
    res = CliRunner().invoke(main, ["bench", *args])
    assert res.exit_code == 2
    assert res.output.strip().count("\n") == 0 and "error" in res.output


def test_rule_no_better_than_its_start_fails_and_export_refuses(tmp_path):
    """A run whose learned rule does not beat its start on validation episodes exits 1 with
    one line and status "no_improvement"; export refuses it unless --allow-failed."""
    task = tmp_path / "tiny.toml"
    task.write_text(TINY_TASK)
    out = tmp_path / "run"
    args = ["train", "--rule", "pool", "--task", str(task), "--out", str(out), "--quiet"]
    # lr 1e-9: the rule does not move, so it is exactly as good as its start
    res = CliRunner().invoke(
        main, [*args, "--lr", "1e-9", "--set", "train.require_improvement=true"]
    )
    assert res.exit_code == 1, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("metaplastic:")]
    assert len(lines) == 1 and "no_improvement" in lines[0] and str(out) in lines[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"].startswith("no_improvement:")
    assert summary["validation"]["improvement"]["mean"] == pytest.approx(0.0, abs=1e-6)
    assert "learned" in summary["meta_test"]  # everything finished so far is kept
    res = CliRunner().invoke(main, ["export", str(out), "--no-check"])
    assert res.exit_code == 2 and "--allow-failed" in res.output
    res = CliRunner().invoke(main, ["export", str(out), "--no-check", "--allow-failed"])
    assert res.exit_code == 0 and res.stdout.startswith("dW =")


def test_run_status_checks_in_order():
    """The end-of-run verdict: diverged, then too many bad steps, then no improvement."""
    from metaplastic.run._config import build_config
    from metaplastic.run._run import run_status

    cfg = build_config("pool", "digits")
    n = 100
    start = (np.full(n, 0.3), np.zeros(n, bool))
    better = (np.full(n, 0.3) + np.linspace(0.05, 0.15, n), np.zeros(n, bool))
    assert run_status(cfg, start, better, 0, 10)[0] == "ok"
    blown = (better[0], np.arange(n) < 6)  # 6% > max_diverged 5%
    assert run_status(cfg, start, blown, 0, 10)[0].startswith("diverged:")
    assert run_status(cfg, start, (better[0], np.arange(n) < 5), 0, 10)[0] == "ok"
    assert run_status(cfg, start, better, 3, 10)[0].startswith("skipped:")  # 30% > 25%
    assert run_status(cfg, start, better, 2, 10)[0] == "ok"
    same = (start[0] + np.linspace(-0.01, 0.011, n), start[1])
    status, info = run_status(cfg, start, same, 0, 10)
    assert status.startswith("no_improvement:") and info["improvement"]["ci95"][0] < 0
    off = cfg.replace(train=dataclasses.replace(cfg.train, require_improvement=False))
    assert run_status(off, start, same, 0, 10)[0] == "ok"


def test_train_with_several_seeds_aggregates(tmp_path):
    """--seeds N: one run per seed under OUT/seed-<s>, then per-seed meta-test lists,
    mean ± sd, sign agreement and a seed chosen on validation in OUT/summary.json."""
    task = tmp_path / "tiny.toml"
    task.write_text(TINY_TASK)
    out = tmp_path / "multi"
    args = ["train", "--rule", "pool", "--task", str(task), "--out", str(out), "--quiet"]
    res = CliRunner().invoke(main, [*args, "--seeds", "2", "--seed", "5"])
    assert res.exit_code == 0, res.output
    agg = json.loads((out / "summary.json").read_text())
    assert agg["status"] == "ok" and agg["seeds"] == [5, 6]
    per_seed = [json.loads((out / f"seed-{s}" / "summary.json").read_text()) for s in (5, 6)]
    assert agg["test"]["learned"] == [p["meta_test"]["learned"]["accuracy"] for p in per_seed]
    assert per_seed[0]["coefficients"] != per_seed[1]["coefficients"]  # different keys
    st = agg["test_stats"]["learned"]
    assert st["n"] == 2 and st["mean"] == pytest.approx(np.mean(agg["test"]["learned"]))
    assert st["sd"] == pytest.approx(np.std(agg["test"]["learned"], ddof=1))
    vals = [p["validation"]["learned"]["score"] for p in per_seed]
    assert agg["selected_seed"] == (5, 6)[int(np.argmax(vals))]
    assert set(agg["sign_agreement"]) == {"pseudo_gradient", "error_hebbian", "oja"}
    assert "mean ± sd" in (out / "results.md").read_text()


def test_sign_agreement():
    from metaplastic.run._run import sign_agreement

    coefs = [{"a": 1.0, "b": [1.0, -1.0]}, {"a": 2.0, "b": [1.0, 1.0]}, {"a": -1.0, "b": [1, 1]}]
    got = sign_agreement(coefs)
    assert got["a"] == pytest.approx(2 / 3) and got["b"] == pytest.approx(2 / 3)
    assert sign_agreement([{"a": 1.0}, {"a": 3.0}]) == {"a": 1.0}


def test_evaluating_an_equation_that_blows_up_exits_1():
    """A held-out accuracy made of blown-up episodes is not a result: table, then one line."""
    res = CliRunner().invoke(main, ["evaluate", "--equation", "50*y*x.T", "--episodes", "8"])
    assert res.exit_code == 1, res.output
    assert "(8 diverged)" in res.stdout
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("metaplastic:")]
    assert len(lines) == 1 and "diverged on 8 of 8" in lines[0]


def test_export_prune_refit_refusals(tiny_run, tmp_path):
    """--prune-refit: negative, or on a run trained by an evolution strategy (refitting
    uses the gradient outer loop), is one line with exit 2."""
    out, _ = tiny_run
    runner = CliRunner()
    res = runner.invoke(main, ["export", str(out), "--prune-effect", "0.01", "--prune-refit", "-1"])
    assert res.exit_code == 2 and "--prune-refit must be >= 0" in res.stderr
    es_run = tmp_path / "es_run"
    shutil.copytree(out, es_run)
    cfg = (es_run / "config.toml").read_text()
    assert 'outer = "adam"' in cfg
    (es_run / "config.toml").write_text(cfg.replace('outer = "adam"', 'outer = "open_es"'))
    res = runner.invoke(
        main, ["export", str(es_run), "--prune-effect", "0.01", "--prune-refit", "3"]
    )
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "gradient outer loop" in res.stderr and "Traceback" not in res.output
    assert "this run used 'open_es'" in res.stderr  # refused before any pruning work


@pytest.mark.slow  # about 25 s: two trainers and the ES evaluation compiled, one child process
def test_bench_reports_every_mode_it_times_and_the_mode_auto_picks(tmp_path):
    """The benchmark on a tiny task (one timed meta-step): per-mode times (``auto``
    included), the mode ``auto`` chose, and per-mode peak memory at each unroll length."""
    from metaplastic.run import run_bench

    task = tmp_path / "tiny.toml"
    task.write_text(TINY_TASK)
    data = run_bench(
        "pool", str(task), repeats=1, steps=1, es_batch=2, unrolls=(20,),
        progress=lambda m: None, modes=("auto", "checkpoint"),
    )  # fmt: skip
    assert set(data["meta_grad_ms_per_episode"]) == {"auto", "checkpoint"}
    assert all(v > 0 for v in data["meta_grad_ms_per_episode"].values())
    assert data["auto_mode"] == "forward"  # 3 coefficients
    assert set(data["peak_rss_mb"]) == {"checkpoint"}  # auto's memory is its mode's
    assert data["peak_rss_mb"]["checkpoint"]["20"] > 0
