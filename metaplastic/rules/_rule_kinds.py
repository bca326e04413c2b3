"""Rule families beyond the term pool: Taylor (polynomial) basis, MLP rules, equations.

All act elementwise on the synapse ``(i, j)`` of a layer, reading ``x_j`` (pre), ``y_i``
(post), ``W_ij`` and ``e_i`` (post error); their sympy forms are elementwise expressions in
the scalar symbols of :func:`metaplastic.rules._symbolic.scalar_symbols`.
"""

from __future__ import annotations

import itertools
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import sympy as sp
from jaxtyping import Array, Float

from .._errors import MetaplasticError
from ._rules import AbstractRule, l1_norm, register_rule_kind
from ._signals import LocalSignals
from ._symbolic import (
    STATE_SIGNALS,
    is_matrix,
    parse_equation,
    scalar_symbols,
    update_from_expression,
)

#: Exponents (a, b, c, d) of x, y, W, e for the 81 Taylor monomials, in coefficient order.
MONOMIALS: tuple[tuple[int, int, int, int], ...] = tuple(itertools.product(range(3), repeat=4))


def monomial_expr(code: tuple[int, int, int, int]) -> sp.Expr:
    S = scalar_symbols()
    a, b, c, d = code
    return S["x"] ** a * S["y"] ** b * S["W"] ** c * S["e"] ** d


def monomial_name(code) -> str:
    """``x*y``, ``W*y**2``, ``1``: the monomial as sympy prints it."""
    return sp.sstr(monomial_expr(code))


_BY_NAME = {monomial_name(c): i for i, c in enumerate(MONOMIALS)}


def monomial_index(spec: str) -> int:
    """Index of a monomial given as a 4-digit code ``abcd`` or as text like ``x*y``."""
    s = str(spec).strip()
    if len(s) == 4 and set(s) <= {"0", "1", "2"}:
        return MONOMIALS.index(tuple(int(ch) for ch in s))
    try:
        expr = parse_equation(s)
    except MetaplasticError:
        expr = None
    key = sp.sstr(expr) if expr is not None else s
    if key not in _BY_NAME:
        raise MetaplasticError(
            f"rule.monomials: {spec!r} is not a monomial x^a y^b W^c e^d with powers 0..2; "
            "write e.g. 'x*y', 'W*y**2' or the code '1100'"
        )
    return _BY_NAME[key]


def _shared_theta(theta: Array, layer: int) -> Array:
    return theta if theta.ndim == 1 else theta[layer]


class TaylorRule(AbstractRule):
    """Polynomial basis ``dW_ij = sum theta_abcd x_j^a y_i^b W_ij^c e_i^d``, a,b,c,d in 0..2.

    81 coefficients (``theta`` of shape ``(81,)`` shared, or ``(L, 81)`` per layer) in the
    order of :data:`MONOMIALS`; ``mask`` switches monomials off. Oja's single-neuron rule is
    ``theta_1100 = 1, theta_0210 = -1``. (Confavreux et al. 2020).
    Biases do not change.
    """

    kind: ClassVar[str] = "taylor"
    theta: Float[Array, "*layers 81"]
    mask: tuple[bool, ...] = eqx.field(static=True)

    def __init__(self, theta, mask=None):
        theta = jnp.asarray(np.asarray(theta, dtype=np.float32))
        if theta.ndim not in (1, 2) or theta.shape[-1] != len(MONOMIALS):
            raise MetaplasticError(
                f"Taylor rule coefficients have shape {tuple(theta.shape)}; need (81,) or (L, 81)"
            )
        self.theta = theta
        mask = [True] * len(MONOMIALS) if mask is None else [bool(m) for m in mask]
        if len(mask) != len(MONOMIALS):
            raise MetaplasticError(f"Taylor rule mask has {len(mask)} entries; need 81")
        self.mask = tuple(mask)

    @classmethod
    def from_monomials(cls, monomials=(), init=(), n_layers: int | None = None):
        """Live monomials by name/code (all 81 when empty) with initial coefficients."""
        idx = [monomial_index(m) for m in monomials] if monomials else list(range(81))
        if len(set(idx)) != len(idx):
            raise MetaplasticError("rule.monomials: a monomial is listed twice")
        if init and len(init) != len(idx):
            raise MetaplasticError(
                f"rule.init has {len(init)} entries for {len(idx)} monomials; give one each"
            )
        theta = np.zeros(len(MONOMIALS), np.float32)
        if init:
            theta[idx] = np.asarray(init, np.float32)
        mask = np.zeros(len(MONOMIALS), bool)
        mask[idx] = True
        if n_layers is not None:
            theta = np.tile(theta, (n_layers, 1))
        return cls(theta, mask.tolist())

    @property
    def shared(self) -> bool:
        return self.theta.ndim == 1

    def _th(self, layer: int) -> Array:
        return _shared_theta(self.theta, layer) * jnp.asarray(self.mask, self.theta.dtype)

    def __call__(self, layer: int, s: LocalSignals):
        th = self._th(layer).reshape(3, 3, 3, 3)  # [a, b, c, d]
        one_o = jnp.ones_like(s.y)
        yp = jnp.stack([one_o, s.y, s.y * s.y], axis=1)  # (n_out, b)
        ep = jnp.stack([one_o, s.e, s.e * s.e], axis=1)  # (n_out, d)
        xp = jnp.stack([jnp.ones_like(s.x), s.x, s.x * s.x], axis=1)  # (n_in, a)
        q = jnp.einsum("ib,id,abcd->iac", yp, ep, th)  # (n_out, a, c)
        m = jnp.einsum("iac,ja->cij", q, xp)  # (c, n_out, n_in)
        return m[0] + s.W * m[1] + s.W * s.W * m[2]

    def bias(self, layer: int, s: LocalSignals):
        return jnp.zeros_like(s.e)

    def l1(self):
        return l1_norm(self.theta * jnp.asarray(self.mask, self.theta.dtype))

    def coefficients(self) -> dict[str, float]:
        th = np.asarray(self.theta)
        live = [i for i, m in enumerate(self.mask) if m]
        if th.ndim == 1:
            return {monomial_name(MONOMIALS[i]): float(th[i]) for i in live}
        return {
            f"{monomial_name(MONOMIALS[i])}@{layer}": float(th[layer, i])
            for layer in range(th.shape[0])
            for i in live
        }

    def to_sympy(self, layer: int | None = None, threshold: float = 0.0) -> sp.Basic:
        if not self.shared and layer is None:
            raise MetaplasticError("this rule has per-layer coefficients; pass layer=...")
        th = np.asarray(self._th(0 if layer is None else layer))
        out = sp.S.Zero
        for i, code in enumerate(MONOMIALS):
            c = float(th[i])
            if self.mask[i] and c != 0.0 and abs(c) > threshold:
                out = out + sp.Float(c) * monomial_expr(code)
        return out

    def to_json_data(self, threshold: float) -> dict:
        return {
            "kind": self.kind,
            "monomials": [monomial_name(c) for c in MONOMIALS],
            "mask": list(self.mask),
            "shared": self.shared,
            "theta": np.asarray(self.theta).tolist(),
        }

    @classmethod
    def from_json_data(cls, data: dict) -> TaylorRule:
        return cls(np.asarray(data["theta"], np.float32), data["mask"])


#: Per-synapse inputs of an MLP rule, in order.
MLP_INPUTS = ("x", "y", "W", "e")


class MLPRule(AbstractRule):
    """A small MLP per synapse: ``dW_ij = theta_pg (-e_i x_j) + scale * f([x_j, y_i, W_ij, e_i])``.

    ``f`` has ``tanh`` hidden layers and a linear output; its last layer starts at zero, so
    the initial rule is the pseudo-gradient step ``theta_pg (-e x^T)`` alone (``theta_pg =
    0`` gives a pure MLP rule that starts as "no plasticity"). A tanh MLP cannot form the
    product ``e x`` from a zero start easily, so the residual form lets it learn a
    correction to the feedback-alignment update. ``scale`` and ``theta_pg`` are learnable.
    Usable with both outer loops (all parameters are ordinary inexact arrays). Biases do
    not change.
    """

    kind: ClassVar[str] = "mlp"
    weights: tuple[Array, ...]
    biases: tuple[Array, ...]
    scale: Float[Array, ""]
    theta_pg: Float[Array, ""]

    def __init__(self, weights, biases, scale, theta_pg=0.0):
        self.weights = tuple(jnp.asarray(w, jnp.float32) for w in weights)
        self.biases = tuple(jnp.asarray(b, jnp.float32) for b in biases)
        self.scale = jnp.asarray(scale, jnp.float32)
        self.theta_pg = jnp.asarray(theta_pg, jnp.float32)

    @classmethod
    def init(
        cls, hidden=(16,), scale: float = 0.01, seed: int = 0, theta_pg: float = 0.0
    ) -> MLPRule:
        sizes = (len(MLP_INPUTS), *hidden, 1)
        keys = jax.random.split(jax.random.key(seed), len(sizes) - 1)
        ws, bs = [], []
        for i, k in enumerate(keys):
            n_in, n_out = sizes[i], sizes[i + 1]
            last = i == len(sizes) - 2
            w = jnp.zeros((n_in, n_out)) if last else jax.random.normal(k, (n_in, n_out))
            ws.append(w / np.sqrt(n_in))
            bs.append(jnp.zeros(n_out))
        return cls(ws, bs, scale, theta_pg)

    @property
    def hidden(self) -> tuple[int, ...]:
        return tuple(int(w.shape[1]) for w in self.weights[:-1])

    def features(self, s: LocalSignals) -> Array:
        n_out, n_in = s.W.shape
        parts = [
            jnp.broadcast_to(s.x[None, :], (n_out, n_in)),
            jnp.broadcast_to(s.y[:, None], (n_out, n_in)),
            s.W,
            jnp.broadcast_to(s.e[:, None], (n_out, n_in)),
        ]
        return jnp.stack(parts, axis=-1)

    def apply_features(self, f: Array) -> Array:
        """The rule's output for per-synapse feature rows ``f[..., 4]``."""
        h = f
        for w, b in zip(self.weights[:-1], self.biases[:-1], strict=True):
            h = jnp.tanh(h @ w + b)
        return self.scale * (h @ self.weights[-1] + self.biases[-1])[..., 0]

    def __call__(self, layer: int, s: LocalSignals):
        return self.apply_features(self.features(s)) - self.theta_pg * jnp.outer(s.e, s.x)

    def bias(self, layer: int, s: LocalSignals):
        return jnp.zeros_like(s.e)

    def l1(self):
        return l1_norm(self.weights[-1]) * jnp.abs(self.scale)

    def coefficients(self) -> dict[str, float]:
        norms = {
            f"|w{i}|": float(np.linalg.norm(np.asarray(w))) for i, w in enumerate(self.weights)
        }
        return {"pseudo_gradient": float(self.theta_pg), "scale": float(self.scale), **norms}

    def to_sympy(self, layer: int | None = None, threshold: float = 0.0) -> sp.Basic:
        """The exact network as an elementwise expression (large; distil it to read it)."""
        S = scalar_symbols()
        h = [S[n] for n in MLP_INPUTS]
        for w, b in zip(self.weights[:-1], self.biases[:-1], strict=True):
            w, b = np.asarray(w), np.asarray(b)
            h = [
                sp.tanh(sum(sp.Float(float(w[i, k])) * h[i] for i in range(len(h))) + float(b[k]))
                for k in range(w.shape[1])
            ]
        w, b = np.asarray(self.weights[-1]), np.asarray(self.biases[-1])
        out = sum(sp.Float(float(w[i, 0])) * h[i] for i in range(len(h))) + float(b[0])
        pg = -sp.Float(float(self.theta_pg)) * S["e"] * S["x"]
        return sp.Float(float(self.scale)) * out + pg

    def to_json_data(self, threshold: float) -> dict:
        return {
            "kind": self.kind,
            "inputs": list(MLP_INPUTS),
            "weights": [np.asarray(w).tolist() for w in self.weights],
            "biases": [np.asarray(b).tolist() for b in self.biases],
            "scale": float(self.scale),
            "theta_pg": float(self.theta_pg),
        }

    @classmethod
    def from_json_data(cls, data: dict) -> MLPRule:
        ws = [np.asarray(w, np.float32) for w in data["weights"]]
        bs = [np.asarray(b, np.float32) for b in data["biases"]]
        if not ws or ws[0].shape[0] != len(MLP_INPUTS) or ws[-1].shape[1] != 1:
            raise ValueError("MLP weights do not map 4 inputs to 1 output")
        for w, b in zip(ws, bs, strict=True):
            if w.ndim != 2 or b.shape != (w.shape[1],):
                raise ValueError("MLP weight and bias shapes do not match")
        for a, b_ in itertools.pairwise(ws):
            if a.shape[1] != b_.shape[0]:
                raise ValueError("MLP layer widths do not chain")
        return cls(ws, bs, float(data["scale"]), float(data.get("theta_pg", 0.0)))


def _parametrise(expr: sp.Basic, start: int) -> tuple[sp.Basic, list[float]]:
    """Replace every float in ``expr`` by a symbol ``c<k>``; return the values in order."""
    floats = sorted(expr.atoms(sp.Float), key=lambda f: sp.default_sort_key(f))
    values, subs = [], {}
    for k, f in enumerate(floats):
        subs[f] = sp.Symbol(f"c{start + k}", real=True)
        values.append(float(f))
    return expr.xreplace(subs), values


class EquationRule(AbstractRule):
    """A rule given as an equation (matrix or elementwise form, see :mod:`._symbolic`).

    Each floating-point number in the equation becomes a learnable coefficient ``c<k>``
    (integers such as exponents stay fixed), so a parsed equation can be evaluated as it is
    or meta-trained further. ``exprs`` holds one equation for all layers or one per layer.
    Biases do not change.
    """

    kind: ClassVar[str] = "equation"
    exprs: tuple[sp.Basic, ...] = eqx.field(static=True)
    theta: Float[Array, " K"]
    rate: float = eqx.field(static=True, default=0.1)

    @classmethod
    def from_text(cls, texts, rate: float = 0.1) -> EquationRule:
        if isinstance(texts, str):
            texts = [texts]
        exprs, values = [], []
        for t in texts:
            e, v = _parametrise(parse_equation(t), len(values))
            exprs.append(e)
            values.extend(v)
        return cls(tuple(exprs), jnp.asarray(np.asarray(values, np.float32)), rate)

    def _expr(self, layer: int) -> sp.Basic:
        if len(self.exprs) == 1:
            return self.exprs[0]
        if layer >= len(self.exprs):
            raise MetaplasticError(
                f"the equation rule has {len(self.exprs)} per-layer equations but the network "
                f"has more layers; give one equation or one per layer"
            )
        return self.exprs[layer]

    def _consts(self) -> dict[str, Array]:
        return {f"c{k}": self.theta[k] for k in range(self.theta.shape[0])}

    def __call__(self, layer: int, s: LocalSignals):
        return update_from_expression(self._expr(layer), s, self._consts())

    def bias(self, layer: int, s: LocalSignals):
        return jnp.zeros_like(s.e)

    def uses_state(self) -> bool:
        names = {sym.name for e in self.exprs for sym in e.free_symbols if hasattr(sym, "name")}
        return bool(names & set(STATE_SIGNALS))

    def state_rate(self) -> float:
        return self.rate

    def l1(self):
        return l1_norm(self.theta)

    def coefficients(self) -> dict[str, float]:
        return {f"c{k}": float(v) for k, v in enumerate(np.asarray(self.theta))}

    def to_sympy(self, layer: int | None = None, threshold: float = 0.0) -> sp.Basic:
        if len(self.exprs) > 1 and layer is None:
            raise MetaplasticError("this rule has per-layer equations; pass layer=...")
        expr = self._expr(0 if layer is None else layer)
        th = np.asarray(self.theta)
        subs = {}
        for k in range(th.shape[0]):
            v = float(th[k])
            subs[sp.Symbol(f"c{k}", real=True)] = sp.S.Zero if abs(v) <= threshold else sp.Float(v)
        out = expr.xreplace(subs)
        return out.doit() if is_matrix(out) else out

    @property
    def shared(self) -> bool:
        return len(self.exprs) == 1

    def to_json_data(self, threshold: float) -> dict:
        texts = [sp.sstr(self.to_sympy(layer=i)) for i in range(len(self.exprs))]
        return {"kind": self.kind, "equation_texts": texts, "state_rate": self.rate}

    @classmethod
    def from_json_data(cls, data: dict) -> EquationRule:
        eqs = data["equation_texts"]
        if not isinstance(eqs, list) or not all(isinstance(e, str) for e in eqs):
            raise ValueError("equation_texts must be a list of strings")
        return cls.from_text(eqs, float(data.get("state_rate", 0.1)))


for _kind in (TaylorRule, MLPRule, EquationRule):
    register_rule_kind(_kind)
