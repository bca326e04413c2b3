"""User-defined terms: a JAX function of the local signals plus its sympy form.

A user term lives in the user's own Python file::

    # my_terms.py
    import jax.numpy as jnp
    from metaplastic import user_term

    @user_term(sympy=lambda S: -S["y"] * S["x"].T, description="anti-Hebbian")
    def anti_hebbian(s):
        return -jnp.outer(s.y, s.x)

and a rule file names it as ``"my_terms:anti_hebbian"`` (an importable module) or
``"path/to/my_terms.py:anti_hebbian"`` (a file). The module is imported explicitly with
:mod:`importlib`; no string is ever evaluated.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

import equinox as eqx
import sympy as sp

from ._errors import MetaplasticError
from ._terms import AbstractTerm, sympy_symbols


class FunctionTerm(AbstractTerm):
    """A term made from a user function ``fn(signals) -> dW`` and ``sympy_fn(symbols)``."""

    ref: str = eqx.field(static=True)
    fn: Callable = eqx.field(static=True)
    sympy_fn: Callable = eqx.field(static=True)
    info: str = eqx.field(static=True)
    reads_state: bool = eqx.field(static=True)

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

    ``sympy`` maps the symbol table of :func:`~metaplastic._terms.sympy_symbols` to the same
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


def _import(module: str, ref: str):
    if module.endswith(".py") or "/" in module:
        path = Path(module)
        if not path.is_file():
            raise MetaplasticError(f"user term {ref!r}: file {module} not found")
        mod_name = f"metaplastic_user_{abs(hash(str(path.resolve())))}"
        if mod_name in sys.modules:
            return sys.modules[mod_name]
        spec = importlib.util.spec_from_file_location(mod_name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = mod
        try:
            spec.loader.exec_module(mod)
        except Exception as err:  # noqa: BLE001 - report any import failure in one line
            del sys.modules[mod_name]
            raise MetaplasticError(
                f"user term {ref!r}: importing {module} failed ({type(err).__name__}: {err})"
            ) from None
        return mod
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MetaplasticError(
            f"user term {ref!r}: cannot import module {module!r} ({err}); put it on PYTHONPATH "
            "or name the file, e.g. path/to/terms.py:function"
        ) from None


def load_user_term(ref: str) -> FunctionTerm:
    """Import ``module:function`` (or ``file.py:function``) and wrap it as a term."""
    module, _, func = ref.rpartition(":")
    if not module or not func.isidentifier():
        raise MetaplasticError(
            f"user term {ref!r}: write module:function or path/to/file.py:function"
        )
    mod = _import(module, ref)
    fn = getattr(mod, func, None)
    if fn is None:
        raise MetaplasticError(f"user term {ref!r}: {module} has no function {func!r}")
    meta = getattr(fn, "__metaplastic_term__", None)
    if meta is None:
        raise MetaplasticError(
            f"user term {ref!r}: decorate {func} with @metaplastic.user_term(sympy=...) so "
            "that it has an equation"
        )
    return FunctionTerm(ref, fn, meta["sympy"], meta["description"], meta["stateful"])
