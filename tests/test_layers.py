"""The package's architecture as a checked contract: subpackages in layers (a layer imports
only the ones below it) and no import circles (pyproject.toml's [tool.importlinter])."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("importlinter")


def _lint(src: Path) -> tuple[int, list[str]]:
    """Run import-linter on the package under ``src`` with pyproject.toml's contracts:
    (exit code, the contract lines)."""
    code = (
        "import sys; from importlinter.cli import lint_imports; "
        "sys.exit(lint_imports(config_filename=sys.argv[1], no_cache=True))"
    )
    env = dict(os.environ, PYTHONPATH=str(src))
    proc = subprocess.run(
        [sys.executable, "-c", code, str(ROOT / "pyproject.toml")],
        cwd=src,
        env=env,
        capture_output=True,
        text=True,
    )
    lines = [x for x in proc.stdout.splitlines() if x.endswith(("KEPT", "BROKEN"))]
    return proc.returncode, lines


def test_import_contracts_hold():
    code, lines = _lint(ROOT)
    assert code == 0 and len(lines) == 2 and all(x.endswith("KEPT") for x in lines), lines


@pytest.mark.parametrize(
    "module, bad_import, broken",
    [
        ("rules/_rules.py", "from . import _rule_kinds", ["no import circles"]),
        ("rules/_terms.py", "from ..run import _config", ["layers", "no import circles"]),
    ],
)
def test_each_contract_catches_its_violation(tmp_path, module, bad_import, broken):
    """A copy of the package with one bad import added breaks the contracts it should (so
    neither passes vacuously): a circle inside rules/, and rules importing from run/ (which
    is also a circle, since run imports rules)."""
    shutil.copytree(ROOT / "metaplastic", tmp_path / "metaplastic")
    path = tmp_path / "metaplastic" / module
    path.write_text(path.read_text() + f"\n\ndef _bad():\n    {bad_import}\n")
    code, lines = _lint(tmp_path)
    assert code == 1
    names = sorted(x.split(":")[0].split(" between")[0] for x in lines if x.endswith("BROKEN"))
    assert names == sorted(broken), lines


def _python_sources():
    """Every script, and the Python blocks of the README and the docs pages."""
    for path in sorted((ROOT / "scripts").glob("*.py")):
        yield path.name, path.read_text()
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        if "figures" in page.relative_to(ROOT).parts:
            continue
        blocks = re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.M | re.S)
        if blocks:
            yield str(page.relative_to(ROOT)), "\n".join(blocks)


def test_scripts_and_docs_examples_import_only_the_public_api():
    """Scripts are orchestration and docs examples use what users may: no
    ``metaplastic._x`` or ``metaplastic.sub._x`` imports."""
    bad = []
    for name, source in _python_sources():
        for node in ast.walk(ast.parse(source)):
            names = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for n in names:
                parts = n.split(".")
                if parts[0] == "metaplastic" and any(p.startswith("_") for p in parts[1:]):
                    bad.append(f"{name}:{node.lineno}: {n}")
    assert not bad, "private imports:\n" + "\n".join(bad)
