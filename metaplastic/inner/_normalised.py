"""MLPs trained by mini-batch SGD with a normalisation layer: the comparison networks of the
synaptic-scaling study (batch norm, layer norm, weight norm), and synaptic scaling applied to
them as a normalisation step after each SGD update.

These networks do not learn online by a rule (they are not an
:class:`~metaplastic.inner.AbstractNetwork`); they are what a plasticity rule that normalises
is compared with. Parameters are a dict of per-layer lists: ``W`` (``(n_out, n_in)``), ``b``,
and the normalisation's gain ``g`` and shift ``beta``.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from .._errors import unknown_name
from ..rules._signals import LocalSignals
from ..rules._terms import TERMS

#: Normalisations of :class:`NormalisedMLP`'s hidden layers.
NORMALISATIONS = ("none", "batch_norm", "layer_norm", "weight_norm")
_EPS = 1e-5


class NormalisedMLP(eqx.Module):
    """A ReLU MLP whose hidden layers are normalised (Ioffe & Szegedy 2015; Ba, Kiros &
    Hinton 2016; Salimans & Kingma 2016), for training by autodiff.

    With drive ``z = W h + b`` of a hidden layer: ``batch_norm``:
    ``g (z - mu_B) / sqrt(var_B + 1e-5) + beta`` (batch statistics in training, running ones
    at evaluation); ``layer_norm``: the same over the units of each sample; ``weight_norm``:
    ``W`` replaced by ``g W / ||W_i||`` row-wise (``g`` starts at the rows' norms).
    Weights start Xavier-uniform, biases and ``beta`` at 0, ``g`` at 1.
    """

    sizes: tuple[int, ...] = eqx.field(static=True)
    norm: str = eqx.field(static=True, default="none")

    def __check_init__(self):
        if self.norm not in NORMALISATIONS:
            raise unknown_name("normalisation", self.norm, NORMALISATIONS, "norm")

    def init(self, key: PRNGKeyArray) -> dict:
        sizes = self.sizes
        keys = jax.random.split(key, len(sizes) - 1)
        p = {"W": [], "b": [], "g": [], "beta": []}
        for k, n_in, n_out in zip(keys, sizes[:-1], sizes[1:], strict=True):
            a = np.sqrt(6.0 / (n_in + n_out))
            p["W"].append(jax.random.uniform(k, (n_out, n_in), minval=-a, maxval=a))
            p["b"].append(jnp.zeros(n_out))
            p["g"].append(jnp.ones(n_out))  # BN/LN gain, or WN row norm
            p["beta"].append(jnp.zeros(n_out))
        if self.norm == "weight_norm":
            p["g"] = [jnp.linalg.norm(w, axis=1) for w in p["W"]]
        return p

    def forward(self, p: dict, x: Float[Array, "batch n0"], stats=None):
        """``(logits, hidden, batch_stats)``: the logits, each hidden layer's ReLU activity
        and (batch norm) each layer's batch mean and variance; ``stats`` (batch norm's
        running mean and variance per layer) switches to evaluation."""
        h, hidden, batch_stats = x, [], []
        L = len(p["W"])
        for i in range(L):
            W = p["W"][i]
            if self.norm == "weight_norm":
                W = p["g"][i][:, None] * W / jnp.linalg.norm(W, axis=1, keepdims=True)
            z = h @ W.T + p["b"][i]
            if i < L - 1:
                if self.norm == "batch_norm":
                    if stats is None:
                        mu, var = z.mean(0), z.var(0)
                    else:
                        mu, var = stats[i]
                    batch_stats.append((z.mean(0), z.var(0)))
                    z = (z - mu) / jnp.sqrt(var + _EPS) * p["g"][i] + p["beta"][i]
                elif self.norm == "layer_norm":
                    mu, var = z.mean(1, keepdims=True), z.var(1, keepdims=True)
                    z = (z - mu) / jnp.sqrt(var + _EPS) * p["g"][i] + p["beta"][i]
                h = jax.nn.relu(z)
                hidden.append(h)
            else:
                h = z
        return h, hidden, batch_stats


#: ``scaling_bounded``'s bound on a row's gain: ``||W_i:|| / nrm0_i`` stays in ``(1/c, c)``
BOUNDED_GAIN = 4.0
#: the scaling steps :func:`scaling_step` knows: the scaling terms, and the bounded variant
SCALING_STEPS = ("scaling_fixed", "scaling_layer_mean", "scaling_norm", "scaling_bounded")


def bounded_scaling_rate(ybar, target, W, nrm0, gain: float = BOUNDED_GAIN):
    """The log-gain drive of ``scaling_bounded``, per unit of its coefficient ``gamma``:
    ``r_i = tanh(1 - ybar_i / rho) - log(||W_i:|| / nrm0_i) / log(c)``.

    The step is ``W_i: <- W_i: exp(gamma r_i)``: multiplicative like the fixed-target
    scaling (every incoming weight of a unit scales by one factor, so their ratios are
    kept), but bounded twice over. The activity drive ``tanh(1 - ybar/rho)`` lies in
    ``(-1, tanh 1)``, so one step changes a row by a factor in ``(e^-2gamma, e^2gamma)``; and
    the leak ``-log(gain)/log(c)`` pulls the row's gain back, so its log-gain settles where
    the two cancel, inside ``(-log c, log c)``: a silent ReLU unit (``ybar = 0``) grows its
    weights to at most ``c^tanh(1) ~ c^0.76`` times their start instead of without limit (the
    failure of ``(rho - ybar) W``), and an over-active one shrinks to at least ``1/c``."""
    g = jnp.linalg.norm(W, axis=1) / nrm0
    return jnp.tanh(1.0 - ybar / target) - jnp.log(g) / jnp.log(gain)


def scaling_step(coefs: dict, targets, p: dict, ybar, nrm0) -> dict:
    """Synaptic scaling as a normalisation step: each hidden layer's incoming weights change
    by ``sum_k coefs[k] * term_k(W, ybar, nrm0)`` for the scaling terms named in ``coefs``
    (``scaling_fixed`` with target ``targets[i]``, ``scaling_layer_mean``,
    ``scaling_norm``), with ``ybar`` each hidden unit's running-average activity and
    ``nrm0`` the rows' starting norms; ``scaling_bounded`` (target ``targets[i]``) then
    multiplies each row by ``exp(coef * r_i)`` (:func:`bounded_scaling_rate`)."""
    unknown = set(coefs) - set(SCALING_STEPS)
    if unknown:
        raise unknown_name("scaling step", sorted(unknown)[0], SCALING_STEPS, "coefs")
    new_W = list(p["W"])
    for i in range(len(p["W"]) - 1):
        W = p["W"][i]
        z_in, z_out = jnp.zeros(W.shape[1]), jnp.zeros(W.shape[0])
        s = LocalSignals(z_in, z_out, z_out, z_in, W, ybar=ybar[i], theta_M=None, nrm0=nrm0[i])
        for name, c in coefs.items():
            if name == "scaling_bounded":
                continue
            term = TERMS[name](target=targets[i]) if name == "scaling_fixed" else TERMS[name]()
            new_W[i] = new_W[i] + c * term(s)
        if "scaling_bounded" in coefs:
            r = bounded_scaling_rate(ybar[i], targets[i], new_W[i], nrm0[i])
            new_W[i] = new_W[i] * jnp.exp(coefs["scaling_bounded"] * r)[:, None]
    return dict(p, W=new_W)
