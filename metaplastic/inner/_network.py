"""Plastic feed-forward network: weights, initialisation, forward pass."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._errors import MetaplasticError, unknown_name

ACTIVATIONS = ("softplus", "relu", "tanh", "linear")


class NetState(eqx.Module):
    """The plastic variables of one network: weights ``W[l]`` ``(n_out, n_in)``, biases."""

    W: tuple[Array, ...]
    b: tuple[Array, ...] | None


class Network(eqx.Module):
    """Static description of a plastic MLP.

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

    sizes: tuple[int, ...] = eqx.field(static=True)
    beta: float = eqx.field(static=True, default=10.0)
    bias: bool = eqx.field(static=True, default=False)
    activation: str = eqx.field(static=True, default="softplus")
    init_scale: float = eqx.field(static=True, default=1.0)

    def __check_init__(self):
        if len(self.sizes) < 2 or any(int(s) < 1 for s in self.sizes):
            raise MetaplasticError(
                f"network sizes {list(self.sizes)} need at least an input and an output width, "
                "all positive"
            )
        if self.activation not in ACTIVATIONS:
            raise unknown_name("activation", self.activation, ACTIVATIONS, "network.activation")
        if not self.beta > 0:
            raise MetaplasticError(f"network.beta must be positive, got {self.beta}")
        if not self.init_scale > 0:
            raise MetaplasticError(f"network.init_scale must be positive, got {self.init_scale}")

    @property
    def n_layers(self) -> int:
        return len(self.sizes) - 1

    @property
    def shapes(self) -> tuple[tuple[int, int], ...]:
        return tuple((self.sizes[i + 1], self.sizes[i]) for i in range(self.n_layers))

    def init(self, key: PRNGKeyArray) -> NetState:
        """Xavier-uniform weights, zero biases."""
        keys = jax.random.split(key, self.n_layers)
        W = tuple(xavier_uniform(k, s) for k, s in zip(keys, self.shapes, strict=True))
        if self.init_scale != 1.0:
            W = tuple(self.init_scale * w for w in W)
        b = tuple(jnp.zeros(s[0]) for s in self.shapes) if self.bias else None
        return NetState(W=W, b=b)

    def act(self, z: Array) -> Array:
        if self.activation == "softplus":
            return jax.nn.softplus(self.beta * z) / self.beta
        if self.activation == "relu":
            return jax.nn.relu(z)
        if self.activation == "tanh":
            return jnp.tanh(z)
        return z

    def act_deriv_from_output(self, h: Array) -> Array:
        """``g'(z)`` written in terms of ``h = g(z)``; softplus: ``1 - exp(-beta h)``."""
        if self.activation == "softplus":
            return 1.0 - jnp.exp(-self.beta * h)
        if self.activation == "relu":
            return (h > 0).astype(h.dtype)
        if self.activation == "tanh":
            return 1.0 - h * h
        return jnp.ones_like(h)

    def forward(self, state: NetState, x: Float[Array, " n0"]) -> list[Array]:
        """Activities ``[x, h_1, ..., h_{L-1}, z_L]`` (the last entry is the logits)."""
        hs = [x]
        h = x
        for layer in range(self.n_layers):
            z = state.W[layer] @ h
            if state.b is not None:
                z = z + state.b[layer]
            h = self.act(z) if layer < self.n_layers - 1 else z
            hs.append(h)
        return hs

    def logits(self, state: NetState, x: Float[Array, "batch n0"]) -> Float[Array, "batch nL"]:
        """Batched forward pass returning logits."""
        return jax.vmap(lambda xi: self.forward(state, xi)[-1])(x)


def xavier_uniform(key: PRNGKeyArray, shape: tuple[int, int]) -> Array:
    """Glorot/Xavier uniform: ``U(-a, a)`` with ``a = sqrt(6 / (fan_in + fan_out))``."""
    fan_out, fan_in = shape
    a = jnp.sqrt(6.0 / (fan_in + fan_out))
    return jax.random.uniform(key, shape, minval=-a, maxval=a)
