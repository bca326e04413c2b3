"""Credit assignment: how the output error travels back to each layer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray

from .._errors import unknown_name
from ._network import NetState, Network, xavier_uniform

#: Feedback pathways.
#:
#: * ``backprop``: exact transpose of the forward weights (B = W, kept equal after every
#:   update).
#: * ``fa``: fixed random matrices B (feedback alignment, Lillicrap et al. 2016),
#:   Xavier-uniform, redrawn every episode and fixed within it.
#: * ``dfa``: direct feedback alignment (Nokland 2016): the output error goes straight to
#:   every layer through fixed random matrices ``D_l`` of shape ``(n_out_final, n_l)``.
#: * ``sign_symmetric``: ``B = sign(W) * mean|W|`` per layer, recomputed every step (Liao,
#:   Leibo & Poggio 2016; scaled to the forward weights' mean magnitude as in Moskovitz et
#:   al. 2018, so errors keep the size they have under backprop).
#: * ``kolen_pollack``: B starts random (as in ``fa``) and is plastic: after every sample it
#:   changes by the rule's feedback update (:class:`~metaplastic.rules._rules.PlasticFeedback`,
#:   Kolen & Pollack 1994; Akrout et al. 2019), whose coefficients are meta-learned.
FEEDBACK_MODES = ("backprop", "fa", "dfa", "sign_symmetric", "kolen_pollack")


def check_mode(mode: str) -> str:
    if mode not in FEEDBACK_MODES:
        raise unknown_name("feedback mode", mode, FEEDBACK_MODES, "train.feedback")
    return mode


def init_feedback(mode: str, net: Network, key: PRNGKeyArray) -> tuple[Array, ...] | None:
    """The feedback matrices of ``mode`` at the start of an episode (``None`` if derived
    from ``W``). ``fa``/``kolen_pollack``: ``B[l]`` shaped like ``W[l]``; ``dfa``: ``D[l]``
    of shape ``(n_L, n_l)`` for the units of layers ``l = 0 .. L-1``."""
    check_mode(mode)
    if mode in ("backprop", "sign_symmetric"):
        return None
    keys = jax.random.split(key, net.n_layers)
    if mode == "dfa":
        n_last = net.sizes[-1]
        shapes = [(n_last, net.sizes[j]) for j in range(net.n_layers)]
    else:
        shapes = list(net.shapes)
    return tuple(xavier_uniform(k, s) for k, s in zip(keys, shapes, strict=True))


def _sign_symmetric(W: Array) -> Array:
    return jnp.sign(W) * jnp.mean(jnp.abs(W))


def backward(
    net: Network,
    state: NetState,
    B: tuple[Array, ...] | None,
    hs: list[Array],
    e_out: Array,
    mode: str = "fa",
) -> list[Array]:
    """Errors at every layer's units, ``[e_0, e_1, ..., e_L]``.

    ``e_L = e_out`` (``softmax(z_L) - onehot``); for hidden layers
    ``e_l = (B_{l+1}^T e_{l+1}) * g'(z_l)`` with ``g'`` written in terms of ``h_l``; the input
    layer's ``e_0 = B_1^T e_1`` (no nonlinearity there). With backprop ``B = W``; with
    ``dfa`` ``e_l = (D_l^T e_L) * g'(z_l)``. (Layers are 1-based here as in DESIGN.md; in
    code ``W[l-1]`` is ``W_l``.) ``mode`` only matters when ``B`` is ``None``
    (``backprop`` or ``sign_symmetric``) or for ``dfa``.
    """
    L = net.n_layers
    errs = [None] * (L + 1)
    errs[L] = e_out
    if mode == "dfa":
        for j in range(L - 1, -1, -1):
            back = e_out @ B[j]
            errs[j] = back * net.act_deriv_from_output(hs[j]) if j > 0 else back
        return errs
    if B is not None:
        mats = B
    elif mode == "sign_symmetric":
        mats = tuple(_sign_symmetric(w) for w in state.W)
    else:
        mats = state.W
    for j in range(L - 1, -1, -1):
        back = errs[j + 1] @ mats[j]
        errs[j] = back * net.act_deriv_from_output(hs[j]) if j > 0 else back
    return errs
