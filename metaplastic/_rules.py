"""Plasticity rules: parameterised families of local weight updates."""

from __future__ import annotations

import abc

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import sympy as sp
from jaxtyping import Array, Float

from ._errors import MetaplasticError, unknown_name
from ._signals import LocalSignals
from ._terms import TERMS, AbstractTerm, sympy_symbols


class AbstractRule(eqx.Module):
    """A plasticity rule: maps one layer's local signals to its weight (and bias) change."""

    @abc.abstractmethod
    def __call__(self, layer: int, s: LocalSignals) -> Float[Array, "n_out n_in"]:
        """Weight change of layer ``layer`` (0-based) for one sample."""

    @abc.abstractmethod
    def bias(self, layer: int, s: LocalSignals) -> Float[Array, " n_out"]:
        """Bias change of layer ``layer`` for one sample."""

    @abc.abstractmethod
    def l1(self) -> Float[Array, ""]:
        """Sum of absolute values of the live coefficients (the sparsity penalty)."""

    @abc.abstractmethod
    def coefficients(self) -> dict[str, float]:
        """Live coefficients by name (``term`` or ``term@layer`` when per layer)."""

    @abc.abstractmethod
    def to_sympy(self, layer: int | None = None, threshold: float = 0.0) -> sp.Basic:
        """The update as a sympy expression with numeric coefficients."""


class TermPoolRule(AbstractRule):
    """Linear combination of named terms: ``dW = sum_k theta_k * term_k(x, y, e, e_pre, W)``.

    ``theta`` has shape ``(K,)`` when shared by all layers (default) or ``(L, K)`` per
    layer. ``mask`` switches terms off (their coefficient is multiplied by zero, so its
    meta-gradient is zero too). Shervani-Tabar & Rosenbaum 2023, Eq. 3.

    Args:
        terms: the term modules, in coefficient order.
        theta: the coefficients.
        mask: one bool per term; ``False`` removes the term.
    """

    terms: tuple[AbstractTerm, ...] = eqx.field(static=True)
    theta: Float[Array, "*layers K"]
    mask: tuple[bool, ...] = eqx.field(static=True)

    def __init__(self, terms, theta, mask=None):
        self.terms = tuple(terms)
        theta = jnp.asarray(theta)
        if not jnp.issubdtype(theta.dtype, jnp.floating):
            theta = jnp.asarray(np.asarray(theta, dtype=float))
        if theta.ndim not in (1, 2) or theta.shape[-1] != len(self.terms):
            raise MetaplasticError(
                f"rule coefficients have shape {tuple(theta.shape)} but the pool has "
                f"{len(self.terms)} terms; give one coefficient per term (or per layer and term)"
            )
        self.theta = theta
        self.mask = tuple(bool(m) for m in (mask if mask is not None else [True] * len(terms)))
        if len(self.mask) != len(self.terms):
            raise MetaplasticError(
                f"rule mask has {len(self.mask)} entries for {len(self.terms)} terms"
            )

    @classmethod
    def from_names(cls, names, init=None, mask=None, n_layers: int | None = None):
        """Build a pool from term names; ``n_layers`` gives per-layer coefficients."""
        terms = []
        for n in names:
            if n not in TERMS:
                raise unknown_name("term", n, TERMS, where="rule.terms")
            terms.append(TERMS[n]())
        init = np.zeros(len(terms)) if init is None else np.asarray(init, dtype=float)
        if n_layers is not None and init.ndim == 1:
            init = np.tile(init, (n_layers, 1))
        return cls(terms, jnp.asarray(init), mask)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.terms)

    @property
    def shared(self) -> bool:
        return self.theta.ndim == 1

    def _theta(self, layer: int) -> Float[Array, " K"]:
        th = self.theta if self.shared else self.theta[layer]
        return th * jnp.asarray(self.mask, th.dtype)

    def __call__(self, layer: int, s: LocalSignals) -> Float[Array, "n_out n_in"]:
        th = self._theta(layer)
        out = jnp.zeros_like(s.W)
        for k, term in enumerate(self.terms):
            if self.mask[k]:
                out = out + th[k] * term(s)
        return out

    def bias(self, layer: int, s: LocalSignals) -> Float[Array, " n_out"]:
        th = self._theta(layer)
        out = jnp.zeros_like(s.e)
        for k, term in enumerate(self.terms):
            if self.mask[k]:
                out = out + th[k] * term.bias(s)
        return out

    def l1(self) -> Float[Array, ""]:
        return jnp.sum(jnp.abs(self.theta * jnp.asarray(self.mask, self.theta.dtype)))

    def coefficients(self) -> dict[str, float]:
        th = np.asarray(self.theta)
        out = {}
        if th.ndim == 1:
            for k, n in enumerate(self.names):
                if self.mask[k]:
                    out[n] = float(th[k])
        else:
            for layer in range(th.shape[0]):
                for k, n in enumerate(self.names):
                    if self.mask[k]:
                        out[f"{n}@{layer}"] = float(th[layer, k])
        return out

    def to_sympy(self, layer: int | None = None, threshold: float = 0.0) -> sp.Basic:
        """``sum_k theta_k term_k`` as one sympy matrix expression.

        Terms with ``|theta_k| <= threshold`` are left out (pruned). Per-layer rules need
        ``layer``.
        """
        if not self.shared and layer is None:
            raise MetaplasticError("this rule has per-layer coefficients; pass layer=...")
        th = np.asarray(self._theta(0 if layer is None else layer))
        parts = []
        for k, term in enumerate(self.terms):
            c = float(th[k])
            if self.mask[k] and abs(c) > threshold and c != 0.0:
                parts.append(sp.Float(c) * term.to_sympy())
        if not parts:
            S = sympy_symbols()
            return sp.ZeroMatrix(S["n_out"], S["n_in"])
        return sp.MatAdd(*parts).doit()
