"""Plasticity rules: parameterised families of local weight updates."""

from __future__ import annotations

import abc
from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import sympy as sp
from jaxtyping import Array, Float

from .._errors import MetaplasticError, unknown_name
from ._signals import LocalSignals
from ._terms import TERMS, AbstractTerm, sympy_symbols


class AbstractRule(eqx.Module):
    """A plasticity rule: maps one layer's local signals to its weight (and bias) change.

    Subclasses define the update, the L1 penalty, named coefficients, a sympy form and a
    JSON form (:meth:`to_json_data` / ``from_json_data``). A rule that reads per-neuron
    state (``ybar``, ``theta_M``, ``nrm0``) returns ``True`` from :meth:`uses_state`; the
    inner loop then keeps that state with running-average rate :meth:`state_rate`.
    """

    kind: ClassVar[str] = "abstract"

    def uses_state(self) -> bool:
        """Whether the update reads ``ybar``, ``theta_M`` or ``nrm0``."""
        return False

    def state_rate(self) -> float:
        """Rate of the running averages ``ybar`` and ``theta_M`` (per online step)."""
        return 0.1

    def feedback_delta(self, layer: int, s: LocalSignals, B: Array) -> Array:
        """Change of the feedback matrix ``B`` of ``layer`` (only for plastic feedback)."""
        raise MetaplasticError(
            f"the {self.kind} rule has no feedback plasticity; plastic feedback "
            "(kolen_pollack) needs the rule wrapped in PlasticFeedback"
        )

    def to_json_data(self, threshold: float) -> dict:
        """Everything needed to rebuild the rule (``kind`` plus the kind's fields)."""
        raise NotImplementedError

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

    kind: ClassVar[str] = "term_pool"
    terms: tuple[AbstractTerm, ...] = eqx.field(static=True)
    theta: Float[Array, "*layers K"]
    mask: tuple[bool, ...] = eqx.field(static=True)
    rate: float = eqx.field(static=True)

    def __init__(self, terms, theta, mask=None, rate: float = 0.1):
        self.rate = float(rate)
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
    def from_names(
        cls,
        names,
        init=None,
        mask=None,
        n_layers: int | None = None,
        *,
        rate: float = 0.1,
        target: float = 0.1,
    ):
        """Build a pool from term names; ``n_layers`` gives per-layer coefficients.

        A name is a built-in term (:data:`TERMS`) or a user term ``module:function`` (see
        :func:`metaplastic.user_term`). ``rate`` is the running-average rate of the
        per-neuron state and ``target`` the activity target of ``scaling_fixed``.
        """
        terms = [make_term(n, target=target) for n in names]
        init = np.zeros(len(terms)) if init is None else np.asarray(init, dtype=float)
        if n_layers is not None and init.ndim == 1:
            init = np.tile(init, (n_layers, 1))
        return cls(terms, jnp.asarray(init), mask, rate=rate)

    def uses_state(self) -> bool:
        return any(t.stateful for t, m in zip(self.terms, self.mask, strict=True) if m)

    def state_rate(self) -> float:
        return self.rate

    def to_json_data(self, threshold: float) -> dict:
        target = [getattr(t, "target", None) for t in self.terms]
        return {
            "kind": self.kind,
            "terms": list(self.names),
            "mask": list(self.mask),
            "shared": self.shared,
            "theta": np.asarray(self.theta).tolist(),
            "state_rate": self.rate,
            "scaling_target": next((v for v in target if v is not None), 0.1),
        }

    @classmethod
    def from_json_data(cls, data: dict) -> TermPoolRule:
        theta = np.asarray(data["theta"], dtype=np.float32)
        terms = [str(t) for t in data["terms"]]
        mask = [bool(m) for m in data["mask"]]
        rule = cls.from_names(
            terms,
            rate=float(data.get("state_rate", 0.1)),
            target=float(data.get("scaling_target", 0.1)),
        )
        return cls(rule.terms, theta, mask, rate=rule.rate)

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
        return l1_norm(self.theta * jnp.asarray(self.mask, self.theta.dtype))

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


def l1_norm(theta: Array) -> Array:
    """``sum |theta|`` with subgradient 0 at 0 (``jnp.abs`` has slope 1 there, which would
    push coefficients that are exactly zero away from zero)."""
    return jnp.sum(jnp.where(theta == 0, 0.0, jnp.abs(theta)))


def make_term(name: str, *, target: float = 0.1) -> AbstractTerm:
    """A term instance from a built-in name or a ``module:function`` user-term reference."""
    if ":" in name:
        from ._user_terms import load_user_term

        return load_user_term(name)
    if name not in TERMS:
        raise unknown_name("term", name, TERMS, where="rule.terms")
    cls = TERMS[name]
    if "target" in getattr(cls, "__dataclass_fields__", {}):
        return cls(target=float(target))
    return cls()


class PlasticFeedback(AbstractRule):
    """A rule plus the plasticity of the feedback pathway (Kolen & Pollack 1994).

    The feedback matrices ``B`` (same shapes as ``W``; errors travel as ``B^T e``) change
    after every sample by ``dB = theta_fb[0] * (-e x^T) - theta_fb[1] * B``: the same
    pseudo-gradient step the forward weights get, plus decay. With equal steps and decay on
    both, ``W`` and ``B`` converge (Akrout et al. 2019). Both coefficients are meta-learned
    with the rule's own.
    """

    kind: ClassVar[str] = "plastic_feedback"
    rule: AbstractRule
    theta_fb: Float[Array, " 2"]

    def __call__(self, layer, s):
        return self.rule(layer, s)

    def bias(self, layer, s):
        return self.rule.bias(layer, s)

    def uses_state(self) -> bool:
        return self.rule.uses_state()

    def state_rate(self) -> float:
        return self.rule.state_rate()

    def feedback_delta(self, layer: int, s: LocalSignals, B: Array) -> Array:
        return -self.theta_fb[0] * jnp.outer(s.e, s.x) - self.theta_fb[1] * B

    def l1(self):
        return self.rule.l1()

    def coefficients(self) -> dict[str, float]:
        out = dict(self.rule.coefficients())
        fb = np.asarray(self.theta_fb)
        out["feedback:pseudo_gradient"] = float(fb[0])
        out["feedback:decay"] = float(fb[1])
        return out

    def to_sympy(self, layer=None, threshold=0.0):
        return self.rule.to_sympy(layer=layer, threshold=threshold)

    def feedback_sympy(self) -> sp.Basic:
        S = sympy_symbols()
        B = sp.MatrixSymbol("B", S["n_out"], S["n_in"])
        fb = np.asarray(self.theta_fb)
        return (-sp.Float(float(fb[0])) * S["e"] * S["x"].T - sp.Float(float(fb[1])) * B).doit()

    def to_json_data(self, threshold: float) -> dict:
        return {
            "kind": self.kind,
            "rule": self.rule.to_json_data(threshold),
            "theta_fb": np.asarray(self.theta_fb).tolist(),
        }

    @classmethod
    def from_json_data(cls, data: dict) -> PlasticFeedback:
        fb = np.asarray(data["theta_fb"], dtype=np.float32)
        if fb.shape != (2,):
            raise ValueError("theta_fb must have two entries")
        return cls(rule_from_data(data["rule"]), jnp.asarray(fb))


#: Rule kind name -> class (the ``kind`` of rule files and exported rule JSON). Every kind
#: registers itself with :func:`register_rule_kind` where it is defined; importing
#: :mod:`metaplastic.rules` registers the built-in ones.
RULE_KINDS: dict[str, type[AbstractRule]] = {}


def register_rule_kind(cls: type[AbstractRule]) -> type[AbstractRule]:
    """Add a rule class to :data:`RULE_KINDS` under its ``kind`` (usable as a decorator)."""
    if not isinstance(getattr(cls, "kind", None), str) or not cls.kind:
        raise TypeError(f"{cls.__name__} needs a class attribute kind (a non-empty string)")
    if RULE_KINDS.get(cls.kind, cls) is not cls:
        raise ValueError(f"rule kind {cls.kind!r} is already registered")
    RULE_KINDS[cls.kind] = cls
    return cls


def rule_from_data(data: dict) -> AbstractRule:
    """Rebuild a rule from :meth:`AbstractRule.to_json_data` output (raises on bad data)."""
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind not in RULE_KINDS:
        raise ValueError(f"unknown rule kind {kind!r}")
    return RULE_KINDS[kind].from_json_data(data)


register_rule_kind(TermPoolRule)
register_rule_kind(PlasticFeedback)
