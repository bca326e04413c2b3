"""The local signals a plasticity rule may read at one layer."""

from __future__ import annotations

import equinox as eqx
from jaxtyping import Array, Float


class LocalSignals(eqx.Module):
    """Everything available locally at the synapses of one layer for one sample.

    For a layer with weights ``W`` of shape ``(n_out, n_in)``:

    * ``x``: pre-synaptic activity, ``(n_in,)``
    * ``y``: post-synaptic activity, ``(n_out,)`` (softmax at the output layer)
    * ``e``: error / modulatory signal at the post-synaptic units, ``(n_out,)``
    * ``e_pre``: error at the pre-synaptic units, ``(n_in,)``
    * ``W``: the current weights, ``(n_out, n_in)``
    """

    x: Float[Array, " n_in"]
    y: Float[Array, " n_out"]
    e: Float[Array, " n_out"]
    e_pre: Float[Array, " n_in"]
    W: Float[Array, "n_out n_in"]
