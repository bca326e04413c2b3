"""Mutation testing of the core modules: how many small bugs do the tests catch?

    python scripts/mutation_score.py                      # every mutant of every core module
    python scripts/mutation_score.py --max-mutants 8 --modules rules/_rules.py  # a sample
    python scripts/mutation_score.py --list               # mutant counts only, no test runs
    python scripts/mutation_score.py --only ID [ID ...]   # re-run given mutants (prints only)
    python scripts/mutation_score.py --update --only ID [ID ...]  # ... and update the score
    python scripts/mutation_score.py --update --modules inner/_episode.py  # re-run a module

A self-written AST mutator (no mutmut): each mutant changes one operator or constant of one
core module, written into a scratch copy of the repository (``metaplastic/``, ``tests/``,
presets, ``pyproject.toml``) in a temporary folder, where pytest runs with that copy first
on ``sys.path``. A mutant is *killed* when the tests fail (or run past a timeout, recorded as
``timeout``), *survived* when they pass. The score is ``killed / (killed + survived)``;
mutants listed in ``results/mutation/equivalent.json`` (judged to change nothing observable,
with a reason each) are not run and not scored.

Operators (one site at a time): ``+ <-> -``, ``* <-> /``, ``// -> /``, ``** -> *``,
``| <-> &`` (boolean arrays), also in augmented assignments; ``< <-> <=``, ``> <-> >=``,
``== <-> !=``, ``in <-> not in``, ``is <-> is not``; ``and <-> or``; dropping a unary
``-``, ``not`` or ``~``; ``True <-> False``; numbers: ``0 -> 1``, ``1 -> 0``, other
integers ``n -> n + 1``, other floats ``x -> -x``. Not mutated: strings (docstrings, messages,
names), type annotations, ``raise`` statements, ``assert`` messages, ``print``/logging/
warnings calls, and ``zip(..., strict=...)`` (the lengths always match, so it is equivalent
by construction).

Speed, which is the whole problem (every mutant is a fresh pytest process, and JAX
compilation dominates a test's time):

* each core module maps to the few test files that exercise it (:data:`CORE_TESTS`);
* a baseline run of those files (unmutated, cached per file under ``--cache-dir``) records
  which lines of the core modules each test executes (a ``sys.settrace`` tracer, with the
  JAX caches cleared before every test so that code reached only while tracing counts).
  A mutant runs only the mapped tests that execute its lines, with ``-x``; a mutant whose
  lines no mapped test executes survives without a run (``not_covered``). Mutants in
  module-level code (constants, defaults, class bodies) run all the module's mapped tests;
* a persistent JAX compilation cache (``--cache-dir``) is shared by all runs: a mutant
  recompiles only the functions whose traced program it changes;
* ``--jobs N`` runs N mutants at once (one scratch copy each).

Every finished mutant is appended to a progress file (``--progress``, default
``results/mutation/progress.jsonl``: id, mutated line, status, commit) as the run goes, so
an interrupted run keeps its work: ``--resume`` takes the killed (and timed-out, and
erroring) mutants of a matching mutated line from it and runs only the rest. Survivors are
always run again, since tests added in between may kill them.

``--update`` re-runs only the selected mutants (``--only`` ids, or every mutant of the
``--modules`` given) on the current code and rewrites the score file with their new
results, keeping every other mutant's result from the file; the file's ``history`` lists
each run and update (command, commit, date). Use it after adding a test that kills a
survivor, or after changing a core module (its ids shift: re-run the whole module).

Mutant ids are ``path:line:col:operator:index`` (``line:col`` of the mutated token, 1-based
line, 0-based column), stable while the module's text above the site does not change.
"""

from __future__ import annotations

import argparse
import ast
import datetime as _dt
import hashlib
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = "_mutation_plugin"  # this file's name inside a scratch copy (pytest -p PLUGIN)

#: Core module -> the test files that exercise it, fastest first (run with ``-x``).
CORE_TESTS: dict[str, list[str]] = {
    "metaplastic/rules/_rules.py": [
        "tests/test_terms.py",
        "tests/test_export_tasks.py",
        "tests/test_search_spaces.py",
        "tests/test_exact_updates.py",
        "tests/test_meta_gradients.py",
    ],
    "metaplastic/rules/_rule_kinds.py": [
        "tests/test_search_spaces.py",
        "tests/test_meta_gradients.py",
        "tests/test_properties.py",
    ],
    "metaplastic/rules/_terms.py": ["tests/test_terms.py", "tests/test_search_spaces.py"],
    "metaplastic/rules/_signals.py": ["tests/test_search_spaces.py", "tests/test_exact_updates.py"],
    "metaplastic/inner/_episode.py": [
        "tests/test_weight_guard.py",
        "tests/test_inner.py",
        "tests/test_exact_updates.py",
        "tests/test_reconstruct.py",
    ],
    "metaplastic/inner/_reconstruct.py": ["tests/test_reconstruct.py"],
    "metaplastic/inner/_feedback.py": [
        "tests/test_inner.py",
        "tests/test_pathways.py",
        "tests/test_networks.py",
        "tests/test_search_spaces.py",
        "tests/test_exact_updates.py",
    ],
    "metaplastic/inner/_network.py": [
        "tests/test_inner.py",
        "tests/test_networks.py",
        "tests/test_exact_updates.py",
    ],
    "metaplastic/tasks/_pca.py": [
        "tests/test_weight_guard.py",
        "tests/test_search_spaces.py",
        "tests/test_units.py",
    ],
    "metaplastic/outer/_gradient.py": [
        "tests/test_weight_guard.py",
        "tests/test_units.py",
        "tests/test_meta.py",
        "tests/test_exact_updates.py",
        "tests/test_reconstruct.py",
    ],
    "metaplastic/outer/_units.py": ["tests/test_units.py"],
    "metaplastic/outer/_evolution.py": ["tests/test_evolution.py", "tests/test_exact_updates.py"],
    "metaplastic/export/_export.py": [
        "tests/test_export_tasks.py",
        "tests/test_user_terms.py",
        "tests/test_search_spaces.py",
        "tests/test_properties.py",
    ],
}
#: What a scratch copy holds (the tests read the presets through the package).
COPIED = ("metaplastic", "tests", "rules", "tasks", "pyproject.toml")
DEFAULT_OUT = ROOT / "results" / "mutation" / "score.json"
EQUIVALENT_FILE = ROOT / "results" / "mutation" / "equivalent.json"
#: Bump when the baseline record changes meaning (invalidates cached baselines).
BASELINE_VERSION = 2


# --- mutants -------------------------------------------------------------------------------

BINOPS = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.Div,
    ast.Div: ast.Mult,
    ast.FloorDiv: ast.Div,
    ast.Pow: ast.Mult,
    ast.BitOr: ast.BitAnd,
    ast.BitAnd: ast.BitOr,
}
CMPOPS = {
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
}
BOOLOPS = {ast.And: ast.Or, ast.Or: ast.And}
#: Operator class -> (regex of its token in the source, replacement text of that token).
TOKENS = {
    ast.Add: (rb"\+", "+"),
    ast.Sub: (rb"-", "-"),
    ast.Mult: (rb"\*", "*"),
    ast.Div: (rb"/", "/"),
    ast.FloorDiv: (rb"//", "//"),
    ast.Pow: (rb"\*\*", "**"),
    ast.BitOr: (rb"\|", "|"),
    ast.BitAnd: (rb"&", "&"),
    ast.Lt: (rb"<", "<"),
    ast.LtE: (rb"<=", "<="),
    ast.Gt: (rb">", ">"),
    ast.GtE: (rb">=", ">="),
    ast.Eq: (rb"==", "=="),
    ast.NotEq: (rb"!=", "!="),
    ast.In: (rb"\bin\b", "in"),
    ast.NotIn: (rb"\bnot\s+in\b", "not in"),
    ast.Is: (rb"\bis\b", "is"),
    ast.IsNot: (rb"\bis\s+not\b", "is not"),
    ast.And: (rb"\band\b", "and"),
    ast.Or: (rb"\bor\b", "or"),
    ast.USub: (rb"-", "-"),
    ast.Not: (rb"\bnot\b", "not"),
    ast.Invert: (rb"~", "~"),
}
#: Calls whose arguments are output, not behaviour.
QUIET_CALLS = {"print", "warn", "debug", "info", "warning", "error", "exception", "echo"}


@dataclass
class Mutant:
    id: str
    module: str
    line: int  # of the mutated token (1-based)
    col: int  # of the mutated token (0-based, characters)
    operator: str
    node_lines: tuple[int, int]  # first and last line of the mutated expression
    module_level: bool  # outside any function body: runs at import
    original: str  # the source line before ...
    mutated: str  # ... and after the mutation (the first line of the change)
    source: str = field(repr=False, default="")  # the whole mutated module


def _const_replacement(value):
    """The mutated value of a numeric or boolean constant, or ``None`` (not mutated)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return {0: 1, 1: 0}.get(value, value + 1)
    if isinstance(value, float):
        return {0.0: 1.0, 1.0: 0.0}.get(value, -value)
    return None


def _const_text(value) -> str:
    text = repr(value)
    return f"({text})" if text.startswith("-") else text


def _call_name(node: ast.Call) -> str:
    f = node.func
    return f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")


class _Sites(ast.NodeVisitor):
    """Collects ``(kind, node, extra, module_level)`` mutation sites, skipping what the
    module doc says is not mutated."""

    def __init__(self):
        self.sites = []
        self.in_function = False

    def add(self, kind, node, extra=None):
        self.sites.append((kind, node, extra, not self.in_function))

    def _body(self, nodes):
        saved, self.in_function = self.in_function, True
        for n in nodes:
            self.visit(n)
        self.in_function = saved

    def visit_FunctionDef(self, node):
        for d in node.decorator_list:
            self.visit(d)
        for d in node.args.defaults + [d for d in node.args.kw_defaults if d is not None]:
            self.visit(d)
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            body = body[1:]  # docstring
        self._body(body)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Lambda(self, node):
        for d in node.args.defaults + [d for d in node.args.kw_defaults if d is not None]:
            self.visit(d)
        self._body([node.body])

    def visit_AnnAssign(self, node):
        if node.value is not None:
            self.visit(node.value)

    def visit_Raise(self, node):
        pass

    def visit_JoinedStr(self, node):
        pass

    def visit_Assert(self, node):
        self.visit(node.test)

    def visit_Call(self, node):
        if _call_name(node) in QUIET_CALLS:
            return
        self.visit(node.func)
        for a in node.args:
            self.visit(a)
        for k in node.keywords:
            if not (_call_name(node) == "zip" and k.arg == "strict"):
                self.visit(k.value)

    def visit_BinOp(self, node):
        if type(node.op) in BINOPS:
            self.add("binop", node)
        self.generic_visit(node)

    def visit_AugAssign(self, node):
        if type(node.op) in BINOPS:
            self.add("augassign", node)
        self.generic_visit(node)

    def visit_Compare(self, node):
        for i, op in enumerate(node.ops):
            if type(op) in CMPOPS:
                self.add("compare", node, i)
        self.generic_visit(node)

    def visit_BoolOp(self, node):
        self.add("boolop", node)
        self.generic_visit(node)

    def visit_UnaryOp(self, node):
        if isinstance(node.op, (ast.USub, ast.Not, ast.Invert)):
            self.add("unary", node)
        self.generic_visit(node)

    def visit_Constant(self, node):
        if _const_replacement(node.value) is not None:
            self.add("const", node)


class _Source:
    """A module's text as bytes (AST columns are UTF-8 byte offsets)."""

    def __init__(self, text: str):
        self.text = text
        self.data = text.encode()
        self.starts = [0]
        for line in self.data.splitlines(keepends=True):
            self.starts.append(self.starts[-1] + len(line))

    def offset(self, line: int, col: int) -> int:
        return self.starts[line - 1] + col

    def position(self, offset: int) -> tuple[int, int]:
        """``(line, character column)`` of a byte offset."""
        line = max(i for i, s in enumerate(self.starts) if s <= offset) + 1
        start = self.starts[line - 1]
        return line, len(self.data[start:offset].decode())

    def span(self, node) -> tuple[int, int]:
        return (
            self.offset(node.lineno, node.col_offset),
            self.offset(node.end_lineno, node.end_col_offset),
        )


def _find_token(src: _Source, start: int, end: int, pattern: bytes) -> int:
    """Offset of the one operator token in ``data[start:end]`` (gaps hold only brackets,
    blanks, comments and the operator)."""
    gap = bytearray(src.data[start:end])
    i = 0
    while i < len(gap):  # blank out comments
        if gap[i : i + 1] == b"#":
            while i < len(gap) and gap[i : i + 1] != b"\n":
                gap[i] = 32
                i += 1
        i += 1
    m = re.search(pattern, bytes(gap))
    if m is None:
        raise ValueError("operator token not found")
    return start + m.start(), start + m.end()


def _replace_child(parent, old, new) -> None:
    for name, value in ast.iter_fields(parent):
        if value is old:
            setattr(parent, name, new)
            return
        if isinstance(value, list):
            for i, v in enumerate(value):
                if v is old:
                    value[i] = new
                    return
    raise ValueError("child not found")


def _plan(kind, node, extra, src: _Source):
    """``(new_node, [(start, end, text)...], op_name)`` for one site: the replacement
    expression (to check the edit against) and the text edits that produce it."""
    if kind in ("binop", "augassign"):
        new_op = BINOPS[type(node.op)]
        left, right = (node.target, node.value) if kind == "augassign" else (node.left, node.right)
        if kind == "augassign":
            new = ast.AugAssign(target=node.target, op=new_op(), value=node.value)
        else:
            new = ast.BinOp(left=node.left, op=new_op(), right=node.right)
        a, b = _find_token(src, src.span(left)[1], src.span(right)[0], TOKENS[type(node.op)][0])
        edits = [(a, b, TOKENS[new_op][1])]
        name = f"{type(node.op).__name__}->{new_op.__name__}"
    elif kind == "compare":
        i = extra
        new_op = CMPOPS[type(node.ops[i])]
        ops = list(node.ops)
        ops[i] = new_op()
        new = ast.Compare(left=node.left, ops=ops, comparators=node.comparators)
        lhs = node.left if i == 0 else node.comparators[i - 1]
        a, b = _find_token(
            src, src.span(lhs)[1], src.span(node.comparators[i])[0], TOKENS[type(node.ops[i])][0]
        )
        edits = [(a, b, TOKENS[new_op][1])]
        name = f"{type(node.ops[i]).__name__}->{new_op.__name__}"
    elif kind == "boolop":
        new_op = BOOLOPS[type(node.op)]
        new = ast.BoolOp(op=new_op(), values=node.values)
        edits = []
        for v, w in zip(node.values, node.values[1:], strict=False):
            a, b = _find_token(src, src.span(v)[1], src.span(w)[0], TOKENS[type(node.op)][0])
            edits.append((a, b, TOKENS[new_op][1]))
        name = f"{type(node.op).__name__}->{new_op.__name__}"
    elif kind == "unary":
        new = node.operand
        a, b = _find_token(
            src, src.span(node)[0], src.span(node.operand)[0], TOKENS[type(node.op)][0]
        )
        edits = [(a, b, "")]
        name = f"drop-{type(node.op).__name__}"
    else:  # const
        value = _const_replacement(node.value)
        text = _const_text(value)
        new = ast.parse(text, mode="eval").body
        a, b = src.span(node)
        edits = [(a, b, text)]
        name = f"{type(node.value).__name__}:{node.value!r}->{value!r}"
    return new, edits, name


def _apply(data: bytes, edits) -> bytes:
    for a, b, text in sorted(edits, reverse=True):
        data = data[:a] + text.encode() + data[b:]
    return data


def generate_mutants(module: str, root: Path = ROOT) -> list[Mutant]:
    """Every mutant of ``module`` (a path relative to ``root``), in source order."""
    text = (root / module).read_text()
    src = _Source(text)
    tree = ast.parse(text)
    parents = {c: p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
    finder = _Sites()
    finder.visit(tree)
    out: list[Mutant] = []
    seen: dict[tuple, int] = {}
    lines = text.splitlines()
    for kind, node, extra, module_level in finder.sites:
        try:
            new, edits, op_name = _plan(kind, node, extra, src)
        except ValueError:
            continue
        parent = parents[node]
        _replace_child(parent, node, new)
        want = ast.dump(tree)
        _replace_child(parent, new, node)
        data = _apply(src.data, edits)
        if _dump_or_none(data) != want:  # precedence changed: parenthesise the new node
            a, b = src.span(node)
            pad = "\n" * src.data[a:b].count(b"\n")
            edits = [(a, b, f"({ast.unparse(new)}{pad})")]
            data = _apply(src.data, edits)
            if _dump_or_none(data) != want:
                continue
        line, col = src.position(edits[0][0])
        key = (line, col, op_name)
        index = seen.get(key, 0)
        seen[key] = index + 1
        mutated_text = data.decode()
        out.append(
            Mutant(
                id=f"{module}:{line}:{col}:{op_name}:{index}",
                module=module,
                line=line,
                col=col,
                operator=op_name,
                node_lines=(node.lineno, node.end_lineno),
                module_level=module_level,
                original=lines[line - 1].strip(),
                mutated=mutated_text.splitlines()[line - 1].strip(),
                source=mutated_text,
            )
        )
    return out


def _dump_or_none(data: bytes):
    try:
        return ast.dump(ast.parse(data))
    except SyntaxError:
        return None


# --- scratch copies, baseline and runs -----------------------------------------------------


def make_scratch(parent: Path, name: str) -> Path:
    """A copy of the repository's testable part under ``parent/name``, plus this file as
    the pytest plugin that records coverage."""
    dest = parent / name
    for item in COPIED:
        src = ROOT / item
        if src.is_dir():
            shutil.copytree(src, dest / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / item)
    shutil.copy2(Path(__file__), dest / f"{PLUGIN}.py")
    return dest


def _env(scratch: Path, cache_dir: Path, **extra) -> dict:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(scratch),
        PYTHONDONTWRITEBYTECODE="1",
        JAX_COMPILATION_CACHE_DIR=str(cache_dir / "jax"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    env.update(extra)
    return env


PYTEST = [sys.executable, "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider"]
_CHILDREN: set[subprocess.Popen] = set()
_LOCK = threading.Lock()


def _run(cmd, cwd: Path, env: dict, timeout: float | None):
    """``(returncode or None on timeout, output, seconds)``; the child gets its own
    process group, killed whole on timeout."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    with _LOCK:
        _CHILDREN.add(proc)
    try:
        out, _ = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        rc = None
    finally:
        with _LOCK:
            _CHILDREN.discard(proc)
    return rc, out, time.perf_counter() - t0


def _tree_hash(root: Path, *paths: Path) -> str:
    h = hashlib.sha256(f"v{BASELINE_VERSION}".encode())
    for base in paths:
        files = sorted(base.rglob("*.py")) if base.is_dir() else [base]
        for f in files:
            if "__pycache__" not in f.parts:
                h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def baseline(test_file: str, scratch: Path, cache_dir: Path, core: list[str]) -> dict:
    """Per test of ``test_file`` (unmutated): the core lines it executes and its seconds.
    Cached under ``cache_dir`` by the contents of the package, ``pyproject.toml``, the test
    file and the test modules it imports (``conftest`` always)."""
    # hashed from the scratch copy the tests run in, not from the working tree (which may
    # have changed since the copy was made)
    local = re.findall(r"^from \.(\w+) import", (scratch / test_file).read_text(), re.M)
    deps = [
        scratch / "tests" / f"{name}.py"
        for name in ["__init__", "conftest", *local, test_file[6:-3]]
    ]
    key = _tree_hash(scratch, scratch / "metaplastic", scratch / "pyproject.toml", *deps)
    path = cache_dir / "baseline" / f"{key}-{test_file.replace('/', '_')}.json"
    if path.exists():
        data = json.loads(path.read_text())
        if set(core) <= set(data["core"]):
            return data
    path.parent.mkdir(parents=True, exist_ok=True)
    record = scratch / "_baseline.json"
    env = _env(
        scratch,
        cache_dir,
        MUTATION_COVERAGE_OUT=str(record),
        MUTATION_COVERAGE_CORE=",".join(CORE_TESTS),
    )
    print(f"baseline: {test_file} ...", flush=True)
    rc, out, secs = _run(PYTEST + ["-p", PLUGIN, test_file], scratch, env, None)
    if rc != 0:
        sys.exit(f"the unmutated tests fail in {test_file}; fix them first:\n{out[-3000:]}")
    data = json.loads(record.read_text())
    record.unlink()
    expect = (scratch / "metaplastic" / "__init__.py").resolve()
    if Path(data["package"]).resolve() != expect:
        sys.exit(f"the tests imported {data['package']}, not the scratch copy {expect}")
    data.update(core=list(CORE_TESTS), seconds=secs, file=test_file)
    path.write_text(json.dumps(data))
    print(f"baseline: {test_file}: {len(data['tests'])} tests, {secs:.0f} s", flush=True)
    return data


def select_tests(m: Mutant, baselines: dict[str, dict]) -> list[str]:
    """The mapped tests that execute the mutant's lines, in file order (all mapped tests for
    module-level code)."""
    lines = set(range(m.node_lines[0], m.node_lines[1] + 1))
    chosen = []
    for f in CORE_TESTS[m.module]:
        for nodeid, t in baselines[f]["tests"].items():
            if m.module_level or lines & set(t["lines"].get(m.module, ())):
                chosen.append(nodeid)
    return chosen


_FAILED = re.compile(r"^(?:FAILED|ERROR) (\S+)", re.M)


def run_mutant(m: Mutant, tests, seconds, scratch, cache_dir, factor, floor) -> dict:
    """Write the mutant into ``scratch``, run ``tests``, restore the module."""
    path = scratch / m.module
    original = path.read_text()
    timeout = max(floor, factor * seconds + 60.0)
    try:
        path.write_text(m.source)
        rc, out, secs = _run(PYTEST + tests, scratch, _env(scratch, cache_dir), timeout)
    finally:
        path.write_text(original)
    if rc is None:
        status = "timeout"
    elif rc == 0:
        status = "survived"
    elif rc in (1, 2) or rc < 0 or "ERROR collecting" in out or "while loading conftest" in out:
        status = "killed"  # failures, errors at import or collection, crashes
    else:  # 3 internal error, 4 usage error, 5 no tests: a problem of this script
        status = "error"
    failed = _FAILED.findall(out)
    rec = {"status": status, "seconds": round(secs, 1), "tests_run": len(tests)}
    if status == "timeout":
        rec["timeout_s"] = round(timeout)
    if failed:
        rec["killed_by"] = failed[0]
    if status == "error":
        rec["output"] = out[-2000:]
    return rec


def load_progress(path: Path) -> dict[str, dict]:
    """The last record of every mutant id in a progress file (see ``--resume``)."""
    out: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                out[rec["id"]] = rec
    return out


def save_progress(path: Path, x: Mutant, rec: dict, commit: str | None) -> None:
    """Append one finished mutant to the progress file (under the lock: jobs share it)."""
    line = {"id": x.id, "mutated": x.mutated, "commit": commit}
    line |= {k: v for k, v in rec.items() if k != "output"}
    with _LOCK:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps(line) + "\n")


def _content_key(mutant_id: str, mutated: str) -> tuple:
    """A mutant's identity without its line number (module, column, operator, mutated
    line), so that records survive edits that only move the code up or down."""
    module, _line, col, rest = mutant_id.split(":", 3)
    return module, col, rest, mutated.strip()


def relocate(records: dict[str, dict], mutants: dict[str, Mutant]) -> dict[str, dict]:
    """``records`` (by mutant id) re-keyed to the current ids: a record whose id no longer
    names the same mutation moves to the current mutant with the same content (module,
    column, operator and mutated line) that no record holds yet, the nearest one when the
    line occurs more than once; otherwise it keeps its id (the caller then reports it stale
    or ignores it)."""
    by_key: dict[tuple, list[str]] = {}
    for m in mutants.values():
        by_key.setdefault(_content_key(m.id, m.mutated), []).append(m.id)
    out: dict[str, dict] = {}
    rest = []
    for i, rec in records.items():
        current = mutants.get(i)
        if current is not None and rec.get("mutated", current.mutated) == current.mutated:
            out[i] = rec
        else:
            rest.append((i, rec))
    for i, rec in rest:
        mutated = rec.get("mutated")
        match = by_key.get(_content_key(i, mutated), []) if mutated is not None else []
        free = [j for j in match if j not in out]
        if free:  # the nearest free one, when the same line occurs more than once
            line = int(i.split(":", 2)[1])
            j = min(free, key=lambda j: abs(mutants[j].line - line))
            out[j] = dict(rec, id=j, moved_from=i)
        elif i not in out:
            out[i] = rec
    return out


def load_equivalents(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    return {e["id"]: e for e in data.get("equivalent", [])}


# --- the pytest plugin (loaded in a scratch copy as -p _mutation_plugin) -------------------

_COV: dict = {"current": None, "tests": {}, "files": {}}


def _cov_tracer(frame, event, arg):
    files = _COV["files"]
    fn = frame.f_code.co_filename
    rel = files.get(fn, "")
    if rel == "":
        real = os.path.realpath(fn)
        base = os.path.realpath(os.getcwd()) + os.sep
        rel = real[len(base) :] if real.startswith(base) else None
        rel = rel if rel in _COV["core"] else None
        files[fn] = rel
    if rel is None or _COV["current"] is None:
        return None
    hits = _COV["current"].setdefault(rel, set())

    def local(frame, event, arg):
        if event == "line":
            hits.add(frame.f_lineno)
        return local

    return local


def pytest_configure(config):
    if os.environ.get("MUTATION_COVERAGE_OUT"):
        _COV["core"] = set(os.environ["MUTATION_COVERAGE_CORE"].split(","))
        sys.settrace(_cov_tracer)
        threading.settrace(_cov_tracer)


def _clear_package_caches() -> None:
    """Empty every ``functools.cache`` of the package, so that a cached function's lines are
    credited to each test that calls it, not only to the first."""
    for name, module in list(sys.modules.items()):
        if name == "metaplastic" or name.startswith("metaplastic."):
            for value in list(vars(module).values()):
                if callable(getattr(value, "cache_clear", None)):
                    value.cache_clear()


def _hookwrapper(fn):
    import pytest

    return pytest.hookimpl(wrapper=True)(fn)


if os.environ.get("MUTATION_COVERAGE_OUT"):

    @_hookwrapper
    def pytest_runtest_protocol(item, nextitem):
        import jax

        jax.clear_caches()  # so that this test traces (and so executes) what it uses
        _clear_package_caches()  # likewise for functools caches (e.g. the sympy symbols)
        _COV["current"] = {}
        t0 = time.perf_counter()
        try:
            return (yield)
        finally:
            hits, _COV["current"] = _COV["current"], None
            _COV["tests"][item.nodeid] = {
                "lines": {k: sorted(v) for k, v in hits.items()},
                "seconds": time.perf_counter() - t0,
            }

    def pytest_sessionfinish(session, exitstatus):
        sys.settrace(None)
        import metaplastic

        data = {"tests": _COV["tests"], "package": metaplastic.__file__}
        Path(os.environ["MUTATION_COVERAGE_OUT"]).write_text(json.dumps(data))


# --- driver ----------------------------------------------------------------------------------


def _module_arg(name: str) -> str:
    for m in CORE_TESTS:
        short = m.removeprefix("metaplastic/")
        if name.removesuffix(".py") in (m[:-3], short[:-3], Path(m).stem):
            return m
    raise argparse.ArgumentTypeError(f"{name!r} is not a core module: {', '.join(CORE_TESTS)}")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "metaplastic", "tests"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modules", nargs="+", type=_module_arg, help="core modules (default: all)")
    ap.add_argument("--max-mutants", type=int, help="random sample of at most N per module")
    ap.add_argument("--seed", type=int, default=0, help="seed of the sample (default 0)")
    ap.add_argument("--jobs", type=int, default=1, help="mutants run at once (default 1)")
    ap.add_argument(
        "--out", type=Path, help=f"score file (default {DEFAULT_OUT.relative_to(ROOT)})"
    )
    ap.add_argument("--equivalent", type=Path, default=EQUIVALENT_FILE)
    ap.add_argument("--only", nargs="+", metavar="ID", help="run just these mutant ids")
    ap.add_argument("--list", action="store_true", help="count the mutants, run nothing")
    ap.add_argument(
        "--progress",
        type=Path,
        default=ROOT / "results" / "mutation" / "progress.jsonl",
        help="file every finished mutant is appended to (for --resume)",
    )
    ap.add_argument(
        "--resume",
        action="store_true",
        help="reuse the killed mutants of --progress (same mutated line); run the rest",
    )
    ap.add_argument(
        "--update",
        action="store_true",
        help="re-run only the selected mutants (--only or --modules) and merge their results "
        "into the score file (--out), keeping the others",
    )
    ap.add_argument("--timeout-factor", type=float, default=3.0)
    ap.add_argument("--timeout-floor", type=float, default=180.0, help="seconds (default 180)")
    ap.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        / "metaplastic-mutation",
        help="baselines and the JAX compilation cache",
    )
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    modules = args.modules or list(CORE_TESTS)
    if args.only:
        modules = [m for m in CORE_TESTS if any(i.startswith(m + ":") for i in args.only)]
    everything = {m: generate_mutants(m) for m in modules}
    mutants = {m: list(v) for m, v in everything.items()}
    totals = {m: len(v) for m, v in mutants.items()}
    if args.list:
        for m, v in mutants.items():
            print(f"{m}: {len(v)} mutants ({sum(x.module_level for x in v)} module-level)")
        print(f"total: {sum(totals.values())}")
        return 0
    if args.only:
        wanted = set(args.only)
        for m in modules:
            mutants[m] = [x for x in mutants[m] if x.id in wanted]
        missing = wanted - {x.id for v in mutants.values() for x in v}
        if missing:
            sys.exit(f"no such mutant: {', '.join(sorted(missing))}")
    sample = False
    if args.max_mutants is not None:
        for m, v in mutants.items():
            rng = random.Random(f"{args.seed}:{m}")  # a module's sample ignores the others
            if len(v) > args.max_mutants:
                mutants[m] = sorted(rng.sample(v, args.max_mutants), key=lambda x: (x.line, x.col))
                sample = True
    out_path = args.out or (None if args.only and not args.update else DEFAULT_OUT)
    previous = None
    if args.update:
        if not (args.only or args.modules) or args.max_mutants is not None:
            sys.exit("--update needs --only or --modules (and no --max-mutants)")
        if not out_path.exists():
            sys.exit(f"--update: {out_path} does not exist; run without --update first")
        previous = json.loads(out_path.read_text())

    all_ids = {x.id: x for v in everything.values() for x in v}
    equivalents = relocate(load_equivalents(args.equivalent), all_ids)
    stale = [
        i
        for i, e in equivalents.items()
        if i.split(":")[0] in modules
        and (i not in all_ids or e.get("mutated", all_ids[i].mutated) != all_ids[i].mutated)
    ]
    for i in stale:
        print(f"warning: {args.equivalent.name}: {i} no longer matches a mutant; re-check it")

    work = Path(tempfile.mkdtemp(prefix="mutation-"))
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    try:
        scratches = [make_scratch(work, f"w{j}") for j in range(max(1, args.jobs))]
        files = sorted({f for m in modules for f in CORE_TESTS[m]})
        t0 = time.perf_counter()
        baselines = {f: baseline(f, scratches[0], args.cache_dir, list(CORE_TESTS)) for f in files}
        baseline_s = time.perf_counter() - t0
        done_before = relocate(load_progress(args.progress), all_ids) if args.resume else {}
        commit = _git_commit()
        todo = []
        for m in modules:
            for x in mutants[m]:
                if x.id in equivalents and x.id not in stale:
                    results[x.id] = {"status": "equivalent", "reason": equivalents[x.id]["reason"]}
                    continue
                old_rec = done_before.get(x.id)
                if old_rec and old_rec.get("mutated") == x.mutated:
                    if old_rec["status"] in ("killed", "timeout"):  # errors: run again
                        results[x.id] = {
                            k: v for k, v in old_rec.items() if k not in ("id", "mutated")
                        } | {"resumed": True}
                        continue
                tests = select_tests(x, baselines)
                if not tests:
                    results[x.id] = {"status": "survived", "not_covered": True, "tests_run": 0}
                    continue
                secs = sum(baselines[t.split("::")[0]]["tests"][t]["seconds"] for t in tests)
                todo.append((x, tests, secs))
        n_run = len(todo)
        print(f"{sum(map(len, mutants.values()))} mutants, {n_run} to run", flush=True)
        free = list(scratches)
        done = [0]

        def work_one(job):
            x, tests, secs = job
            with _LOCK:
                scratch = free.pop()
            try:
                rec = run_mutant(
                    x, tests, secs, scratch, args.cache_dir, args.timeout_factor, args.timeout_floor
                )
            finally:
                with _LOCK:
                    free.append(scratch)
                    done[0] += 1
            print(
                f"[{done[0]}/{n_run}] {rec['status']:8s} {rec['seconds']:6.1f}s  {x.id}",
                flush=True,
            )
            save_progress(args.progress, x, rec, commit)
            return x.id, rec

        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            for mid, rec in pool.map(work_one, todo):
                results[mid] = rec
    except KeyboardInterrupt:
        with _LOCK:
            for p in _CHILDREN:
                os.killpg(p.pid, signal.SIGKILL)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)

    if previous is not None:
        summary = _merge(args, previous, modules, mutants, totals, results, stale)
    else:
        summary = _summarise(args, modules, mutants, totals, results, sample, stale)
        summary["history"] = [_history_entry(summary)]
    summary["baseline_s"] = round(baseline_s, 1)
    summary["runtime_s"] = round(time.perf_counter() - t_start, 1)
    run_secs = [r["seconds"] for r in results.values() if "seconds" in r]
    per = [r.get("seconds", 0.0) for r in results.values() if r["status"] != "equivalent"]
    summary["per_mutant_s"] = {
        "mean_of_run": round(statistics.mean(run_secs), 1) if run_secs else None,
        "median_of_run": round(statistics.median(run_secs), 1) if run_secs else None,
        "mean_incl_not_covered": round(statistics.mean(per), 1) if per else None,
    }
    summary["baseline_cached"] = baseline_s < 5.0
    counts = {m: totals.get(m) or len(generate_mutants(m)) for m in CORE_TESTS}
    summary["mutants_per_core_module"] = counts
    if per:  # this run's mean time per mutant times every mutant (none sampled, none cached)
        est = statistics.mean(per) * sum(counts.values()) / max(1, args.jobs)
        summary["estimated_full_run_h"] = round(est / 3600, 2)
        summary["estimate_note"] = (
            "mean seconds per mutant of this run x all mutants of all core modules / jobs, "
            "plus the baseline (about 5 min with a warm JAX cache, 10 cold)"
        )
    print(
        f"score {summary['score']}: killed {summary['killed']} (timeouts "
        f"{summary['timeouts']}), survived {summary['survived']} (not covered "
        f"{summary['not_covered']}), equivalent {summary['equivalent']}, errors "
        f"{summary['errors']}"
    )
    for s in summary["survivors"]:
        print(f"  survived: {s['id']}\n      {s['original']}\n   -> {s['mutated']}")
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {out_path}")
    return 0


def _history_entry(summary: dict) -> dict:
    return {k: summary[k] for k in ("command", "commit", "date")} | {
        "mutants_run": summary["scope"]["mutants_tested"]
    }


def _merge(args, previous, modules, mutants, totals, results, stale) -> dict:
    """The score file ``previous`` with the results of this run's mutants in place of its
    own: a re-run module's old entries all go (its ids may have shifted), a re-run id's
    old entry is replaced; every other module keeps its results and totals."""
    rerun_modules = set() if args.only else set(modules)
    old = {
        i: r
        for i, r in previous["mutants"].items()
        if i.split(":")[0] not in rerun_modules and i not in results
    }
    old_survivors = {s["id"]: s for s in previous["survivors"]}
    all_modules = sorted(
        set(previous["scope"]["modules"]) | set(modules), key=list(CORE_TESTS).index
    )
    all_totals = {m: previous["modules"].get(m, {}).get("mutants_total") for m in all_modules}
    all_totals.update(totals)
    kept = {m: [] for m in all_modules}
    for i in old:
        kept[i.split(":")[0]].append(i)
    new_ids = {m: [x.id for x in mutants[m]] for m in modules}
    ids_by_module = {
        m: kept[m] + [i for i in new_ids.get(m, []) if i not in kept[m]] for m in all_modules
    }
    merged = dict(old)
    by_id = {x.id: x for v in mutants.values() for x in v}
    for i, r in results.items():
        merged[i] = dict(r, where=f"{by_id[i].module}:{by_id[i].line}")
    summary = _summarise_results(
        args, all_modules, ids_by_module, all_totals, merged, by_id, old_survivors, stale
    )
    summary["sample"] = previous.get("sample", False) or any(
        len(ids_by_module[m]) < (all_totals[m] or 0) for m in all_modules
    )
    summary["sampling"] = previous.get("sampling")
    summary["history"] = previous.get("history") or [
        {k: previous.get(k) for k in ("command", "commit", "date")}
    ]
    summary["history"].append(_history_entry(summary) | {"update": True})
    for k in ("baseline_s", "runtime_s", "per_mutant_s", "estimated_full_run_h", "estimate_note"):
        if k in previous:
            summary[f"first_run_{k}"] = previous.get(f"first_run_{k}", previous[k])
    return summary


def _summarise(args, modules, mutants, totals, results, sample, stale) -> dict:
    by_id = {x.id: x for v in mutants.values() for x in v}
    ids_by_module = {m: [x.id for x in mutants[m]] for m in modules}
    summary = _summarise_results(args, modules, ids_by_module, totals, results, by_id, {}, stale)
    summary["sample"] = sample or bool(args.only)
    summary["sampling"] = {"max_mutants": args.max_mutants, "seed": args.seed, "only": args.only}
    return summary


def _summarise_results(
    args, modules, ids_by_module, totals, results, by_id, old_survivors, stale
) -> dict:

    def count(ids, *statuses):
        return sum(results[i]["status"] in statuses for i in ids)

    per_module = {}
    for m in modules:
        ids = ids_by_module[m]
        k, s = count(ids, "killed", "timeout"), count(ids, "survived")
        per_module[m] = {
            "mutants_total": totals[m],
            "mutants_sampled": len(ids),
            "killed": k,
            "survived": s,
            "equivalent": count(ids, "equivalent"),
            "timeouts": count(ids, "timeout"),
            "not_covered": sum(bool(results[i].get("not_covered")) for i in ids),
            "errors": count(ids, "error"),
            "score": round(k / (k + s), 4) if k + s else None,
            "tests": CORE_TESTS[m],
        }
    ids = list(results)
    killed, survived = count(ids, "killed", "timeout"), count(ids, "survived")
    survivors = []
    for i in ids:
        if results[i]["status"] == "survived":
            if i not in by_id:  # kept from the score file being updated
                survivors.append(old_survivors[i])
                continue
            x = by_id[i]
            survivors.append(
                {
                    "id": i,
                    "where": f"{x.module}:{x.line}",
                    "operator": x.operator,
                    "original": x.original,
                    "mutated": x.mutated,
                    "not_covered": bool(results[i].get("not_covered")),
                    "tests_run": results[i]["tests_run"],
                }
            )
    return {
        "score": round(killed / (killed + survived), 4) if killed + survived else None,
        "killed": killed,
        "survived": survived,
        "equivalent": count(ids, "equivalent"),
        "timeouts": count(ids, "timeout"),
        "not_covered": sum(bool(r.get("not_covered")) for r in results.values()),
        "errors": count(ids, "error"),
        "notes": (
            "score = killed / (killed + survived); timeouts count as killed; mutants that no "
            "mapped test executes count as survived (not_covered) without a run; equivalent "
            "mutants (equivalent.json) are not run and not scored"
        ),
        "scope": {
            "modules": modules,
            "all_core_modules": set(modules) == set(CORE_TESTS),
            "mutants_in_scope": sum(totals[m] or 0 for m in modules),
            "mutants_tested": len(ids),
        },
        "modules": per_module,
        "survivors": survivors,
        "errors_detail": [
            {"id": i, "output": r.get("output", "")}
            for i, r in results.items()
            if r["status"] == "error"
        ],
        "stale_equivalents": stale,
        "mutants": {
            i: dict(results[i], where=f"{by_id[i].module}:{by_id[i].line}")
            if i in by_id
            else results[i]
            for i in ids
        },
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "python": sys.version.split()[0],
    }


if __name__ == "__main__":
    sys.exit(main())
