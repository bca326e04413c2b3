"""Rule equations as sympy expressions: safe parsing, numeric evaluation, Python code.

Two forms of equation are understood:

* **matrix form** (the term pool's exports): ``x``, ``y``, ``e``, ``e_pre``, ``ybar``,
  ``theta_M``, ``nrm0``, ``one_in`` and ``one_out`` are column vectors, ``W`` is the
  ``(n_out, n_in)`` weight matrix, ``.T`` transposes, ``*`` is the matrix product,
  ``diag(v)`` is a diagonal matrix and ``hadamard(a, b)`` the elementwise product. Example:
  ``-0.03*e*x.T + 0.01*(y*x.T - y*y.T*W)``.
* **elementwise form** (Taylor and MLP rules' exports): every symbol is one synapse's
  scalar, ``x = x_j``, ``e_pre = e_pre_j``, ``y = y_i``, ``e = e_i`` (also ``ybar``,
  ``theta_M``, ``nrm0``) and ``W = W_ij``. Example: ``0.05*x*y - 0.05*W*y**2`` (Oja).

An equation is in matrix form when it uses ``.T``, ``diag``, ``hadamard``, ``one_in`` or
``one_out``; otherwise it is elementwise.

User strings are never given to ``eval`` or ``sympify``: :func:`parse_equation` first
tokenises the text and refuses any name outside a whitelist (and any token that is not a
number, a whitelisted name or an arithmetic operator), then hands it to sympy's
``parse_expr`` with a namespace that holds only those names and no builtins.
Expressions are evaluated by walking the sympy tree (:func:`evaluate`), never by
generating and running code.
"""

from __future__ import annotations

import io
import keyword
import tokenize
from typing import Any

import jax.numpy as jnp
import sympy as sp
from sympy.parsing.sympy_parser import (
    auto_number,
    convert_xor,
    factorial_notation,
    parse_expr,
)

from .._errors import MetaplasticError
from ._terms import sympy_symbols

#: Column-vector signals in (n_out,) and (n_in,) and the weight matrix.
POST_SIGNALS = ("y", "e", "ybar", "theta_M", "nrm0")
PRE_SIGNALS = ("x", "e_pre")
STATE_SIGNALS = ("ybar", "theta_M", "nrm0")
SIGNAL_NAMES = (*PRE_SIGNALS, *POST_SIGNALS, "W")
MATRIX_ONLY = ("one_in", "one_out")
DIMENSIONS = ("n_in", "n_out")

#: Functions an equation may call, by the name used in the text.
FUNCTIONS: dict[str, Any] = {
    "exp": sp.exp,
    "log": sp.log,
    "tanh": sp.tanh,
    "sigmoid": lambda z: 1 / (1 + sp.exp(-z)),
    "sqrt": sp.sqrt,
    "abs": sp.Abs,
    "Abs": sp.Abs,
    "sign": sp.sign,
    "sin": sp.sin,
    "cos": sp.cos,
    "diag": sp.DiagMatrix,
    "hadamard": sp.HadamardProduct,
    # the names sympy's printer uses, so that exported text parses back
    "DiagMatrix": sp.DiagMatrix,
    "HadamardProduct": sp.HadamardProduct,
    "HadamardPower": sp.HadamardPower,
}
_MATRIX_MARKERS = {"T", "diag", "hadamard", "DiagMatrix", "HadamardProduct", "HadamardPower"}
_MATRIX_MARKERS |= set(MATRIX_ONLY)
_ALLOWED_OPS = {"+", "-", "*", "/", "**", "^", "(", ")", ".", ","}


def scalar_symbols() -> dict[str, sp.Symbol]:
    """Scalar symbols of the elementwise form (``x`` means ``x_j`` and so on)."""
    return {n: sp.Symbol(n, real=True) for n in SIGNAL_NAMES}


def allowed_names() -> list[str]:
    return sorted({*SIGNAL_NAMES, *MATRIX_ONLY, *DIMENSIONS, *FUNCTIONS})


def _tokens(text: str) -> list[tokenize.TokenInfo]:
    try:
        toks = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, IndentationError, SyntaxError) as err:
        raise MetaplasticError(f"equation {text!r}: cannot be read ({err})") from None
    skip = {tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER, tokenize.INDENT, tokenize.DEDENT}
    return [t for t in toks if t.type not in skip]


def _strip_lhs(text: str) -> str:
    text = text.strip()
    for lhs in ("dW =", "ΔW =", "\\Delta W =", "dW="):
        if text.startswith(lhs):
            return text[len(lhs) :].strip()
    return text


def parse_equation(text: str) -> sp.Basic:
    """Turn an equation string into a sympy expression (matrix or elementwise form).

    Raises :class:`MetaplasticError` with one line for anything outside the whitelist
    (e.g. ``__import__('os')``), for syntax errors and for shape mismatches.
    """
    if not isinstance(text, str) or not text.strip():
        raise MetaplasticError("equation is empty; give e.g. 'x*y - y**2*W'")
    if len(text) > 10_000:
        raise MetaplasticError("equation is longer than 10,000 characters; shorten it")
    body = _strip_lhs(text)
    toks = _tokens(body)
    allowed = set(allowed_names())
    prev = None
    names = set()
    for t in toks:
        if t.type == tokenize.NAME:
            if t.string == "T" and prev is not None and prev.string == ".":
                names.add("T")
            elif t.string not in allowed or keyword.iskeyword(t.string):
                raise MetaplasticError(
                    f"equation: {t.string!r} is not allowed; use only "
                    f"{', '.join(sorted(allowed))} and numbers"
                )
            else:
                names.add(t.string)
        elif t.type == tokenize.OP:
            if t.string not in _ALLOWED_OPS:
                raise MetaplasticError(
                    f"equation: operator {t.string!r} is not allowed; use + - * / ** ( ) .T"
                )
            if t.string == "." and not _next_is_T(toks, t):
                raise MetaplasticError("equation: '.' may only be used as '.T' (transpose)")
        elif t.type != tokenize.NUMBER:
            raise MetaplasticError(f"equation: {t.string!r} is not allowed (only arithmetic)")
        prev = t
    matrix = bool(names & _MATRIX_MARKERS)
    S = sympy_symbols()
    local: dict[str, Any] = dict(FUNCTIONS)
    if matrix:
        local.update({n: S[n] for n in (*SIGNAL_NAMES, *MATRIX_ONLY)})
    else:
        local.update(scalar_symbols())
    local.update({n: S[n] for n in DIMENSIONS})
    namespace = {
        "__builtins__": {},
        "Integer": sp.Integer,
        "Float": sp.Float,
        "Rational": sp.Rational,
        "factorial": sp.factorial,
        "Add": sp.Add,
        "Mul": sp.Mul,
        "Pow": sp.Pow,
    }
    try:
        kw = dict(
            local_dict=local,
            global_dict=namespace,
            transformations=(auto_number, factorial_notation, convert_xor),
        )
        _check_powers(parse_expr(body, evaluate=False, **kw), body)
        expr = parse_expr(body, evaluate=True, **kw)
    except MetaplasticError:
        raise
    except Exception as err:  # noqa: BLE001 - sympy raises many types for bad input
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise MetaplasticError(f"equation {body!r}: {msg}; check the syntax and shapes") from None
    if matrix:
        if not isinstance(expr, sp.MatrixExpr) or expr.shape != (S["n_out"], S["n_in"]):
            shape = getattr(expr, "shape", "a scalar")
            raise MetaplasticError(
                f"equation {body!r}: a matrix-form update must have shape (n_out, n_in), got "
                f"{shape}; e.g. write e*x.T for an outer product"
            )
        return expr.doit()
    if isinstance(expr, sp.MatrixExpr) or not isinstance(expr, sp.Expr):
        raise MetaplasticError(f"equation {body!r}: not a scalar elementwise expression")
    return expr


#: Largest exponent magnitude an equation may use (keeps sympy from building huge numbers).
MAX_EXPONENT = 16


def _check_powers(expr, body: str) -> None:
    """Refuse nested powers and large exponents before sympy evaluates anything."""
    for node in sp.preorder_traversal(expr):
        if isinstance(node, sp.factorial):
            raise MetaplasticError(f"equation {body!r}: factorials are not allowed")
        if isinstance(node, sp.Pow | sp.HadamardPower):
            exp_ = node.args[1]
            inner = [a for a in sp.preorder_traversal(exp_) if isinstance(a, sp.Pow)]
            if any(a.args[1] != -1 for a in inner):  # 1/2 is Pow(2, -1): allowed
                raise MetaplasticError(f"equation {body!r}: nested powers are not allowed")
            nums = [abs(float(a)) for a in sp.preorder_traversal(exp_) if a.is_Number]
            if any(v > MAX_EXPONENT for v in nums):
                raise MetaplasticError(
                    f"equation {body!r}: exponents above {MAX_EXPONENT} are not allowed"
                )


def _next_is_T(toks, t) -> bool:
    i = toks.index(t)
    return i + 1 < len(toks) and toks[i + 1].string == "T"


def is_matrix(expr: sp.Basic) -> bool:
    return isinstance(expr, sp.MatrixExpr)


def signal_env(s, matrix: bool, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Arrays for each symbol name, shaped for the matrix or the elementwise form."""
    env: dict[str, Any] = {}
    for n in SIGNAL_NAMES:
        v = getattr(s, n, None)
        if v is None:
            continue
        if n == "W":
            env[n] = v
        elif n in PRE_SIGNALS:
            env[n] = v[:, None] if matrix else v[None, :]
        else:
            env[n] = v[:, None]
    env["one_in"] = jnp.ones((s.W.shape[1], 1), s.W.dtype)
    env["one_out"] = jnp.ones((s.W.shape[0], 1), s.W.dtype)
    env["n_out"], env["n_in"] = float(s.W.shape[0]), float(s.W.shape[1])
    env.update(extra or {})
    return env


_UNARY = {
    sp.exp: jnp.exp,
    sp.log: jnp.log,
    sp.tanh: jnp.tanh,
    sp.Abs: jnp.abs,
    sp.sign: jnp.sign,
    sp.sin: jnp.sin,
    sp.cos: jnp.cos,
}


def evaluate(expr: sp.Basic, env: dict[str, Any], xp=jnp):
    """Evaluate ``expr`` on the arrays in ``env`` (by symbol name) by walking the tree."""

    def ev(node):
        if isinstance(node, sp.MatrixSymbol | sp.Symbol):
            name = node.name
            if name not in env:
                raise MetaplasticError(
                    f"equation uses {name!r}, which this rule does not provide "
                    "(stateful symbols need a stateful rule)"
                )
            return env[name]
        if node.is_Number or isinstance(node, sp.NumberSymbol):
            return float(node)
        if isinstance(node, sp.ZeroMatrix):
            return 0.0
        if isinstance(node, sp.Add | sp.MatAdd):
            out = ev(node.args[0])
            for a in node.args[1:]:
                out = out + ev(a)
            return out
        if isinstance(node, sp.MatMul):
            scal, mats = 1.0, None
            for a in node.args:
                v = ev(a)
                if isinstance(a, sp.MatrixExpr):
                    mats = v if mats is None else mats @ v
                else:
                    scal = scal * v
            return scal if mats is None else scal * mats
        if isinstance(node, sp.Mul | sp.HadamardProduct):
            out = ev(node.args[0])
            for a in node.args[1:]:
                out = out * ev(a)
            return out
        if isinstance(node, sp.Pow | sp.HadamardPower):
            base, exp_ = node.args
            e = ev(exp_)
            if isinstance(e, float) and e == int(e) and 0 <= e <= 4:
                return xp.asarray(ev(base)) ** int(e)
            return xp.asarray(ev(base)) ** e
        if isinstance(node, sp.Transpose):
            return xp.asarray(ev(node.arg)).T
        if isinstance(node, sp.DiagMatrix):
            return xp.diagflat(xp.asarray(ev(node.args[0])))
        if isinstance(node, sp.Identity):
            return xp.eye(int(ev(node.args[0])))
        if node.func in _UNARY:
            return _UNARY[node.func](ev(node.args[0]))
        if isinstance(node, sp.Piecewise | sp.Heaviside):
            raise MetaplasticError(f"equation: {node.func.__name__} is not supported")
        raise MetaplasticError(
            f"equation: cannot evaluate {type(node).__name__} ({sp.sstr(node)[:60]})"
        )

    return ev(expr)


def update_from_expression(expr: sp.Basic, s, extra: dict[str, Any] | None = None):
    """The ``(n_out, n_in)`` weight change that ``expr`` gives for the signals ``s``."""
    out = evaluate(expr, signal_env(s, is_matrix(expr), extra))
    return jnp.broadcast_to(jnp.asarray(out, s.W.dtype), s.W.shape)


def to_python(expr: sp.Basic, name: str = "delta_w") -> str:
    """Source of a stand-alone JAX function computing the update ``expr``."""
    matrix = is_matrix(expr)

    def pr(node) -> str:
        if isinstance(node, sp.MatrixSymbol | sp.Symbol):
            return node.name
        if node.is_Number or isinstance(node, sp.NumberSymbol):
            return repr(float(node))
        if isinstance(node, sp.ZeroMatrix):
            return "0.0"
        if isinstance(node, sp.Add | sp.MatAdd):
            return "(" + " + ".join(pr(a) for a in node.args) + ")"
        if isinstance(node, sp.MatMul):
            scal = [pr(a) for a in node.args if not isinstance(a, sp.MatrixExpr)]
            mats = [pr(a) for a in node.args if isinstance(a, sp.MatrixExpr)]
            return "(" + " * ".join([*scal, "(" + " @ ".join(mats) + ")"]) + ")"
        if isinstance(node, sp.Mul | sp.HadamardProduct):
            return "(" + " * ".join(pr(a) for a in node.args) + ")"
        if isinstance(node, sp.Pow | sp.HadamardPower):
            return f"({pr(node.args[0])} ** {pr(node.args[1])})"
        if isinstance(node, sp.Transpose):
            return f"{pr(node.arg)}.T"
        if isinstance(node, sp.DiagMatrix):
            return f"jnp.diagflat({pr(node.args[0])})"
        if node.func in _UNARY:
            return f"jnp.{_UNARY[node.func].__name__}({pr(node.args[0])})"
        raise MetaplasticError(f"cannot write {type(node).__name__} as Python")

    body = pr(expr)
    args = "x, y, e, e_pre, W, ybar=None, theta_M=None, nrm0=None"
    if matrix:
        doc = (
            "Matrix form: x, e_pre are (n_in, 1) and y, e, ybar, theta_M, nrm0 are (n_out, 1)\n"
            "    column vectors, W is (n_out, n_in); returns dW of shape (n_out, n_in)."
        )
        prelude = (
            "    one_in = jnp.ones((W.shape[1], 1), W.dtype)\n"
            "    one_out = jnp.ones((W.shape[0], 1), W.dtype)\n"
            "    n_out, n_in = W.shape\n"
        )
    else:
        doc = (
            "Elementwise form: pass x, e_pre as (1, n_in) rows, y, e, ybar, theta_M, nrm0 as\n"
            "    (n_out, 1) columns and W as (n_out, n_in); returns dW of shape (n_out, n_in)."
        )
        prelude = "    n_out, n_in = W.shape\n"
    return (
        "import jax.numpy as jnp\n\n\n"
        f"def {name}({args}):\n"
        f'    """dW = {sp.sstr(expr)}\n\n    {doc}\n    """\n'
        f"{prelude}"
        f"    return jnp.broadcast_to({body}, W.shape)\n"
    )
