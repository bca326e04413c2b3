"""Credit assignment: how the output error travels back to each layer."""

from __future__ import annotations

import jax
from jaxtyping import Array, PRNGKeyArray

from ._errors import unknown_name
from ._network import NetState, Network, xavier_uniform

#: Feedback pathways. ``backprop``: exact transpose of the forward weights (B = W, kept
#: equal after every update); ``fa``: fixed random matrices (feedback alignment, Lillicrap
#: et al. 2016), Xavier-uniform, redrawn every episode and fixed within it.
FEEDBACK_MODES = ("backprop", "fa")


def check_mode(mode: str) -> str:
    if mode not in FEEDBACK_MODES:
        raise unknown_name("feedback mode", mode, FEEDBACK_MODES, "train.feedback")
    return mode


def init_feedback(mode: str, net: Network, key: PRNGKeyArray) -> tuple[Array, ...] | None:
    """The feedback matrices ``B[l]`` (same shapes as ``W[l]``), or ``None`` for backprop."""
    check_mode(mode)
    if mode == "backprop":
        return None
    keys = jax.random.split(key, net.n_layers)
    return tuple(xavier_uniform(k, s) for k, s in zip(keys, net.shapes, strict=True))


def backward(
    net: Network,
    state: NetState,
    B: tuple[Array, ...] | None,
    hs: list[Array],
    e_out: Array,
) -> list[Array]:
    """Errors at every layer's units, ``[e_0, e_1, ..., e_L]``.

    ``e_L = e_out`` (``softmax(z_L) - onehot``); for hidden layers
    ``e_l = (B_{l+1}^T e_{l+1}) * g'(z_l)`` with ``g'`` written in terms of ``h_l``; the input
    layer's ``e_0 = B_1^T e_1`` (no nonlinearity there). With backprop ``B = W``.
    (Layers are 1-based here as in DESIGN.md; in code ``W[l-1]`` is ``W_l``.)
    """
    mats = state.W if B is None else B
    L = net.n_layers
    errs = [None] * (L + 1)
    errs[L] = e_out
    for j in range(L - 1, -1, -1):
        back = mats[j].T @ errs[j + 1]
        errs[j] = back * net.act_deriv_from_output(hs[j]) if j > 0 else back
    return errs
