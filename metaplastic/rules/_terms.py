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
    all-ones vectors ``one_in`` (``n_in x 1``) and ``one_out`` (``n_out x 1``), the
    per-neuron state ``ybar``, ``theta_M`` and ``nrm0`` (``n_out x 1``, see
    :class:`~metaplastic.rules._signals.LocalSignals`), and the dimension symbols ``n_in``,
    ``n_out``.
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
        "ybar": sp.MatrixSymbol("ybar", n_out, 1),
        "theta_M": sp.MatrixSymbol("theta_M", n_out, 1),
        "nrm0": sp.MatrixSymbol("nrm0", n_out, 1),
        "n_in": n_in,
        "n_out": n_out,
    }


class AbstractTerm(eqx.Module):
    """One candidate term of a plasticity rule (no learnable parameters of its own)."""

    name: ClassVar[str]
    description: ClassVar[str]
    #: Reads the per-neuron state (``ybar``, ``theta_M``, ``nrm0``) of the signals.
    stateful: ClassVar[bool] = False

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
        return jnp.outer(s.y, s.x - s.y @ s.W)

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
        return jnp.outer(s.e, s.e @ s.W)

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
        return jnp.outer(s.e, s.e_pre - s.e @ s.W)

    def to_sympy(self) -> sp.Basic:
        S = sympy_symbols()
        return S["e"] * S["e_pre"].T - S["e"] * S["e"].T * S["W"]


def _row_scale(v: Array, W: Array) -> Array:
    return v[:, None] * W


def _sympy_row_scale(v: sp.Basic, W: sp.Basic) -> sp.Basic:
    """``diag(v) W`` written as ``hadamard(v 1_in^T, W)`` (sympy's DiagMatrix is slow)."""
    return sp.HadamardProduct(v * sympy_symbols()["one_in"].T, W)


class ScalingFixed(AbstractTerm):
    """Synaptic scaling to a fixed target: ``dW_i: = (rho - ybar_i) W_i:``.

    Each neuron scales all its incoming weights multiplicatively so that its running-average
    activity ``ybar`` moves toward ``rho`` (``target``). (After Shen, Wang &
    Navlakha 2021, whose exact update was not available to us).
    """

    name: ClassVar[str] = "scaling_fixed"
    description: ClassVar[str] = "diag(rho - ybar) W: multiplicative scaling to a target"
    stateful: ClassVar[bool] = True
    target: float = eqx.field(static=True, default=0.1)

    def __call__(self, s: LocalSignals) -> Float[Array, "n_out n_in"]:
        return _row_scale(self.target - s.ybar, s.W)

    def to_sympy(self) -> sp.Basic:
        S = sympy_symbols()
        return _sympy_row_scale(sp.Float(self.target) * S["one_out"] - S["ybar"], S["W"])


class ScalingLayerMean(AbstractTerm):
    """Load-balancing scaling: ``dW_i: = (mean_k ybar_k - ybar_i) W_i:``.

    The fixed target of :class:`ScalingFixed` is replaced by the layer's mean running
    activity, which pushes the layer toward using all its neurons equally.
    """

    name: ClassVar[str] = "scaling_layer_mean"
    description: ClassVar[str] = "diag(mean(ybar) - ybar) W: scaling toward the layer mean"
    stateful: ClassVar[bool] = True

    def __call__(self, s: LocalSignals) -> Float[Array, "n_out n_in"]:
        return _row_scale(jnp.mean(s.ybar) - s.ybar, s.W)

    def to_sympy(self) -> sp.Basic:
        S = sympy_symbols()
        mean = S["one_out"] * (S["one_out"].T * S["ybar"]) / S["n_out"]
        return _sympy_row_scale(mean - S["ybar"], S["W"])


class ScalingNorm(AbstractTerm):
    """Norm-preserving row scaling: ``dW_i: = (nrm0_i / ||W_i:|| - 1) W_i:``.

    With coefficient 1 this rescales every row back to the norm it had at the start of the
    episode (a weight-normalisation analogue); smaller coefficients move part of the way.
    """

    name: ClassVar[str] = "scaling_norm"
    description: ClassVar[str] = "diag(nrm0 / ||W_i:|| - 1) W: pull row norms back to nrm0"
    stateful: ClassVar[bool] = True

    def __call__(self, s: LocalSignals) -> Float[Array, "n_out n_in"]:
        nrm = jnp.sqrt(jnp.sum(s.W * s.W, axis=1))
        return _row_scale(s.nrm0 / nrm - 1.0, s.W)

    def to_sympy(self) -> sp.Basic:
        S = sympy_symbols()
        inv_nrm = sp.HadamardPower(sp.HadamardProduct(S["W"], S["W"]) * S["one_in"], -sp.S.Half)
        return _sympy_row_scale(sp.HadamardProduct(S["nrm0"], inv_nrm) - S["one_out"], S["W"])


class BCM(AbstractTerm):
    """BCM rule with a sliding threshold: ``dW = (y * (y - theta_M)) x^T``.

    ``theta_M`` is the running average of ``y**2`` (Bienenstock, Cooper & Munro 1982;
    Intrator & Cooper 1992): activity above the threshold potentiates, below depresses,
    and the threshold rises with activity.
    """

    name: ClassVar[str] = "bcm"
    description: ClassVar[str] = "(y * (y - theta_M)) x^T: BCM with a sliding threshold"
    stateful: ClassVar[bool] = True

    def __call__(self, s: LocalSignals) -> Float[Array, "n_out n_in"]:
        return jnp.outer(s.y * (s.y - s.theta_M), s.x)

    def to_sympy(self) -> sp.Basic:
        S = sympy_symbols()
        return sp.HadamardProduct(S["y"], S["y"] - S["theta_M"]) * S["x"].T


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
        ScalingFixed,
        ScalingLayerMean,
        ScalingNorm,
        BCM,
    )
}
