"""The docs: the site builds with ``mkdocs build --strict``, and every Python code block of
the README and the docs runs (the blocks of one page in order, in one fresh process)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
PAGES = [p for p in PAGES if "figures" not in p.relative_to(ROOT).parts]


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.M | re.S)


def test_docs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "site" / "api" / "index.html").read_text().count("register_pathway") > 0


def test_readme_links_only_to_files_that_exist():
    text = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        if "://" not in target:
            assert (ROOT / target).exists(), target


@pytest.mark.parametrize(
    "page", [p for p in PAGES if python_blocks(p)], ids=lambda p: str(p.relative_to(ROOT))
)
def test_python_code_blocks_run(page, tmp_path):
    code = "\n\n".join(python_blocks(page))
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def fenced_blocks(path: Path) -> list[tuple[str, str]]:
    """``(language, text)`` of every fenced code block of a page, in order."""
    blocks, lang, lines = [], None, []
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            if lang is None:
                lang, lines = line[3:].strip(), []
            else:
                blocks.append((lang, "\n".join(lines) + "\n"))
                lang = None
        elif lang is not None:
            lines.append(line)
    return blocks


def shell_blocks(path: Path) -> list[str]:
    """``bash`` blocks and untagged blocks (command synopses) of a page."""
    return [text for lang, text in fenced_blocks(path) if lang in ("", "bash", "sh", "console")]


def _commands(block: str) -> list[str]:
    """The ``metaplastic ...`` commands of a shell block (continuations joined, ``&&`` and
    ``bash -c '...'`` split open, ``# comments`` dropped)."""
    text = block.replace("\\\n", " ")
    lines: list[str] = []
    for line in text.splitlines():  # an indented line continues a synopsis
        if lines and line[:1].isspace():
            lines[-1] += " " + line.strip()
        else:
            lines.append(line)
    out = []
    for line in lines:
        line = line.split("  #")[0]
        for part in re.split(r"&&|;|bash -c '", line):
            part = part.strip().strip("'")
            if part.startswith("metaplastic"):
                out.append(part)
    return out


SETUP_BLOCKS = {ROOT / "README.md", ROOT / "docs" / "index.md"}


def test_setup_commands_are_what_ci_and_the_main_job_run():
    """The README's two set-up commands: the second ends with exactly what ``.ci/run``
    runs; the docs' front page shows the same two."""
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    readme = shell_blocks(ROOT / "README.md")[:2]
    assert readme[0].strip().endswith("pip install -e . && metaplastic discover")
    assert readme[1].strip().endswith(ci), (readme[1], ci)
    assert shell_blocks(ROOT / "docs" / "index.md")[:2] == readme


@pytest.mark.parametrize(
    "page", [p for p in PAGES if shell_blocks(p)], ids=lambda p: str(p.relative_to(ROOT))
)
def test_shell_blocks_use_only_options_the_cli_has(page):
    """Every ``metaplastic`` command in a shell block or synopsis names a real command and
    only options that command accepts (its ``--help``)."""
    from click.testing import CliRunner

    from metaplastic.run._cli import main

    runner = CliRunner()
    commands = [c for b in shell_blocks(page) for c in _commands(b)]
    assert commands, page
    for command in commands:
        words = command.split()
        sub = words[1]
        res = runner.invoke(main, [sub, "--help"])
        assert res.exit_code == 0, (command, res.output)
        for opt in re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", command):
            assert opt in res.output, (page.name, command, opt)


@pytest.mark.slow
def test_the_readme_main_command_runs(tmp_path):
    """The README's main job, ``metaplastic discover`` on the embedded digits (minutes)."""
    proc = subprocess.run(
        [sys.executable, "-m", "metaplastic", "discover", "--out", str(tmp_path / "d")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert '"status": "ok"' in (tmp_path / "d" / "summary.json").read_text()


@pytest.mark.slow
def test_the_slurm_example_runs_on_one_node(tmp_path):
    """The Slurm block of docs/scaling.md, run verbatim by bash with a one-node stand-in for
    Slurm (``srun`` runs its command once, ``scontrol`` names this host, one task)."""
    block = next(b for b in shell_blocks(ROOT / "docs" / "scaling.md") if "srun" in b)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        '#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift 2; done\nexec "$@"\n'
    )
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\necho 127.0.0.1\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {
        **__import__("os").environ,
        "PATH": f"{bin_dir}:{Path(sys.executable).parent}:" + __import__("os").environ["PATH"],
        "SLURM_NTASKS": "1",
        "SLURM_PROCID": "0",
    }
    proc = subprocess.run(
        ["bash", "-e", "-c", block],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert '"status": "ok"' in (tmp_path / "runs" / "big" / "summary.json").read_text()


def test_the_configuration_reference_is_every_key_with_its_value():
    """The TOML block of docs/configuration.md parses, names only real keys, shows the value
    the digits preset with the pool rule actually runs with (``rule.mask`` is an example),
    and mentions every key of every table (as a key, or in a comment for the keys of other
    kinds)."""
    import dataclasses
    import tomllib

    from metaplastic.run._config import build_config

    (block,) = [
        text for lang, text in fenced_blocks(ROOT / "docs" / "configuration.md") if lang == "toml"
    ]
    documented = tomllib.loads(block)
    cfg = build_config("pool", "digits")
    examples = {("rule", "mask")}
    assert set(documented) == {"rule", "task", "network", "train"}
    for section, values in documented.items():
        table = getattr(cfg, section)
        fields = {f.name for f in dataclasses.fields(table)}
        for key, value in values.items():
            assert key in fields, (section, key)
            actual = getattr(table, key)
            actual = list(actual) if isinstance(actual, tuple) else actual
            if (section, key) not in examples:
                assert actual == value, (section, key, value, actual)
        derived = {"name", "description"}  # from the file name / a free-text line of presets
        for key in fields - set(values) - derived:
            assert re.search(rf"\b{key}\b", block), (section, key)
    assert re.search(r"^# description = ", block, flags=re.M)
