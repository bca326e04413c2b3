"""Run directories never lose work: --out refuses to overwrite, --force replaces cleanly,
--resume says what is wrong, discover survives Ctrl-C and resumes."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from metaplastic.run._checkpoint import checkpoint_dir
from metaplastic.run._cli import _default_out, main
from metaplastic.run._config import build_config

from .conftest import tiny_task

TASK = tiny_task(checkpoint_every=1)


@pytest.fixture
def task(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(TASK)
    return path


def _one_line_error(res, *needles):
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.output
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _steps(run: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_out_refuses_a_used_directory_and_force_replaces_the_old_run(tmp_path, task):
    out = tmp_path / "run"
    stale = {
        "config.toml": "[rule]\n",
        "metrics.jsonl": '{"step": 99}\n',
        "results.md": "old table\n",
        "export.json": "{}\n",
        "meta_test.png": "old plot",
        "baselines/fa/summary.json": "{}\n",
        "checkpoints/ckpt-00000099.mpk": "old checkpoint",
        "user_terms/old.py": "x = 1\n",
    }
    for name, text in stale.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    (out / "notes.txt").write_text("mine")  # not a run file: kept
    args = ["train", "--rule", "pool", "--task", str(task), "--out", str(out), "--quiet"]
    res = CliRunner().invoke(main, args)
    _one_line_error(res, "already holds files", "--force", f"--resume {out}")
    assert (out / "results.md").read_text() == "old table\n"  # nothing was touched

    res = CliRunner().invoke(main, [*args, "--force"])
    assert res.exit_code == 0, res.output
    for name in ("results.md", "export.json", "meta_test.png", "baselines", "user_terms"):
        assert not (out / name).exists(), name
    assert sorted(p.name for p in checkpoint_dir(out).iterdir())[-1] == "ckpt-00000003.mpk"
    assert not (checkpoint_dir(out) / "ckpt-00000099.mpk").exists()
    assert _steps(out) == [1, 2, 3]
    assert (out / "notes.txt").read_text() == "mine"


def test_force_replaces_only_run_directories(tmp_path, task):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    res = CliRunner().invoke(
        main, ["train", "--rule", "pool", "--task", str(task), "--out", str(out), "--force"]
    )
    _one_line_error(res, "holds no metaplastic run")
    res = CliRunner().invoke(main, ["discover", "--out", str(out), "--force"])
    _one_line_error(res, "holds no metaplastic run")
    assert (out / "thesis.tex").read_text() == "precious"
    res = CliRunner().invoke(main, ["discover", "--out", str(out)])
    _one_line_error(res, "already holds files", "discover --resume")


@pytest.mark.parametrize(
    "args,needle",
    [
        (
            ["train", "--rule", "pool", "--task", "digits", "--out", ""],
            "--out '' names no directory",
        ),
        (["train", "--resume", ""], "--resume '' names no directory"),
        (["discover", "--out", " "], "--out ' ' names no directory"),
        (["discover", "--resume", ""], "--resume '' names no directory"),
        (["train", "--resume", "/nonexistent/run"], "no such run directory"),
        (["discover", "--resume", "/nonexistent/run"], "no such run directory"),
    ],
)
def test_bad_directory_options_are_one_line_errors(args, needle):
    _one_line_error(CliRunner().invoke(main, args), needle)


def test_resume_without_a_checkpoint_says_so(tmp_path, task):
    empty = tmp_path / "empty"
    empty.mkdir()
    res = CliRunner().invoke(main, ["train", "--resume", str(empty)])
    _one_line_error(res, "not a run directory")
    res = CliRunner().invoke(main, ["discover", "--resume", str(empty)])
    _one_line_error(res, "not a discover run directory")
    # a run killed before its first checkpoint: config and metrics rows, no checkpoint
    run = tmp_path / "run"
    run.mkdir()
    import tomli_w

    cfg = build_config("pool", str(task))
    (run / "config.toml").write_text(tomli_w.dumps(cfg.to_dict()))
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    res = CliRunner().invoke(main, ["train", "--resume", str(run)])
    _one_line_error(res, "no checkpoint to resume from", "--force")
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n'  # not started over


def test_default_out_never_collides(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    now = dt.datetime(2024, 1, 2, 3, 4, 5)
    first = _default_out("train-pool-digits", now)
    second = _default_out("train-pool-digits", now)
    assert first == Path("runs/train-pool-digits-20240102-030405")
    assert second == Path("runs/train-pool-digits-20240102-030405-2")
    assert first.is_dir() and second.is_dir()


def test_discover_ctrl_c_exits_130_naming_the_resume_command(monkeypatch, tmp_path):
    import metaplastic.run._run as r

    def interrupted(out, *args, **kwargs):
        raise r.Interrupted(
            out, 4, resume=f"metaplastic discover --resume {out}", what="the fa baseline"
        )

    monkeypatch.setattr(r, "discover", interrupted)
    res = CliRunner().invoke(main, ["discover", "--out", str(tmp_path / "d"), "--quiet"])
    assert res.exit_code == 130
    assert "meta-step 4 of the fa baseline; checkpoint saved. Continue with: " in res.stderr
    assert f"discover --resume {tmp_path / 'd'}" in res.stderr


def test_nested_stop_flags_see_a_signal_caught_by_the_outer_one():
    import signal

    from metaplastic.run._run import _StopFlag

    with _StopFlag() as outer:
        outer._handle(signal.SIGINT, None)  # Ctrl-C between two runs
        with _StopFlag() as inner:
            assert inner.set
        assert _StopFlag._active == [outer]
    assert _StopFlag._active == []


def _thetas(out: Path) -> dict[str, list]:
    runs = {"learned": out, "fa": out / "baselines/fa", "backprop": out / "baselines/backprop"}
    return {
        k: (json.loads((d / "rule.json").read_text())["theta"], (d / "metrics.jsonl").read_text())
        for k, d in runs.items()
    }


@pytest.mark.slow  # ~25 s; the default run keeps test_es_resume_is_bit_identical
def test_discover_interrupted_twice_then_resumed_matches_an_uninterrupted_run(
    tmp_path, task, monkeypatch
):
    import metaplastic.run._run as r

    table = {"seed": 1, "episodes": 6, "eval_episodes": 8}
    ref = tmp_path / "ref"
    r.discover(ref, table, progress=False, task=str(task))

    out = tmp_path / "disc"
    # 1. Ctrl-C while the learned run evaluates (after its loop): stop before the baselines
    plot = r.plot_training

    def plot_then_ctrl_c(metrics, run_dir, title):
        plot(metrics, run_dir, title)
        r._StopFlag._active[0]._handle(2, None)  # discover's own handler

    monkeypatch.setattr(r, "plot_training", plot_then_ctrl_c)
    with pytest.raises(r.Interrupted, match="after the learned run finished") as err:
        r.discover(out, table, progress=False, task=str(task))
    assert f"metaplastic discover --resume {out}" in str(err.value)
    assert "learned" in json.loads((out / "summary.json").read_text())["meta_test"]
    for b in ("fa", "backprop"):  # prepared, not started
        assert (out / "baselines" / b / "config.toml").is_file()
        assert not (out / "baselines" / b / "metrics.jsonl").exists()
    monkeypatch.undo()
    learned_files = {p: p.read_bytes() for p in (out / "checkpoints").iterdir()}

    # 2. resumed, then Ctrl-C during the fa baseline's first meta-step
    entered = []

    class Flag(r._StopFlag):
        def __enter__(self):
            super().__enter__()
            entered.append(self)
            if len(entered) == 2:  # 1: discover's flag, 2: the fa run's
                self.set = True
            return self

    monkeypatch.setattr(r, "_StopFlag", Flag)
    with pytest.raises(r.Interrupted, match="meta-step 1 of the fa baseline") as err:
        r.discover(out, {}, progress=False, resume=True)
    assert f"metaplastic discover --resume {out}" in str(err.value)
    assert _steps(out / "baselines/fa") == [1]
    monkeypatch.undo()

    # 3. the command line finishes it: fa from its checkpoint, backprop from the start
    res = CliRunner().invoke(main, ["discover", "--resume", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["meta_test"]) == {"learned", "fa", "backprop"}
    # the contract scripts and checks rely on: status, and meta-test accuracy per method
    assert summary["status"] == "ok"
    assert summary["test"] == {k: [v["accuracy"]] for k, v in summary["meta_test"].items()}
    assert (out / "results.md").is_file() and (out / "meta_test.png").is_file()
    fa = json.loads((out / "baselines/fa/summary.json").read_text())
    assert fa["train"]["resumed_from_step"] == 1
    assert {p: p.read_bytes() for p in (out / "checkpoints").iterdir()} == learned_files
    assert _thetas(out) == _thetas(ref)  # bit for bit, metrics without gaps or repeats
    ref_summary = json.loads((ref / "summary.json").read_text())
    assert summary["meta_test"] == ref_summary["meta_test"]

    # 4. a baseline whose summary is lost is finished again; the others are not re-run
    (out / "baselines/backprop/summary.json").unlink()
    fa_metrics = (out / "baselines/fa/metrics.jsonl").read_text()
    res = CliRunner().invoke(main, ["discover", "--resume", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    assert (out / "baselines/backprop/summary.json").is_file()
    assert (out / "baselines/fa/metrics.jsonl").read_text() == fa_metrics
    assert json.loads((out / "summary.json").read_text())["meta_test"] == summary["meta_test"]


def test_discover_whose_learned_rule_fails_still_finishes_the_table(tmp_path, task):
    """The learned run fails (no better than its start): the baselines still run, the
    table and summary are written with the failure as status, then RunFailed (exit 1)."""
    from metaplastic._errors import RunFailed
    from metaplastic.run import _run as r

    out = tmp_path / "disc"
    table = {"lr": 1e-9, "require_improvement": True}
    with pytest.raises(RunFailed, match="no_improvement"):
        r.discover(out, table, progress=False, task=str(task))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"].startswith("no_improvement:")
    assert set(summary["meta_test"]) == {"learned", "fa", "backprop"}
    assert set(summary["test"]) == {"learned", "fa", "backprop"}
    assert (out / "results.md").is_file()


def test_discover_configs_rule_task_and_overrides(task):
    """--rule replaces only the learned rule; baselines start at its pseudo-gradient
    coefficient; rule.* overrides reach only the learned rule, others every method."""
    from metaplastic._errors import MetaplasticError
    from metaplastic.run._run import DISCOVER_METHODS, discover_configs

    cfgs = discover_configs(
        {"episodes": 4},
        str(task),
        DISCOVER_METHODS,
        ["rule.init=[0.002, 0.1, 0.0]", "train.lr=0.005"],
        rule="reference_pool",
    )
    assert list(cfgs) == ["learned", "fa", "backprop"]
    assert cfgs["learned"].rule.name == "reference_pool"
    assert cfgs["learned"].rule.init == (0.002, 0.1, 0.0)
    for label, feedback in (("fa", "fa"), ("backprop", "backprop")):
        c = cfgs[label]
        assert c.rule.terms == ("pseudo_gradient",) and c.rule.init == (0.002,)
        assert c.train.feedback == feedback and not c.train.require_improvement
    assert {c.train.lr for c in cfgs.values()} == {0.005}
    assert {c.train.episodes for c in cfgs.values()} == {4}
    assert cfgs["learned"].train.feedback == "fa"
    # a rule without a pseudo-gradient term: the baselines keep their preset start
    cfgs = discover_configs({}, str(task), DISCOVER_METHODS, (), rule="taylor")
    assert cfgs["fa"].rule.init == build_config("pseudo_gradient", str(task)).rule.init
    with pytest.raises(MetaplasticError, match="train.feedback per method"):
        discover_configs({}, str(task), DISCOVER_METHODS, ["train.feedback=dfa"])


def test_discover_cli_passes_rule_task_and_overrides(monkeypatch, tmp_path, task):
    import metaplastic.run._run as r

    seen = {}

    def fake(out, table, **kw):
        seen.update(kw, table=table)
        raise r.Interrupted(out, 1, resume="x", what="the learned run")

    monkeypatch.setattr(r, "discover", fake)
    args = ["discover", "--rule", "reference_pool", "--task", str(task), "--quiet"]
    res = CliRunner().invoke(
        main, [*args, "--set", "train.lr=0.01", "--out", str(tmp_path / "d"), "--seed", "3"]
    )
    assert res.exit_code == 130, res.output
    assert seen["rule"] == "reference_pool" and seen["task"] == str(task)
    assert seen["overrides"] == ["train.lr=0.01"] and seen["table"]["seed"] == 3
    bad = CliRunner().invoke(main, [*args, "--set", "rule.init=[1]", "--out", str(tmp_path / "e")])
    _one_line_error(bad, "rule.init")
    assert not (tmp_path / "e").exists()  # refused before any directory is made
    res = CliRunner().invoke(main, ["discover", "--resume", str(tmp_path / "d"), *args[1:3]])
    _one_line_error(res, "drop --rule")
