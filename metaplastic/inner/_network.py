"""Plastic feed-forward networks: weights, initialisation, forward pass.

A network is an :class:`AbstractNetwork` (an extension point: subclass, set ``name``,
implement :meth:`~AbstractNetwork.init`, :meth:`~AbstractNetwork.pre`,
:meth:`~AbstractNetwork.act` and :meth:`~AbstractNetwork.act_deriv_from_output`, then
:func:`register_network`). :data:`NETWORKS` maps the names ``network.kind`` accepts to the
classes: ``mlp`` (:class:`Network`) and ``ei`` (:class:`EINetwork`, Dale's law).
"""

from __future__ import annotations

import abc
import functools
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from .._errors import MetaplasticError, unknown_name
from .._registry import refuse_unread_keys, register

ACTIVATIONS = ("softplus", "relu", "tanh", "linear")


class NetState(eqx.Module):
    """The plastic variables of one network: weights ``W[l]`` ``(n_out, n_in)`` (what the
    rule changes), biases, and ``extra``: variables the network updates itself (the
    inhibitory weights of :class:`EINetwork`; ``None`` for an MLP)."""

    W: tuple[Array, ...]
    b: tuple[Array, ...] | None
    extra: Any = None


class AbstractNetwork(eqx.Module):
    """A plastic feed-forward network (an extension point).

    Layers are 1-based in the equations: ``h_0 = x``, ``z_l = pre_l(h_{l-1})``,
    ``h_l = g(z_l)`` for hidden layers and logits ``z_L``. The rule changes ``state.W[l-1]``
    after every sample; credit pathways read the network through :meth:`forward_matrices`
    (``dz_l / dh_{l-1}``, what backprop transposes) and :meth:`hidden_error`; after the
    rule's update the network applies its own constraints and plasticity
    (:meth:`after_update`). Settings are static fields, so a network is hashable and is
    compiled into the episode.
    """

    #: the name ``network.kind`` selects it by
    name: ClassVar[str] = ""
    #: the ``[network]`` keys this kind reads besides the shared ones (``hidden``, ``n_out``)
    options: ClassVar[tuple[str, ...]] = ()
    sizes: eqx.AbstractVar[tuple[int, ...]]

    @property
    def n_layers(self) -> int:
        return len(self.sizes) - 1

    @property
    def shapes(self) -> tuple[tuple[int, int], ...]:
        """Shapes of the plastic matrices ``W[l]``: ``(sizes[l + 1], sizes[l])``."""
        return tuple((self.sizes[i + 1], self.sizes[i]) for i in range(self.n_layers))

    @abc.abstractmethod
    def init(self, key: PRNGKeyArray) -> NetState:
        """Initial weights of one episode."""

    @abc.abstractmethod
    def pre(self, state: NetState, layer: int, h: Array) -> Array:
        """Drive ``z_{layer+1}`` of layer ``layer`` (0-based) from its input ``h``."""

    @abc.abstractmethod
    def act(self, z: Array) -> Array:
        """Hidden activation ``g(z)``."""

    @abc.abstractmethod
    def act_deriv_from_output(self, h: Array) -> Array:
        """``g'(z)`` written in terms of ``h = g(z)``."""

    def forward(self, state: NetState, x: Float[Array, " n0"]) -> list[Array]:
        """Activities ``[x, h_1, ..., h_{L-1}, z_L]`` (the last entry is the logits)."""
        hs = [x]
        h = x
        for layer in range(self.n_layers):
            z = self.pre(state, layer, h)
            h = self.act(z) if layer < self.n_layers - 1 else z
            hs.append(h)
        return hs

    def logits(self, state: NetState, x: Float[Array, "batch n0"]) -> Float[Array, "batch nL"]:
        """Batched forward pass returning logits."""
        return jax.vmap(lambda xi: self.forward(state, xi)[-1])(x)

    def forward_matrices(self, state: NetState, hs: list[Array]) -> tuple[Array, ...]:
        """``M_l = dz_l / dh_{l-1}`` at the activities ``hs`` (default: ``W_l``)."""
        return state.W

    def hidden_error(self, state: NetState, layer: int, hs: list[Array], back: Array) -> Array:
        """The error at hidden layer ``layer``'s drive from the error ``back`` arriving at
        its activity: ``back * g'(z_l)`` (a network may transform it further)."""
        return back * self.act_deriv_from_output(hs[layer])

    def after_update(self, state: NetState, pres: list[Array]) -> NetState:
        """Constraints and the network's own plasticity, applied after every rule update
        (``pres``: each layer's input for this sample). Default: none."""
        return state

    @classmethod
    def from_config(cls, network: Any, sizes: tuple[int, ...]) -> AbstractNetwork:
        """The network a ``[network]`` config describes, with layer widths ``sizes``."""
        return cls(sizes=tuple(sizes), **{k: getattr(network, k) for k in cls.options})


def _check_common(sizes, activation: str, beta: float, init_scale: float) -> None:
    if len(sizes) < 2 or any(int(s) < 1 for s in sizes):
        raise MetaplasticError(
            f"network sizes {list(sizes)} need at least an input and an output width, all positive"
        )
    if activation not in ACTIVATIONS:
        raise unknown_name("activation", activation, ACTIVATIONS, "network.activation")
    if not beta > 0:
        raise MetaplasticError(f"network.beta must be positive, got {beta}")
    if not init_scale > 0:
        raise MetaplasticError(f"network.init_scale must be positive, got {init_scale}")


def _act(activation: str, beta: float, z: Array) -> Array:
    if activation == "softplus":
        return jax.nn.softplus(beta * z) / beta
    if activation == "relu":
        return jax.nn.relu(z)
    if activation == "tanh":
        return jnp.tanh(z)
    return z


def _act_deriv(activation: str, beta: float, h: Array) -> Array:
    if activation == "softplus":
        return 1.0 - jnp.exp(-beta * h)
    if activation == "relu":
        return (h > 0).astype(h.dtype)
    if activation == "tanh":
        return 1.0 - h * h
    return jnp.ones_like(h)


class Network(AbstractNetwork):
    """Plastic MLP (``network.kind = "mlp"``): ``z_l = W_l h_{l-1} (+ b_l)``.

    Hidden layers use ``softplus(beta z) / beta`` (or another activation); the output layer
    is linear (its activity for the rules is ``softmax(z)``). Weights are Xavier-uniform:
    ``W ~ U(-a, a)``, ``a = sqrt(6 / (n_in + n_out))``; biases start at zero.

    Args:
        sizes: layer widths from input to output, e.g. ``(64, 50, 40, 30, 20, 5)``.
        beta: softplus sharpness.
        bias: whether layers have biases.
        activation: hidden activation, one of ``softplus``, ``relu``, ``tanh``, ``linear``.
        init_scale: multiplies the Xavier-uniform initial weights (poor initialisation studies).
    """

    name: ClassVar[str] = "mlp"
    options: ClassVar[tuple[str, ...]] = ("beta", "bias", "activation", "init_scale")
    sizes: tuple[int, ...] = eqx.field(static=True)
    beta: float = eqx.field(static=True, default=10.0)
    bias: bool = eqx.field(static=True, default=False)
    activation: str = eqx.field(static=True, default="softplus")
    init_scale: float = eqx.field(static=True, default=1.0)

    def __check_init__(self):
        _check_common(self.sizes, self.activation, self.beta, self.init_scale)

    def init(self, key: PRNGKeyArray) -> NetState:
        """Xavier-uniform weights, zero biases."""
        keys = jax.random.split(key, self.n_layers)
        W = tuple(xavier_uniform(k, s) for k, s in zip(keys, self.shapes, strict=True))
        if self.init_scale != 1.0:
            W = tuple(self.init_scale * w for w in W)
        b = tuple(jnp.zeros(s[0]) for s in self.shapes) if self.bias else None
        return NetState(W=W, b=b)

    def pre(self, state: NetState, layer: int, h: Array) -> Array:
        z = state.W[layer] @ h
        return z + state.b[layer] if state.b is not None else z

    def act(self, z: Array) -> Array:
        return _act(self.activation, self.beta, z)

    def act_deriv_from_output(self, h: Array) -> Array:
        """``g'(z)`` written in terms of ``h = g(z)``; softplus: ``1 - exp(-beta h)``."""
        return _act_deriv(self.activation, self.beta, h)


class Inhibition(eqx.Module):
    """The inhibitory weights of one EI layer (all non-negative): ``W_IX (n_I, n_in)``
    drives the inhibitory units, ``W_EI (n_E, n_I)`` carries their output to the excitatory
    units, ``B_IX (n_I, n_in)`` sets the divisive inhibition of I-Norm."""

    W_IX: Array
    W_EI: Array
    B_IX: Array


EI_NORMS = ("none", "layer", "inorm")
ERROR_NORMS = ("none", "gradnorm", "center")
_EPS = 1e-5


def _lognormal(key: PRNGKeyArray, shape: tuple[int, int], mean: float) -> Array:
    """Positive weights with the given mean and a standard deviation equal to it."""
    s2 = float(np.log(2.0))
    return jnp.exp(np.log(mean) - s2 / 2 + np.sqrt(s2) * jax.random.normal(key, shape))


def _standardise(z: Array) -> Array:
    """Layer norm without affine parameters over the last axis."""
    mu = jnp.mean(z, axis=-1, keepdims=True)
    return (z - mu) / jnp.sqrt(jnp.var(z, axis=-1, keepdims=True) + _EPS)


def normalise_error(d: Array, z: Array, alpha, beta, divide) -> Array:
    """The error transform of GradNorm and its relatives, over the last axis:
    ``(d - alpha mean(d) - beta zh mean(d zh)) / s`` with ``zh`` the layer-normalised drive
    ``z`` and ``s = sqrt(var(z) + 1e-5)`` where ``divide > 0`` (else 1). GradNorm is
    ``(1, 1, 1)`` (the layer-norm Jacobian at ``z``), centring ``(1, 0, 0)``."""
    zh = _standardise(z)
    mean = functools.partial(jnp.mean, axis=-1, keepdims=True)
    out = d - alpha * mean(d) - beta * zh * mean(d * zh)
    s = jnp.sqrt(jnp.var(z, axis=-1, keepdims=True) + _EPS)
    return jnp.where(divide > 0, out / s, out)


@jax.custom_vjp
def error_norm(z: Array, coef) -> Array:
    """Identity in the forward pass; the backward pass maps the error ``d`` at ``z`` to
    :func:`normalise_error` ``(d, z, *coef)`` (``coef = (alpha, beta, divide)``, which gets
    no gradient). Puts GradNorm into a network trained by autodiff."""
    return z


def _error_norm_fwd(z, coef):
    return z, (z, coef)


def _error_norm_bwd(res, d):
    z, coef = res
    return normalise_error(d, z, *coef), jax.tree_util.tree_map(jnp.zeros_like, coef)


error_norm.defvjp(_error_norm_fwd, _error_norm_bwd)

#: ``network.error_norm`` -> ``(alpha, beta, divide)`` of :func:`normalise_error`
ERROR_NORM_COEFFICIENTS = {"gradnorm": (1.0, 1.0, 1.0), "center": (1.0, 0.0, 0.0)}


INHIBITION_INITS = ("random", "exact")


def exact_inhibition(w_ex: Array, n_i: int) -> tuple[Array, Array]:
    """``(W_IX, B_IX)`` that make an I-Norm layer exactly a layer norm at initialisation
    (the set-up of Eyono et al.'s code): every row of ``W_IX`` is the mean row of ``W_EX``,
    so with ``W_EI`` rows summing to 1 the subtractive inhibition ``W_EI W_IX x`` is the
    mean excitatory drive (exact centring); ``B_IX = S V^T`` from the thin SVD ``W = U S
    V^T`` of the centred weights ``W = W_EX - 1 mean_row(W_EX)``, scaled by ``sqrt(k /
    n_E)`` (``k`` its rows), so ``mean_j (B_IX x)_j^2 = ||W x||^2 / n_E`` is the variance of
    the centred drive across units (exact scaling). ``B_IX`` is signed: it pools squared
    drives, so its sign does not act as a synapse's sign, and it is not clamped."""
    n_e = w_ex.shape[0]
    mean_row = jnp.mean(w_ex, axis=0, keepdims=True)
    _, sv, vt = jnp.linalg.svd(w_ex - mean_row, full_matrices=False)
    b_ix = (sv[:, None] * vt) * jnp.sqrt(sv.shape[0] / n_e)
    return jnp.tile(mean_row, (n_i, 1)), b_ix


class EINetwork(AbstractNetwork):
    """Excitatory-inhibitory network obeying Dale's law (``network.kind = "ei"``), after
    Cornford et al. 2021 and Eyono, Levenstein, Ghosh, Cornford & Richards 2026.

    Every layer has ``n_E`` excitatory output units (the widths in ``sizes``) and
    ``n_I = max(1, round(inhibitory_fraction * n_E))`` inhibitory units:

    * ``norm = "none"``: ``z = W_EX h + b - W_EI (W_IX h)``;
    * ``norm = "layer"``: that drive layer-normalised (no affine parameters) in the hidden
      layers;
    * ``norm = "inorm"`` (hidden layers; the output layer stays plain EI): I-Norm,
      ``z = (W_EX h + b - W_EI W_IX h) / sigma_I`` with divisive inhibition
      ``sigma_I = sqrt(mean_j (B_IX h)_j^2 + 1e-5)``.

    ``W_EX, W_IX, W_EI, B_IX >= 0`` (clamped after every update). The rule changes ``W_EX``
    (``state.W``); the inhibitory weights (``state.extra``) are fixed, or with
    ``inhibitory_rate > 0`` under I-Norm follow the local loss
    ``L_I = local_weight ((mean_j u_j)^2 + (var_j u_j - 1)^2)``, ``u = (sg(W_EX h + b) -
    W_EI W_IX h) / sigma_I``, by one gradient step of that size per sample (``sg``: the
    excitatory drive is held constant). Credit pathways see the inhibition as constant
    under I-Norm (``dz/dh = W_EX / sigma_I``) and as part of the weights otherwise
    (``dz/dh = W_EX - W_EI W_IX``); with layer norm a hidden layer's error is taken at its
    raw drive ``u`` (through layer norm's Jacobian), so ``-e h^T`` is the gradient.

    ``error_norm`` transforms the error ``d`` at a hidden drive ``z`` before it travels on:
    ``"gradnorm"``: ``(d - mean(d) - zh mean(d zh)) / sqrt(var(z) + 1e-5)`` with
    ``zh = (z - mean z) / sqrt(var z + 1e-5)`` (the layer-norm Jacobian at ``z``);
    ``"center"``: ``d - mean(d)``.

    Initialisation: ``W_EX`` and ``W_IX`` lognormal with mean and standard deviation
    ``init_scale * sqrt(2 / n_in)``, ``W_EI`` lognormal with its rows normalised to sum to 1
    (so the subtractive inhibition matches the mean excitatory drive), ``B_IX`` like ``W_IX``,
    biases zero. ``inhibition_init = "exact"`` instead sets ``W_IX`` and ``B_IX`` by
    :func:`exact_inhibition` (I-Norm equal to layer norm at initialisation, as in the
    authors' code; ``B_IX`` signed and never clamped).
    """

    name: ClassVar[str] = "ei"
    options: ClassVar[tuple[str, ...]] = (
        "beta",
        "bias",
        "activation",
        "init_scale",
        "inhibitory_fraction",
        "norm",
        "error_norm",
        "inhibitory_rate",
        "local_weight",
        "inhibition_init",
    )
    sizes: tuple[int, ...] = eqx.field(static=True)
    beta: float = eqx.field(static=True, default=10.0)
    bias: bool = eqx.field(static=True, default=False)
    activation: str = eqx.field(static=True, default="softplus")
    init_scale: float = eqx.field(static=True, default=1.0)
    inhibitory_fraction: float = eqx.field(static=True, default=0.1)
    norm: str = eqx.field(static=True, default="none")
    error_norm: str = eqx.field(static=True, default="none")
    inhibitory_rate: float = eqx.field(static=True, default=0.0)
    local_weight: float = eqx.field(static=True, default=100.0)
    inhibition_init: str = eqx.field(static=True, default="random")

    def __check_init__(self):
        _check_common(self.sizes, self.activation, self.beta, self.init_scale)
        if self.norm not in EI_NORMS:
            raise unknown_name("EI normalisation", self.norm, EI_NORMS, "network.norm")
        if self.error_norm not in ERROR_NORMS:
            raise unknown_name(
                "error normalisation", self.error_norm, ERROR_NORMS, "network.error_norm"
            )
        if not 0.0 < self.inhibitory_fraction <= 1.0:
            raise MetaplasticError(
                f"network.inhibitory_fraction must lie in (0, 1], got {self.inhibitory_fraction}"
            )
        if not self.inhibitory_rate >= 0:
            raise MetaplasticError(
                f"network.inhibitory_rate must be >= 0, got {self.inhibitory_rate}"
            )
        if self.inhibitory_rate > 0 and self.norm != "inorm":
            raise MetaplasticError(
                "network.inhibitory_rate > 0 trains the inhibition by I-Norm's local loss; "
                'set network.norm = "inorm" too'
            )
        if not self.local_weight > 0:
            raise MetaplasticError(
                f"network.local_weight must be positive, got {self.local_weight}"
            )
        if self.inhibition_init not in INHIBITION_INITS:
            raise unknown_name(
                "inhibition init", self.inhibition_init, INHIBITION_INITS, "network.inhibition_init"
            )

    def n_inhibitory(self, n_e: int) -> int:
        return max(1, round(self.inhibitory_fraction * n_e))

    def init(self, key: PRNGKeyArray) -> NetState:
        W, inh = [], []
        for k, (n_out, n_in) in zip(jax.random.split(key, self.n_layers), self.shapes, strict=True):
            k1, k2, k3, k4 = jax.random.split(k, 4)
            n_i = self.n_inhibitory(n_out)
            scale = self.init_scale * float(np.sqrt(2.0 / n_in))
            w_ei = _lognormal(k3, (n_out, n_i), 1.0)
            w_ei = w_ei / jnp.sum(w_ei, axis=1, keepdims=True)
            w_ex = _lognormal(k1, (n_out, n_in), scale)
            W.append(w_ex)
            if self.inhibition_init == "exact":
                w_ix, b_ix = exact_inhibition(w_ex, n_i)
            else:
                w_ix, b_ix = _lognormal(k2, (n_i, n_in), scale), _lognormal(k4, (n_i, n_in), scale)
            inh.append(Inhibition(W_IX=w_ix, W_EI=w_ei, B_IX=b_ix))
        b = tuple(jnp.zeros(s[0]) for s in self.shapes) if self.bias else None
        return NetState(W=tuple(W), b=b, extra=tuple(inh))

    def _inorm(self, layer: int) -> bool:
        return self.norm == "inorm" and layer < self.n_layers - 1

    def _sigma(self, p: Inhibition, h: Array) -> Array:
        return jnp.sqrt(jnp.mean((p.B_IX @ h) ** 2) + _EPS)

    def _excitatory(self, state: NetState, layer: int, h: Array) -> Array:
        exc = state.W[layer] @ h
        return exc + state.b[layer] if state.b is not None else exc

    def _hidden(self, layer: int) -> bool:
        return layer < self.n_layers - 1

    def pre(self, state: NetState, layer: int, h: Array) -> Array:
        p = state.extra[layer]
        z = self._excitatory(state, layer, h) - p.W_EI @ (p.W_IX @ h)
        if self._inorm(layer):
            return z / self._sigma(p, h)
        if self.norm == "layer" and self._hidden(layer):
            return _standardise(z)
        return z

    def act(self, z: Array) -> Array:
        return _act(self.activation, self.beta, z)

    def act_deriv_from_output(self, h: Array) -> Array:
        return _act_deriv(self.activation, self.beta, h)

    def forward_matrices(self, state: NetState, hs: list[Array]) -> tuple[Array, ...]:
        mats = []
        for layer, (w, p) in enumerate(zip(state.W, state.extra, strict=True)):
            if self._inorm(layer):
                mats.append(w / self._sigma(p, hs[layer]))
            else:
                mats.append(w - p.W_EI @ p.W_IX)
        return tuple(mats)

    def hidden_error(self, state: NetState, layer: int, hs: list[Array], back: Array) -> Array:
        d = back * self.act_deriv_from_output(hs[layer])
        if self.error_norm != "none":
            z = self.pre(state, layer - 1, hs[layer - 1])
            d = normalise_error(d, z, *ERROR_NORM_COEFFICIENTS[self.error_norm])
        if self.norm == "layer":  # to the raw drive u, through layer norm's Jacobian at u
            p, h = state.extra[layer - 1], hs[layer - 1]
            u = self._excitatory(state, layer - 1, h) - p.W_EI @ (p.W_IX @ h)
            d = normalise_error(d, u, 1.0, 1.0, 1.0)
        return d

    def _local_loss(self, p: Inhibition, exc: Array, h: Array) -> Array:
        u = (jax.lax.stop_gradient(exc) - p.W_EI @ (p.W_IX @ h)) / self._sigma(p, h)
        return self.local_weight * (jnp.mean(u) ** 2 + (jnp.var(u) - 1.0) ** 2)

    @staticmethod
    def clamp(state: NetState, signed_pool: bool = False) -> NetState:
        """Dale's law: every weight matrix clamped at zero (biases are free);
        ``signed_pool`` leaves ``B_IX`` signed (the ``"exact"`` initialisation's pool)."""
        pos = functools.partial(jax.tree_util.tree_map, lambda a: jnp.maximum(a, 0.0))

        def inhibition(p):
            if signed_pool and isinstance(p, Inhibition):
                return Inhibition(W_IX=pos(p.W_IX), W_EI=pos(p.W_EI), B_IX=p.B_IX)
            return pos(p)

        return NetState(W=pos(state.W), b=state.b, extra=tuple(inhibition(p) for p in state.extra))

    def after_update(self, state: NetState, pres: list[Array]) -> NetState:
        """Dale's law (clamp every weight at zero), then with ``inhibitory_rate > 0`` one
        gradient step of the local loss on each I-Norm layer's inhibitory weights."""
        W = tuple(jnp.maximum(w, 0.0) for w in state.W)
        extra = list(state.extra)
        if self.inhibitory_rate > 0:
            clamped = NetState(W=W, b=state.b, extra=state.extra)
            for layer in range(self.n_layers):
                if not self._inorm(layer):
                    continue
                h = pres[layer]
                exc = self._excitatory(clamped, layer, h)
                g = jax.grad(self._local_loss)(extra[layer], exc, h)
                stepped = jax.tree_util.tree_map(
                    lambda a, d: a - self.inhibitory_rate * d, extra[layer], g
                )
                extra[layer] = EINetwork.clamp(
                    NetState(W=(), b=None, extra=(stepped,)), self.inhibition_init == "exact"
                ).extra[0]
        return NetState(W=W, b=state.b, extra=tuple(extra))

    def batch_forward(
        self,
        state: NetState,
        x: Float[Array, "batch n0"],
        *,
        local_weights=None,
        back=None,
        layer_norm_reference: bool = False,
    ):
        """Mini-batch forward pass for training the weights by autodiff (the SGD baselines
        of the inhibitory-normalisation study), with I-Norm's gradient semantics.

        Returns ``(logits, local_loss, drives)``: the logits, I-Norm's local loss summed
        over its layers (0 without I-Norm) and each hidden layer's drive ``z`` (before the
        activation). In an I-Norm layer the task loss sees the inhibition as constant
        (``z = (W_EX h + b - sg(W_EI W_IX h)) / sg(sigma_I)``) and the local loss
        ``mean_batch(lam_mean (mean_j u_j)^2 + lam_var (var_j u_j - 1)^2)``,
        ``u = (sg(W_EX h + b) - W_EI W_IX sg(h)) / sigma_I(sg(h))``, trains only the
        inhibitory weights; ``local_weights = (lam_mean, lam_var)`` (default: both
        ``local_weight``). ``back = (alpha, beta, divide)`` puts :func:`error_norm` on every
        I-Norm drive (default: the ``error_norm`` setting; ``None`` there means none).
        ``layer_norm_reference``: an I-Norm layer's output is replaced by layer norm of its
        drive ``LN(W_EX h + b - sg(W_EI W_IX h))`` (the comparison the study makes).
        """
        sg = jax.lax.stop_gradient
        if local_weights is None:
            local_weights = (self.local_weight, self.local_weight)
        lam_mean, lam_var = local_weights
        if back is None and self.error_norm != "none":
            back = ERROR_NORM_COEFFICIENTS[self.error_norm]
        h, local, drives = x, 0.0, []
        for layer in range(self.n_layers):
            p = state.extra[layer]
            exc = h @ state.W[layer].T
            if state.b is not None:
                exc = exc + state.b[layer]
            if self._inorm(layer):
                hs = sg(h)
                inh = (hs @ p.W_IX.T) @ p.W_EI.T
                sigma = jnp.sqrt(jnp.mean((hs @ p.B_IX.T) ** 2, -1, keepdims=True) + _EPS)
                u = (sg(exc) - inh) / sigma
                local = local + jnp.mean(
                    lam_mean * u.mean(-1) ** 2 + lam_var * (u.var(-1) - 1.0) ** 2
                )
                if layer_norm_reference:
                    z = _standardise(exc - sg(inh))
                else:
                    z = (exc - sg(inh)) / sg(sigma)
                    if back is not None:
                        z = error_norm(z, back)
            else:
                z = exc - (h @ p.W_IX.T) @ p.W_EI.T
                if self.norm == "layer" and self._hidden(layer):
                    z = _standardise(z)
            if not self._hidden(layer):
                return z, local, drives
            drives.append(z)
            h = self.act(z)


#: Name -> network class (``network.kind``). :func:`register_network` adds one.
NETWORKS: dict[str, type[AbstractNetwork]] = {}


def register_network(cls: type[AbstractNetwork]) -> type[AbstractNetwork]:
    """Add a network class to :data:`NETWORKS` under its ``name`` (a decorator)."""
    return register(NETWORKS, cls, AbstractNetwork, "network kind")


for _cls in (Network, EINetwork):
    register_network(_cls)

#: The built-in network kinds.
NETWORK_KINDS = tuple(NETWORKS)


def network_class(kind: str) -> type[AbstractNetwork]:
    """The class ``network.kind = kind`` names (one line naming the choices otherwise)."""
    if kind not in NETWORKS:
        raise unknown_name("network kind", kind, tuple(NETWORKS), "network.kind")
    return NETWORKS[kind]


#: ``[network]`` keys every kind reads (the others are listed in each class's ``options``)
SHARED_OPTIONS = ("kind", "hidden", "n_out")


def network_from_config(network: Any, sizes: tuple[int, ...]) -> AbstractNetwork:
    """The network a ``[network]`` config (a dataclass) describes, with widths ``sizes``.

    A key the chosen kind does not read, set away from its default, is an error: it would
    otherwise be ignored silently.
    """
    cls = network_class(network.kind)
    refuse_unread_keys(network, network.kind, cls.options, SHARED_OPTIONS, "network")
    return cls.from_config(network, sizes)


def xavier_uniform(key: PRNGKeyArray, shape: tuple[int, int]) -> Array:
    """Glorot/Xavier uniform: ``U(-a, a)`` with ``a = sqrt(6 / (fan_in + fan_out))``."""
    fan_out, fan_in = shape
    a = jnp.sqrt(6.0 / (fan_in + fan_out))
    return jax.random.uniform(key, shape, minval=-a, maxval=a)
