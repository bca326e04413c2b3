"""Checkpoints: bit-identical resume after SIGKILL, damaged files, metrics without gaps."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from metaplastic._errors import MetaplasticError, RunFailed
from metaplastic.run._chaos import kill_and_resume
from metaplastic.run._checkpoint import checkpoint_dir, load_latest, read_checkpoint
from metaplastic.run._config import build_config
from metaplastic.run._run import Interrupted, resume_run, train

TASK = """
[task]
dataset = "digits"
n_way = 3
k_shot = 3
q_query = 2

[network]
hidden = [6]

[train]
meta_batch = 2
eval_episodes = 4
lr = 0.01
checkpoint_every = 1
keep_checkpoints = 2
# plumbing tests: a few steps need not improve the rule
require_improvement = false
val_episodes = 8
"""


def _cfg(tmp: Path, episodes: int):
    task = tmp / "tiny.toml"
    task.write_text(TASK)
    return build_config("pool", str(task), {"episodes": episodes}), task


def _final(run: Path):
    theta = json.loads((run / "rule.json").read_text())["theta"]
    return np.asarray(theta, np.float32), (run / "metrics.jsonl").read_text()


@pytest.mark.slow  # SIGKILLs whole training processes: ~60 s (`-m slow`)
def test_sigkill_at_random_points_then_resume_is_bit_identical(tmp_path):
    steps = 300
    cfg, task = _cfg(tmp_path, 2 * steps)
    ref = tmp_path / "ref"
    train(cfg, ref, progress=False)
    ref_theta, ref_metrics = _final(ref)

    run = tmp_path / "killed"
    rng = np.random.default_rng(0)
    # three kills at random points (each kill costs a process start and a compile)
    targets = sorted(rng.choice(np.arange(5, steps - 5), size=3, replace=False))
    args = ["--rule", "pool", "--task", str(task), "--episodes", str(2 * steps)]
    kills = kill_and_resume(args, run, targets, timeout=120)
    assert kills >= 3, f"only {kills} kills landed before the run finished"
    theta, metrics_text = _final(run)
    np.testing.assert_array_equal(theta, ref_theta)  # bit for bit
    assert metrics_text == ref_metrics  # no duplicated or missing steps
    steps_logged = [json.loads(line)["step"] for line in metrics_text.splitlines()]
    assert steps_logged == list(range(1, steps + 1))


def test_damaged_newest_checkpoint_falls_back(tmp_path, capsys):
    cfg, _ = _cfg(tmp_path, 8)
    run = tmp_path / "run"
    train(cfg, run, progress=False, evaluate=False)
    files = sorted(checkpoint_dir(run).glob("ckpt-*"))
    assert [f.name for f in files] == ["ckpt-00000003.mpk", "ckpt-00000004.mpk"]  # keep 2
    raw = bytearray(files[-1].read_bytes())
    raw[-5] ^= 0xFF
    files[-1].write_bytes(bytes(raw))
    like = read_checkpoint(files[0], _like(cfg))[0]
    with pytest.raises(MetaplasticError, match="checksum mismatch"):
        read_checkpoint(files[-1], like)
    state, header = load_latest(run, like)
    assert header["step"] == 3 and int(state.step) == 3
    assert "trying an older checkpoint" in capsys.readouterr().err
    # truncated file: same fallback
    files[-1].write_bytes(files[0].read_bytes()[:40])
    assert load_latest(run, like)[1]["step"] == 3
    # resume from step 3 recomputes step 4 and cuts metrics back to 3 rows first
    summary = resume_run(run, progress=False)
    assert summary["train"]["resumed_from_step"] == 3
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for f in checkpoint_dir(run).glob("ckpt-*"):
        f.write_bytes(b"garbage")
    with pytest.raises(MetaplasticError, match="no valid checkpoint left"):
        resume_run(run, progress=False)


def _like(cfg):
    """A fresh outer-loop state with the structure the run's checkpoints have."""
    import jax

    from metaplastic.run._run import build_rule, build_setup, make_trainer

    setup = build_setup(cfg)
    rule = build_rule(cfg, setup.net.n_layers)
    return make_trainer(cfg, setup, rule).init(rule, jax.random.key(0))


def test_sigint_checkpoints_and_stops(tmp_path, monkeypatch):
    cfg, _ = _cfg(tmp_path, 20)
    run = tmp_path / "run"
    import metaplastic.run._run as r

    class Flag(r._StopFlag):
        def __enter__(self):
            self.set = True  # as if SIGINT arrived during the first step
            return self

    monkeypatch.setattr(r, "_StopFlag", Flag)
    with pytest.raises(Interrupted, match="--resume"):
        train(cfg, run, progress=False)
    assert load_latest(run, _like(cfg))[1]["step"] == 1
    monkeypatch.undo()
    summary = resume_run(run, progress=False)
    assert summary["train"]["steps"] == 10


def test_edited_config_is_refused_on_resume(tmp_path):
    cfg, _ = _cfg(tmp_path, 8)
    run = tmp_path / "run"
    train(cfg, run, progress=False, evaluate=False)
    text = (run / "config.toml").read_text().replace("lr = 0.01", "lr = 0.02")
    (run / "config.toml").write_text(text)
    with pytest.raises(MetaplasticError, match="differs from the config saved"):
        resume_run(run, progress=False)


def test_rule_that_diverges_at_once_stops_before_step_one(tmp_path):
    """A Hebbian coefficient that blows up every episode is caught on validation episodes
    before any meta-step: RunFailed (exit 1 in the CLI), status in summary.json."""
    task = tmp_path / "tiny.toml"
    task.write_text(TASK)
    rule = tmp_path / "blowup.toml"
    rule.write_text('[rule]\nterms = ["pseudo_gradient", "hebbian"]\ninit = [0.1, 50.0]\n')
    cfg = build_config(str(rule), str(task), {"episodes": 200})
    run = tmp_path / "run"
    with pytest.raises(RunFailed, match="starting rule blew up"):
        train(cfg, run, progress=False)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"].startswith("diverged:")
    assert summary["validation"]["start"]["diverged"] == 8
    assert not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text()


def test_select_every_keeps_the_best_rule_on_validation_and_resumes_it(tmp_path, monkeypatch):
    """train.select_every: the learned rule is the one scored best on validation episodes
    (here, by construction, the rule of meta-step 2 of 4), also after an interrupt."""
    import metaplastic.run._run as r

    cfg, _ = _cfg(tmp_path, 8)  # 4 meta-steps
    plain = tmp_path / "plain"
    train(cfg, plain, progress=False, evaluate=False)
    rows = [json.loads(x) for x in (plain / "metrics.jsonl").read_text().splitlines()]
    target = np.asarray(rows[1]["coefficients"]["pseudo_gradient"])  # after meta-step 2
    real = r.validate_rule

    def closeness(cfg, setup, rule):  # best (0) exactly at the step-2 rule
        n = cfg.train.val_episodes
        if rule is None:
            return real(cfg, setup, rule)
        gap = float(np.max(np.abs(np.asarray(rule.coefficients()["pseudo_gradient"]) - target)))
        return np.full(n, -gap), np.zeros(n, bool)

    monkeypatch.setattr(r, "validate_rule", closeness)
    sel = cfg.replace(train=dataclasses.replace(cfg.train, select_every=1))
    run = tmp_path / "sel"
    summary = train(sel, run, progress=False, evaluate=False)
    assert summary["train"]["selected_step"] == 2
    assert np.array_equal(np.asarray(summary["coefficients"]["pseudo_gradient"]), target)
    scores = [
        json.loads(x).get("val_score") for x in (run / "metrics.jsonl").read_text().splitlines()
    ]
    assert scores[1] == 0.0 and all(s < 0 for i, s in enumerate(scores) if i != 1)
    # interrupted after meta-step 3 (checkpoint_every = 1), then resumed: the same selection
    again = tmp_path / "again"
    stop_flag = r._StopFlag

    class Flag(stop_flag):
        @property
        def set(self):  # as if SIGINT arrived during meta-step 3
            return _lines(again / "metrics.jsonl") == 3

        @set.setter
        def set(self, value):
            pass

    monkeypatch.setattr(r, "_StopFlag", Flag)
    with pytest.raises(Interrupted):
        train(sel, again, progress=False, evaluate=False)
    monkeypatch.setattr(r, "_StopFlag", stop_flag)
    resumed = resume_run(again, progress=False)
    assert resumed["train"]["selected_step"] == 2 and resumed["train"]["resumed_from_step"] == 3
    assert resumed["coefficients"] == summary["coefficients"]


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0
