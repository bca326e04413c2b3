"""User-defined terms in run directories: copied and hashed when the run starts; loaded
later only from the verified copy and only with --trust-user-terms; never from a path
written in the run's files."""

from __future__ import annotations

import hashlib
import json
import os
import textwrap
import tomllib
from pathlib import Path

import pytest
import tomli_w
from click.testing import CliRunner

from metaplastic._errors import MetaplasticError
from metaplastic.export._export import read_rule_file, rule_from_json, rule_to_json
from metaplastic.rules._rules import TermPoolRule
from metaplastic.run._cli import main

from .conftest import tiny_task

TASK = tiny_task(episodes=4, eval_episodes=4)

TERMS = textwrap.dedent(
    """
    import jax.numpy as jnp
    from metaplastic import user_term

    @user_term(sympy=lambda S: -S["y"] * S["x"].T, description="anti-Hebbian")
    def anti_hebbian(s):
        return -jnp.outer(s.y, s.x)
    """
)

#: Imported, this would leave a file behind: proof that code ran.
EVIL = textwrap.dedent(
    """
    import pathlib
    pathlib.Path(__file__).with_name("PWNED").write_text("code ran")
    from metaplastic import user_term

    @user_term(sympy=lambda S: S["W"])
    def anti_hebbian(s):
        return s.W
    """
)


def _err(res, *needles):
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def user_run(tmp_path_factory):
    """A run whose rule names a user-term file by a path relative to the working
    directory; afterwards that file is deleted, so only the run's copy is left."""
    src = tmp_path_factory.mktemp("project")
    (src / "my_terms.py").write_text(TERMS)
    (src / "tiny.toml").write_text(TASK)
    (src / "ut.toml").write_text(
        '[rule]\nterms = ["pseudo_gradient", "my_terms.py:anti_hebbian"]\ninit = [0.05, 0.0]\n'
    )
    run = tmp_path_factory.mktemp("runs") / "ut"
    here = os.getcwd()
    os.chdir(src)
    try:
        res = CliRunner().invoke(
            main,
            ["train", "--rule", "ut.toml", "--task", "tiny.toml", "--out", str(run), "--quiet"],
        )
    finally:
        os.chdir(here)
    assert res.exit_code == 0, res.output
    (src / "my_terms.py").unlink()
    return run


def test_the_run_holds_a_hashed_copy(user_run):
    copy = user_run / "user_terms" / "my_terms.py"
    assert copy.read_text() == TERMS
    sha = hashlib.sha256(TERMS.encode()).hexdigest()
    record = {"my_terms.py": {"file": "my_terms.py", "sha256": sha}}
    assert tomllib.loads((user_run / "config.toml").read_text())["user_terms"] == record
    rule = json.loads((user_run / "rule.json").read_text())
    assert rule["user_terms"] == record
    assert rule["terms"] == ["pseudo_gradient", "my_terms.py:anti_hebbian"]


def test_loading_needs_trust_and_works_from_any_directory(user_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # elsewhere; the original file is gone anyway
    runner = CliRunner()
    copy = user_run / "user_terms" / "my_terms.py"
    for cmd in (["evaluate", str(user_run)], ["export", str(user_run), "--no-check"]):
        _err(runner.invoke(main, cmd), "uses user-defined terms", str(copy), "--trust-user-terms")
    _err(runner.invoke(main, ["train", "--resume", str(user_run)]), "--trust-user-terms")
    _err(runner.invoke(main, ["distill", str(user_run)]), "--trust-user-terms")

    res = runner.invoke(main, ["evaluate", str(user_run), "--trust-user-terms"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["export", str(user_run), "--no-check", "--trust-user-terms"])
    assert res.exit_code == 0 and "y*x.T" in res.stdout, res.output
    res = runner.invoke(main, ["train", "--resume", str(user_run), "--trust-user-terms", "--quiet"])
    assert res.exit_code == 0, res.output


def test_a_changed_copy_is_refused(user_run, tmp_path):
    run = tmp_path / "run"
    _clone(user_run, run)
    copy = run / "user_terms" / "my_terms.py"
    copy.write_text(TERMS + "\n# edited\n")
    for cmd in (["evaluate", str(run)], ["train", "--resume", str(run), "--quiet"]):
        _err(CliRunner().invoke(main, [*cmd, "--trust-user-terms"]), "SHA-256", "does not match")


def _clone(src: Path, dst: Path) -> None:
    import shutil

    shutil.copytree(src, dst)


def test_paths_written_in_a_run_are_never_imported(user_run, tmp_path):
    evil = tmp_path / "evil.py"
    evil.write_text(EVIL)
    pwned = tmp_path / "PWNED"
    runner = CliRunner()

    def attempt(run, cmd, *needles):
        _err(runner.invoke(main, [*cmd, "--trust-user-terms"]), *needles)
        assert not pwned.exists(), "code from a path written in the run was executed"

    # rule.json names another file: no recorded copy, so nothing is imported
    run = tmp_path / "a"
    _clone(user_run, run)
    rule = json.loads((run / "rule.json").read_text())
    rule["terms"][1] = f"{evil}:anti_hebbian"
    (run / "rule.json").write_text(json.dumps(rule))
    attempt(run, ["evaluate", str(run)], "no recorded copy", "never imports")

    # ... and a forged record pointing out of user_terms/ is refused too
    sha = hashlib.sha256(EVIL.encode()).hexdigest()
    rule["user_terms"][str(evil)] = {"file": "../../evil.py", "sha256": sha}
    (run / "rule.json").write_text(json.dumps(rule))
    attempt(run, ["evaluate", str(run)], "not a plain file name")

    # resume reads config.toml: the same for its terms and its record
    run = tmp_path / "b"
    _clone(user_run, run)
    cfg = tomllib.loads((run / "config.toml").read_text())
    cfg["rule"]["terms"][1] = f"{evil}:anti_hebbian"
    (run / "config.toml").write_text(tomli_w.dumps(cfg))
    attempt(run, ["train", "--resume", str(run), "--quiet"], "no recorded copy")
    cfg["user_terms"] = {str(evil): {"file": str(evil), "sha256": sha}}
    (run / "config.toml").write_text(tomli_w.dumps(cfg))
    attempt(run, ["train", "--resume", str(run), "--quiet"], "not a plain file name")


def test_a_module_term_is_imported_by_name_only_when_trusted(tmp_path, monkeypatch):
    (tmp_path / "mp_test_terms_mod.py").write_text(TERMS)
    monkeypatch.syspath_prepend(str(tmp_path))
    rule = TermPoolRule.from_names(["mp_test_terms_mod:anti_hebbian"], [0.1])
    data = rule_to_json(rule, 0.0)
    assert data["user_terms"] == {"mp_test_terms_mod": {"module": "mp_test_terms_mod"}}
    with pytest.raises(MetaplasticError, match="imported by name.*--trust-user-terms"):
        rule_from_json(data, run_dir=tmp_path)
    back = rule_from_json(data, run_dir=tmp_path, trust_user_terms=True)
    assert back.names == rule.names
    # the same from a run directory's rule.json: untrusted unless asked for
    (tmp_path / "rule.json").write_text(json.dumps(data))
    with pytest.raises(MetaplasticError, match="--trust-user-terms"):
        read_rule_file(tmp_path)
    assert read_rule_file(tmp_path, trust_user_terms=True).names == rule.names
