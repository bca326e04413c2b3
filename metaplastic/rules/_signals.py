"""The local signals a plasticity rule may read at one layer, and per-neuron state."""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float


class LocalSignals(eqx.Module):
    """Everything available locally at the synapses of one layer for one sample.

    For a layer with weights ``W`` of shape ``(n_out, n_in)``:

    * ``x``: pre-synaptic activity, ``(n_in,)``
    * ``y``: post-synaptic activity, ``(n_out,)`` (softmax at the output layer)
    * ``e``: error / modulatory signal at the post-synaptic units, ``(n_out,)``
    * ``e_pre``: error at the pre-synaptic units, ``(n_in,)``
    * ``W``: the current weights, ``(n_out, n_in)``

    Per-neuron homeostatic state (see :class:`NeuronState`; ``None`` where a caller has
    none, and then the stateful terms cannot be used):

    * ``ybar``: running average of ``y`` (bias-corrected), ``(n_out,)``
    * ``theta_M``: running average of ``y**2`` (BCM's sliding threshold), ``(n_out,)``
    * ``nrm0``: each row's norm ``||W_i:||`` at the start of the episode, ``(n_out,)``
    """

    x: Float[Array, " n_in"]
    y: Float[Array, " n_out"]
    e: Float[Array, " n_out"]
    e_pre: Float[Array, " n_in"]
    W: Float[Array, "n_out n_in"]
    ybar: Float[Array, " n_out"] | None = None
    theta_M: Float[Array, " n_out"] | None = None
    nrm0: Float[Array, " n_out"] | None = None


class NeuronState(eqx.Module):
    """Per-neuron running statistics of one layer, threaded through the inner loop's scan.

    ``m1``/``m2`` are exponential moving averages of ``y`` and ``y**2`` with rate ``rate``
    (``m <- (1 - rate) m + rate y``), started at zero and bias-corrected by
    ``1 - (1 - rate)**t`` as in Adam, so that the first sample already gives ``ybar = y``.
    """

    m1: Float[Array, " n_out"]
    m2: Float[Array, " n_out"]
    t: Float[Array, ""]
    nrm0: Float[Array, " n_out"]

    @classmethod
    def start(cls, W: Array) -> NeuronState:
        n_out = W.shape[0]
        z = jnp.zeros(n_out, W.dtype)
        return cls(z, z, jnp.zeros((), W.dtype), jnp.sqrt(jnp.sum(W * W, axis=1)))

    def advance(self, y: Array, rate: float) -> NeuronState:
        m1 = (1.0 - rate) * self.m1 + rate * y
        m2 = (1.0 - rate) * self.m2 + rate * y * y
        return NeuronState(m1, m2, self.t + 1.0, self.nrm0)

    def averages(self, rate: float) -> tuple[Array, Array]:
        """Bias-corrected ``(ybar, theta_M)``; call after :meth:`advance`."""
        corr = 1.0 - (1.0 - rate) ** jnp.maximum(self.t, 1.0)
        return self.m1 / corr, self.m2 / corr
