"""User-defined terms: a JAX function of the local signals plus its sympy form.

A user term lives in the user's own Python file::

    # my_terms.py
    import jax.numpy as jnp
    from metaplastic import user_term

    @user_term(sympy=lambda S: -S["y"] * S["x"].T, description="anti-Hebbian")
    def anti_hebbian(s):
        return -jnp.outer(s.y, s.x)

and a rule file names it as ``"my_terms:anti_hebbian"`` (an importable module) or
``"path/to/my_terms.py:anti_hebbian"`` (a file). No string is ever evaluated.

Runs never import code from a path written in a run directory. When a run starts, each
user-term *file* is copied to ``<run>/user_terms/<name>.py`` and its SHA-256 recorded in the
run's ``config.toml`` (table ``[user_terms]``) and ``rule.json`` (key ``user_terms``), keyed
by the module part of the reference as written in the rule file. Loading the run later
(evaluate, export, distill, resume) happens inside :func:`run_user_terms`: a file term is
executed from the copy only, only if the copy's hash matches the recorded one, and only when
the caller trusts the run (``--trust-user-terms``); a ``module:function`` term is imported by
name, also only when trusted.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import importlib
import re
import sys
import types
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import equinox as eqx
import sympy as sp

from .._errors import MetaplasticError
from ._terms import AbstractTerm, sympy_symbols

#: Folder of a run directory holding the copied user-term files.
USER_TERMS_DIR = "user_terms"
#: The command-line flag that allows a run's user terms to be loaded.
TRUST_FLAG = "--trust-user-terms"
_SAFE_FILE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\.py")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class FunctionTerm(AbstractTerm):
    """A term made from a user function ``fn(signals) -> dW`` and ``sympy_fn(symbols)``.

    ``origin`` records where the code came from, as the items of its manifest entry:
    ``(("file", name), ("sha256", hex))`` for a copy in a run directory,
    ``(("module", name),)`` for a module imported by name, ``(("path", path), ("sha256",
    hex))`` for a file loaded outside any run.
    """

    ref: str = eqx.field(static=True)
    fn: Callable = eqx.field(static=True)
    sympy_fn: Callable = eqx.field(static=True)
    info: str = eqx.field(static=True)
    reads_state: bool = eqx.field(static=True)
    origin: tuple = eqx.field(static=True, default=())

    @property
    def name(self) -> str:  # the module:function reference, as written in the rule file
        return self.ref

    @property
    def description(self) -> str:
        return self.info

    @property
    def stateful(self) -> bool:
        return self.reads_state

    def __call__(self, s):
        return self.fn(s)

    def to_sympy(self) -> sp.Basic:
        return self.sympy_fn(sympy_symbols())


def user_term(*, sympy: Callable, description: str = "user term", stateful: bool = False):
    """Decorator marking ``fn(signals) -> (n_out, n_in)`` as a plasticity term.

    ``sympy`` maps the symbol table of :func:`~metaplastic.rules._terms.sympy_symbols` to the same
    update as a sympy matrix expression. ``stateful=True`` if ``fn`` reads ``s.ybar``,
    ``s.theta_M`` or ``s.nrm0``.
    """

    def wrap(fn):
        fn.__metaplastic_term__ = {
            "sympy": sympy,
            "description": description,
            "stateful": bool(stateful),
        }
        return fn

    return wrap


def is_user_ref(name: str) -> bool:
    """Whether a term name is a user term (``module:function``) rather than a built-in."""
    return ":" in name


def is_file_module(module: str) -> bool:
    """Whether the module part of a reference names a file (``x.py`` or a path)."""
    return module.endswith(".py") or "/" in module or "\\" in module


def split_ref(ref: str) -> tuple[str, str]:
    module, _, func = ref.rpartition(":")
    if not module or not func.isidentifier():
        raise MetaplasticError(
            f"user term {ref!r}: write module:function or path/to/file.py:function"
        )
    return module, func


# --- where user-term code may come from ----------------------------------------------------


@dataclass(frozen=True)
class _RunSources:
    run_dir: Path | None
    manifest: dict[str, dict[str, str]] = field(default_factory=dict)
    trusted: bool = False


_SOURCES: contextvars.ContextVar[_RunSources | None] = contextvars.ContextVar(
    "metaplastic_user_term_sources", default=None
)


@contextlib.contextmanager
def run_user_terms(
    run_dir: Path | None, manifest: dict[str, dict[str, str]] | None, *, trusted: bool
) -> Iterator[None]:
    """Load user terms as a run's: from ``run_dir/user_terms`` copies listed in ``manifest``
    (hash-checked), and only if ``trusted``. Never from the paths the references name."""
    token = _SOURCES.set(_RunSources(run_dir, dict(manifest or {}), bool(trusted)))
    try:
        yield
    finally:
        _SOURCES.reset(token)


def untrusted_message(what: str) -> str:
    return (
        f"this run uses user-defined terms ({what}); re-run with {TRUST_FLAG} to load it "
        "(trust_user_terms=True in Python) if you trust that code"
    )


def check_manifest(data: Any, where: str) -> dict[str, dict[str, str]]:
    """Validate a ``user_terms`` manifest read from a run file; return it as plain dicts."""
    if data is None:
        return {}
    bad = MetaplasticError(
        f"{where}: malformed user_terms record; the run directory is damaged, train it again"
    )
    if not isinstance(data, dict):
        raise bad
    out = {}
    for module, entry in data.items():
        if not isinstance(module, str) or not isinstance(entry, dict):
            raise bad
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in entry.items()):
            raise bad
        if "file" in entry and not _SAFE_FILE.fullmatch(entry["file"]):
            raise MetaplasticError(
                f"{where}: user-term copy {entry['file']!r} is not a plain file name in "
                f"{USER_TERMS_DIR}/; refusing to load it"
            )
        if "sha256" in entry and not _SHA256.fullmatch(entry["sha256"]):
            raise bad
        if "file" in entry and "sha256" not in entry:
            raise bad
        out[module] = dict(entry)
    return out


def manifest_of(rule) -> dict[str, dict[str, str]]:
    """The ``user_terms`` manifest of a rule's user terms (empty for built-in terms only)."""
    base = getattr(rule, "rule", rule)  # PlasticFeedback wraps the rule
    out = {}
    for term in getattr(base, "terms", ()):
        if isinstance(term, FunctionTerm) and term.origin:
            out[split_ref(term.ref)[0]] = dict(term.origin)
    return out


# --- reading, copying and executing user-term files ---------------------------------------


def read_sources(refs: Iterable[str]) -> dict[str, bytes | None]:
    """``{module: file bytes}`` for the user terms among ``refs`` (``None`` for modules
    imported by name); one-line error if a named file is missing. Reads the user's own files:
    call this only for a new run, whose rule the user named."""
    out: dict[str, bytes | None] = {}
    for ref in refs:
        if not is_user_ref(ref):
            continue
        module, _ = split_ref(ref)
        if module in out:
            continue
        if not is_file_module(module):
            out[module] = None
            continue
        path = Path(module)
        if not path.is_file():
            raise MetaplasticError(f"user term {ref!r}: file {module} not found")
        try:
            out[module] = path.read_bytes()
        except OSError as err:
            raise MetaplasticError(f"user term {ref!r}: cannot read {module} ({err})") from None
    return out


def _copy_name(stem: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_]", "_", stem) or "terms"
    name, k = f"{base}.py", 2
    while name in taken:
        name, k = f"{base}_{k}.py", k + 1
    return name


def copy_sources(sources: dict[str, bytes | None], run_dir: Path) -> dict[str, dict[str, str]]:
    """Write each file of :func:`read_sources` to ``run_dir/user_terms/``; the manifest."""
    from .._io import atomic_write

    manifest: dict[str, dict[str, str]] = {}
    by_hash: dict[str, str] = {}
    for module, data in sources.items():
        if data is None:
            manifest[module] = {"module": module}
            continue
        sha = hashlib.sha256(data).hexdigest()
        if sha not in by_hash:
            name = _copy_name(Path(module).stem, set(by_hash.values()))
            dest = run_dir / USER_TERMS_DIR / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(dest, data)
            by_hash[sha] = name
        manifest[module] = {"file": by_hash[sha], "sha256": sha}
    return manifest


def _exec_source(data: bytes, path: Path, sha: str, ref: str) -> types.ModuleType:
    """Run ``data`` (already read and hash-checked) as a module; one module per content."""
    mod_name = f"metaplastic_user_{sha[:16]}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    mod = types.ModuleType(mod_name)
    mod.__file__ = str(path)
    sys.modules[mod_name] = mod
    try:
        code = compile(data, str(path), "exec")
        exec(code, mod.__dict__)  # the user's own module, as an import would run it
    except Exception as err:  # noqa: BLE001 - report any import failure in one line
        del sys.modules[mod_name]
        raise MetaplasticError(
            f"user term {ref!r}: importing {path} failed ({type(err).__name__}: {err})"
        ) from None
    return mod


def _import_module(module: str, ref: str) -> types.ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MetaplasticError(
            f"user term {ref!r}: cannot import module {module!r} ({err}); put it on PYTHONPATH "
            "or name the file, e.g. path/to/terms.py:function"
        ) from None


def _load_from_run(src: _RunSources, module: str, ref: str) -> tuple[types.ModuleType, tuple]:
    if not is_file_module(module):
        if not src.trusted:
            raise MetaplasticError(untrusted_message(f"module {module!r}, imported by name"))
        return _import_module(module, ref), (("module", module),)
    entry = src.manifest.get(module)
    if src.run_dir is None:
        raise MetaplasticError(
            f"user term {ref!r}: a saved rule loads its user terms only from the verified "
            f"copies in its run directory (pass run_dir), never from the path written in it"
        )
    if entry is None or "file" not in entry:
        raise MetaplasticError(
            f"user term {ref!r}: {src.run_dir} holds no recorded copy of {module} in "
            f"{USER_TERMS_DIR}/ (runs made before user terms were copied have none), and "
            "metaplastic never imports code from a path written in a run; train the run again"
        )
    path = src.run_dir / USER_TERMS_DIR / entry["file"]
    if not src.trusted:
        raise MetaplasticError(untrusted_message(f"code in {path}"))
    try:
        data = path.read_bytes()
    except OSError:
        raise MetaplasticError(
            f"user term {ref!r}: {path} is missing; the run directory is incomplete"
        ) from None
    sha = hashlib.sha256(data).hexdigest()
    if sha != entry["sha256"]:
        raise MetaplasticError(
            f"{path}: SHA-256 {sha[:12]}... does not match {entry['sha256'][:12]}... recorded "
            "when the run was made (the file was changed); refusing to load it, restore it "
            "or train the run again"
        )
    return _exec_source(data, path, sha, ref), (("file", entry["file"]), ("sha256", sha))


def _load_direct(module: str, ref: str) -> tuple[types.ModuleType, tuple]:
    """Outside a run: the file or module the user named."""
    if not is_file_module(module):
        return _import_module(module, ref), (("module", module),)
    data = read_sources([ref])[module]
    sha = hashlib.sha256(data).hexdigest()
    path = Path(module)
    return _exec_source(data, path, sha, ref), (("path", str(path)), ("sha256", sha))


def load_user_term(ref: str) -> FunctionTerm:
    """Load ``module:function`` (or ``file.py:function``) and wrap it as a term.

    Inside :func:`run_user_terms` the code comes only from the run's verified copies (or
    a module imported by name), and only if the run is trusted.
    """
    module, func = split_ref(ref)
    src = _SOURCES.get()
    if src is None:
        mod, origin = _load_direct(module, ref)
    else:
        mod, origin = _load_from_run(src, module, ref)
    fn = getattr(mod, func, None)
    if fn is None:
        raise MetaplasticError(f"user term {ref!r}: {module} has no function {func!r}")
    meta = getattr(fn, "__metaplastic_term__", None)
    if meta is None:
        raise MetaplasticError(
            f"user term {ref!r}: decorate {func} with @metaplastic.user_term(sympy=...) so "
            "that it has an equation"
        )
    return FunctionTerm(ref, fn, meta["sympy"], meta["description"], meta["stateful"], origin)
