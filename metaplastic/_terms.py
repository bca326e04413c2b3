"""Built-in plasticity terms: one layer's weight change from its local signals.

Every term is an Equinox module with no learnable leaves. ``term(signals)`` returns the
weight change for one layer and one sample as a ``(n_out, n_in)`` array;
``term.to_sympy()`` returns the same update as a sympy matrix expression in the symbols of
:func:`sympy_symbols` (column vectors ``x``, ``y``, ``e``, ``e_pre`` and the matrix ``W``).
A rule multiplies each term by a learnable coefficient and adds them up.
"""

from __future__ import annotations

import abc
import functools
from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
import sympy as sp
from jaxtyping import Array, Float

from ._signals import LocalSignals


@functools.cache
def sympy_symbols() -> dict[str, sp.Basic]:
    """The sympy symbols that rule expressions are written in.

    ``x`` (pre, ``n_in x 1``), ``y`` (post, ``n_out x 1``), ``e`` (post error,
    ``n_out x 1``), ``e_pre`` (pre error, ``n_in x 1``), ``W`` (``n_out x n_in``), the
    all-ones vectors ``one_in`` (``n_in x 1``) and ``one_out`` (``n_out x 1``), and the
    dimension symbols ``n_in``, ``n_out``.
    """
    n_in, n_out = sp.symbols("n_in n_out", integer=True, positive=True)
    return {
        "x": sp.MatrixSymbol("x", n_in, 1),
        "y": sp.MatrixSymbol("y", n_out, 1),
        "e": sp.MatrixSymbol("e", n_out, 1),
        "e_pre": sp.MatrixSymbol("e_pre", n_in, 1),
        "W": sp.MatrixSymbol("W", n_out, n_in),
        "one_in": sp.MatrixSymbol("one_in", n_in, 1),
        "one_out": sp.MatrixSymbol("one_out", n_out, 1),
        "n_in": n_in,
        "n_out": n_out,
    }


class AbstractTerm(eqx.Module):
    """One candidate term of a plasticity rule (no learnable parameters of its own)."""

    name: ClassVar[str]
    description: ClassVar[str]

    @abc.abstractmethod
    def __call__(self, s: LocalSignals) -> Float[Array, "n_out n_in"]:
        """Weight change of one layer for one sample."""

    def bias(self, s: LocalSignals) -> Float[Array, " n_out"]:
        """Bias change of one layer for one sample (zero unless the term defines one)."""
        return jnp.zeros_like(s.e)

    @abc.abstractmethod
    def to_sympy(self) -> sp.Basic:
        """The weight change as a sympy matrix expression."""


class PseudoGradient(AbstractTerm):
    """Pseudo-gradient ``dW = -e x^T`` (the gradient step when ``e`` is exact).

    With feedback alignment ``e`` is carried by fixed random matrices, so this is the
    feedback-alignment update. Shervani-Tabar & Rosenbaum 2023, Eq. 3 (first term).
    Bias change: ``-e``.
    """

    name: ClassVar[str] = "pseudo_gradient"
    description: ClassVar[str] = "-e x^T: gradient-like step with the fed-back error"

    def __call__(self, s: LocalSignals) -> Float[Array, "n_out n_in"]:
        return -jnp.outer(s.e, s.x)

    def bias(self, s: LocalSignals) -> Float[Array, " n_out"]:
        return -s.e

    def to_sympy(self) -> sp.Basic:
        S = sympy_symbols()
        return -S["e"] * S["x"].T


class Hebbian(AbstractTerm):
    """Plain Hebbian term ``dW = y x^T`` (Hebb 1949)."""

    name: ClassVar[str] = "hebbian"
    description: ClassVar[str] = "y x^T: plain Hebbian co-activity"

    def __call__(self, s: LocalSignals) -> Float[Array, "n_out n_in"]:
        return jnp.outer(s.y, s.x)

    def to_sympy(self) -> sp.Basic:
        S = sympy_symbols()
        return S["y"] * S["x"].T


class ErrorHebbian(AbstractTerm):
    """Error-Hebbian term ``dW = -e e_pre^T``: Hebbian on the error signals.

    Shervani-Tabar & Rosenbaum 2023 (term pool of the released code).
    """

    name: ClassVar[str] = "error_hebbian"
    description: ClassVar[str] = "-e e_pre^T: Hebbian product of post and pre errors"

    def __call__(self, s: LocalSignals) -> Float[Array, "n_out n_in"]:
        return -jnp.outer(s.e, s.e_pre)

    def to_sympy(self) -> sp.Basic:
        S = sympy_symbols()
        return -S["e"] * S["e_pre"].T


class Oja(AbstractTerm):
    """Oja's subspace rule ``dW = y x^T - (y y^T) W``.

    Computed as ``y (x - W^T y)^T``, which costs O(n_out n_in) instead of the
    O(n_out^2 n_in) of forming ``y y^T W``. Oja 1982 / 1989; Shervani-Tabar & Rosenbaum 2023.
    """

    name: ClassVar[str] = "oja"
    description: ClassVar[str] = "y x^T - y y^T W: Oja's subspace rule"

    def __call__(self, s: LocalSignals) -> Float[Array, "n_out n_in"]:
        return jnp.outer(s.y, s.x - s.W.T @ s.y)

    def to_sympy(self) -> sp.Basic:
        S = sympy_symbols()
        return S["y"] * S["x"].T - S["y"] * S["y"].T * S["W"]


class WeightDecay(AbstractTerm):
    """Weight decay ``dW = -W`` (biases are not decayed)."""

    name: ClassVar[str] = "weight_decay"
    description: ClassVar[str] = "-W: decay towards zero"

    def __call__(self, s: LocalSignals) -> Float[Array, "n_out n_in"]:
        return -s.W

    def to_sympy(self) -> sp.Basic:
        return -sympy_symbols()["W"]


class Constant(AbstractTerm):
    """Constant drift ``dW = 1 1^T`` (every weight grows by the same amount).

    Shervani-Tabar & Rosenbaum 2023, development term pool.
    """

    name: ClassVar[str] = "constant"
    description: ClassVar[str] = "1 1^T: the same change for every synapse"

    def __call__(self, s: LocalSignals) -> Float[Array, "n_out n_in"]:
        return jnp.ones_like(s.W)

    def to_sympy(self) -> sp.Basic:
        S = sympy_symbols()
        return S["one_out"] * S["one_in"].T


class PostActivityPreError(AbstractTerm):
    """``dW = y e_pre^T``: post-synaptic activity times pre-synaptic error.

    Shervani-Tabar & Rosenbaum 2023, development term pool.
    """

    name: ClassVar[str] = "post_activity_pre_error"
    description: ClassVar[str] = "y e_pre^T: post activity times pre error"

    def __call__(self, s: LocalSignals) -> Float[Array, "n_out n_in"]:
        return jnp.outer(s.y, s.e_pre)

    def to_sympy(self) -> sp.Basic:
        S = sympy_symbols()
        return S["y"] * S["e_pre"].T


class PostError(AbstractTerm):
    """``dW = e 1^T``: every synapse of a unit moves with that unit's error.

    Shervani-Tabar & Rosenbaum 2023, development term pool.
    """

    name: ClassVar[str] = "post_error"
    description: ClassVar[str] = "e 1^T: post error, same for all inputs of a unit"

    def __call__(self, s: LocalSignals) -> Float[Array, "n_out n_in"]:
        return jnp.broadcast_to(s.e[:, None], s.W.shape)

    def to_sympy(self) -> sp.Basic:
        S = sympy_symbols()
        return S["e"] * S["one_in"].T


class PreError(AbstractTerm):
    """``dW = 1 e_pre^T``: every synapse from a unit moves with that unit's error.

    Shervani-Tabar & Rosenbaum 2023, development term pool.
    """

    name: ClassVar[str] = "pre_error"
    description: ClassVar[str] = "1 e_pre^T: pre error, same for all outputs of a unit"

    def __call__(self, s: LocalSignals) -> Float[Array, "n_out n_in"]:
        return jnp.broadcast_to(s.e_pre[None, :], s.W.shape)

    def to_sympy(self) -> sp.Basic:
        S = sympy_symbols()
        return S["one_out"] * S["e_pre"].T


class PostErrorDecay(AbstractTerm):
    """``dW = (e e^T) W``, computed as ``e (W^T e)^T`` (O(n_out n_in)).

    Shervani-Tabar & Rosenbaum 2023, development term pool.
    """

    name: ClassVar[str] = "post_error_decay"
    description: ClassVar[str] = "(e e^T) W: error-weighted row mixing"

    def __call__(self, s: LocalSignals) -> Float[Array, "n_out n_in"]:
        return jnp.outer(s.e, s.W.T @ s.e)

    def to_sympy(self) -> sp.Basic:
        S = sympy_symbols()
        return S["e"] * S["e"].T * S["W"]


class PreErrorDecay(AbstractTerm):
    """``dW = W (e_pre e_pre^T)``, computed as ``(W e_pre) e_pre^T`` (O(n_out n_in)).

    Shervani-Tabar & Rosenbaum 2023, development term pool.
    """

    name: ClassVar[str] = "pre_error_decay"
    description: ClassVar[str] = "W (e_pre e_pre^T): error-weighted column mixing"

    def __call__(self, s: LocalSignals) -> Float[Array, "n_out n_in"]:
        return jnp.outer(s.W @ s.e_pre, s.e_pre)

    def to_sympy(self) -> sp.Basic:
        S = sympy_symbols()
        return S["W"] * S["e_pre"] * S["e_pre"].T


class ErrorOja(AbstractTerm):
    """Error-Oja ``dW = e e_pre^T - (e e^T) W``, computed as ``e (e_pre - W^T e)^T``.

    Oja's subspace rule with errors in place of activities. Shervani-Tabar & Rosenbaum
    2023, development term pool.
    """

    name: ClassVar[str] = "error_oja"
    description: ClassVar[str] = "e e_pre^T - e e^T W: Oja's rule on the errors"

    def __call__(self, s: LocalSignals) -> Float[Array, "n_out n_in"]:
        return jnp.outer(s.e, s.e_pre - s.W.T @ s.e)

    def to_sympy(self) -> sp.Basic:
        S = sympy_symbols()
        return S["e"] * S["e_pre"].T - S["e"] * S["e"].T * S["W"]


#: Name -> term class. Add a term by subclassing :class:`AbstractTerm` and registering it here.
TERMS: dict[str, type[AbstractTerm]] = {
    cls.name: cls
    for cls in (
        PseudoGradient,
        Hebbian,
        ErrorHebbian,
        Oja,
        WeightDecay,
        Constant,
        PostActivityPreError,
        PostError,
        PreError,
        PostErrorDecay,
        PreErrorDecay,
        ErrorOja,
    )
}
