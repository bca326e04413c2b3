"""A fused native inner loop with forward-mode tangents (``train.gradient = "native"``).

XLA:CPU runs a forward-mode meta-gradient as many separate kernels per online step (the
forward pass, the tangents' matrix-vector products, the rank-one updates), each streaming
the weight matrices through the cache again. This module compiles one loop with numba that
updates the weights ``W_l`` *and* their tangents ``dW_l/dtheta_k`` for every coefficient in
the same passes over memory, and runs the episodes of a meta-batch on parallel threads.

Supported (anything else is refused in one line by :func:`native_support`): a term pool of
``pseudo_gradient`` (``-e x^T``), ``error_hebbian`` (``-e e_pre^T``) and ``oja``
(``y (x - W^T y)^T``), coefficients shared by all layers, on a plain MLP without biases
(``network.kind = "mlp"``, ``bias = false``; softplus, relu, tanh or linear hidden units;
linear output read through a softmax) with feedback alignment or backprop errors, no
weight guard (``train.weight_limit = 0``) and a classification task.

The equations, per online sample and layer ``l`` (pre activity ``x = h_l``, post
``y = h_{l+1}`` or ``softmax(z_L)`` at the output, errors ``e = e_{l+1}``,
``e_pre = e_l``):

    dW   = e v^T + theta_oja y u^T,   v = -(theta_pg x + theta_eh e_pre),  u = x - W^T y

and for each coefficient ``k`` the tangent ``T = dW/dtheta_k`` (dots: derivatives along
``theta_k``, carried forward through the activities and errors of the step):

    dT = e' v^T + e v'^T + theta_oja (y' u^T + y u'^T) + term_k,
    v' = -(theta_pg x' + theta_eh e_pre'),  u' = x' - T^T y - W^T y'

where ``z' = T h + W h'``, ``h' = g'(z) z'``, ``p' = p (z' - p.z')``, and the errors'
tangents follow the pathway's chain (``e_l' = (M^T e_{l+1})' g'(h_l) + (M^T e_{l+1})
g'(h_l)'``, with ``M' = T`` for backprop and ``0`` for fixed feedback). The outputs are
the final weights and their tangents; the query loss and its derivative are taken in JAX
from them (:func:`native_episode`), so the meta-gradient is that of
``jax.jacfwd`` through the plain scan up to float rounding (the loop uses fused
multiply-adds and reassociates sums; tested against it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .._errors import MetaplasticError

#: the pool terms the native loop implements, in the order of its coefficient vector
NATIVE_TERMS = ("pseudo_gradient", "error_hebbian", "oja")
#: hidden activations by code
_ACTS = {"linear": 0, "softplus": 1, "relu": 2, "tanh": 3}
#: credit pathways by code
_PATHWAYS = {"fa": 0, "backprop": 1}


def native_support(rule, net, feedback, weight_limit: float = 0.0) -> str | None:
    """Why the native loop cannot run this set-up (one line), or ``None`` if it can."""
    from ..rules._rules import TermPoolRule
    from ._network import Network

    name = feedback if isinstance(feedback, str) else getattr(feedback, "name", "?")
    if not isinstance(rule, TermPoolRule):
        return f"the rule is a {rule.kind} rule; it needs a term pool"
    names = [t.name for t in rule.terms]
    extra = [n for n in names if n not in NATIVE_TERMS]
    if extra:
        return f"it implements only the terms {', '.join(NATIVE_TERMS)}, not {', '.join(extra)}"
    if len(set(names)) != len(names):
        return "the pool lists a term twice; list each once"
    if not rule.shared:
        return "it needs coefficients shared by all layers (rule.shared = true)"
    if type(net) is not Network:
        return f"it needs network.kind = 'mlp', not {type(net).__name__}"
    if net.bias:
        return "it needs a network without biases (network.bias = false)"
    if net.activation not in _ACTS:
        return f"it does not implement activation {net.activation!r}"
    if name not in _PATHWAYS:
        return f"it implements train.feedback fa and backprop, not {name!r}"
    if weight_limit > 0:
        return "it has no weight guard: set train.weight_limit = 0"
    return None


def _kernel():
    try:
        from ._native_kernel import batch
    except ImportError as err:  # pragma: no cover - numba is a dependency
        raise MetaplasticError(
            f"train.gradient = 'native' needs numba ({err}); pip install numba"
        ) from None
    return batch


def _layout(sizes):
    sizes = np.asarray(sizes, np.int64)
    woff = np.concatenate([[0], np.cumsum(sizes[1:] * sizes[:-1])]).astype(np.int64)
    aoff = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    return sizes, woff, aoff


def run_native(sizes, activation, beta, pathway, theta, W0, B, xs, labels):
    """The loop on NumPy arrays with a leading episode axis: ``theta (E, 3)`` (the
    :data:`NATIVE_TERMS` coefficients), ``W0``/``B`` ``(E, P)`` (every layer's matrix
    flattened row-major, in order), ``xs (E, T, n0)``, ``labels (E, T)``. Returns
    ``(W_T (E, P), tangents (E, 3, P), losses (E, T), hits (E, T))``."""
    sz, woff, aoff = _layout(sizes)
    E, P = W0.shape
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= sizes[-1]):
        # the loop does not check bounds: a label past the output layer would read memory
        raise MetaplasticError(
            f"native loop: labels must lie in [0, {sizes[-1]}), got {labels.min()}..{labels.max()}"
        )
    W = np.array(W0, np.float32, copy=True, order="C")
    T = np.zeros((E, 3, P), np.float32)
    Bm = np.ascontiguousarray(B, np.float32)
    xs = np.ascontiguousarray(xs, np.float32)
    labels = np.ascontiguousarray(labels, np.int64)
    th = np.ascontiguousarray(theta, np.float32)
    losses = np.zeros(labels.shape, np.float32)
    hits = np.zeros(labels.shape, np.float32)
    _kernel()(
        sz,
        woff,
        aoff,
        W,
        T,
        Bm,
        xs,
        labels,
        th,
        _ACTS[activation],
        np.float32(beta),
        _PATHWAYS[pathway],
        losses,
        hits,
    )
    return W, T, losses, hits


def _flat(mats) -> jax.Array:
    return jnp.concatenate([m.reshape(-1) for m in mats])


def _unflat(flat, shapes):
    out, i = [], 0
    for no, ni in shapes:
        out.append(flat[i : i + no * ni].reshape(no, ni))
        i += no * ni
    return tuple(out)


def _make_inner(sizes, activation, beta, pathway):
    """``inner(theta3, W0, B, xs, labels) -> (W_T, losses, hits)`` on flat weights, with
    a JVP in ``theta3`` given by the loop's tangents (the other inputs are data: their
    tangents must be zero)."""
    P = sum(a * b for a, b in zip(sizes[1:], sizes[:-1], strict=True))

    def host(th, w0, b, x, lab):
        # unbatched, or under vmap (vmap_method="expand_dims": a leading axis on every
        # input, of size 1 on the unbatched ones): the episodes run on parallel threads
        if x.ndim > 3:
            raise MetaplasticError(
                "train.gradient = 'native' runs under one vmap over episodes, not nested vmaps"
            )
        batched = x.ndim == 3
        T, n0 = x.shape[-2:]
        th, w0, b = (np.reshape(a, (-1, a.shape[-1])) for a in (th, w0, b))
        x, lab = np.reshape(x, (-1, T, n0)), np.reshape(lab, (-1, T))
        n = max(a.shape[0] for a in (th, w0, b, x, lab))
        th, w0, b, x, lab = (np.broadcast_to(a, (n, *a.shape[1:])) for a in (th, w0, b, x, lab))
        out = run_native(sizes, activation, beta, pathway, th, w0, b, x, lab)
        return out if batched else tuple(o[0] for o in out)

    def call(theta3, W0, B, xs, labels):
        shapes = (
            jax.ShapeDtypeStruct((P,), jnp.float32),
            jax.ShapeDtypeStruct((3, P), jnp.float32),
            jax.ShapeDtypeStruct(labels.shape, jnp.float32),
            jax.ShapeDtypeStruct(labels.shape, jnp.float32),
        )
        return jax.pure_callback(host, shapes, theta3, W0, B, xs, labels, vmap_method="expand_dims")

    @jax.custom_jvp
    def inner(theta3, W0, B, xs, labels):
        W, _, losses, hits = call(theta3, W0, B, xs, labels)
        return W, losses, hits

    def inner_jvp(primals, tangents):
        from jax.custom_derivatives import SymbolicZero

        for name, tan in zip(("W0", "B", "xs"), tangents[1:4], strict=True):
            if not isinstance(tan, SymbolicZero):
                raise NotImplementedError(
                    f"train.gradient = 'native' differentiates the rule's coefficients "
                    f"only, not {name}"
                )
        W, T, losses, hits = call(*primals)
        d_theta = tangents[0]
        if isinstance(d_theta, SymbolicZero):
            dW = jnp.zeros_like(W)
        else:
            dW = jnp.tensordot(d_theta, T, axes=1)
        # the per-step training losses are not differentiated: their tangents are NaN, so
        # a meta-loss built on them fails loudly instead of getting a zero gradient
        nan = jnp.full_like(losses, jnp.nan)
        return (W, losses, hits), (dW, nan, jnp.zeros_like(hits))

    inner.defjvp(inner_jvp, symbolic_zeros=True)
    return inner


_INNERS: dict = {}


def native_scan(rule, net, feedback, carry0, train_x, train_y):
    """The online episode of :func:`~metaplastic.inner._episode.scan_episode` by the native
    loop: ``(carry, stopped, (losses, hits))`` (``stopped`` is always false: no guard)."""
    from ..rules._rules import TermPoolRule

    assert isinstance(rule, TermPoolRule)
    name = feedback if isinstance(feedback, str) else feedback.name
    key = (tuple(net.sizes), net.activation, float(net.beta), name)
    if key not in _INNERS:
        _INNERS[key] = _make_inner(*key)
    inner = _INNERS[key]
    mask = jnp.asarray(rule.mask, rule.theta.dtype)
    by_name = {t.name: i for i, t in enumerate(rule.terms)}
    th = rule.theta * mask
    theta3 = jnp.stack(
        [th[by_name[n]] if n in by_name else jnp.zeros((), th.dtype) for n in NATIVE_TERMS]
    ).astype(jnp.float32)
    W0 = _flat(carry0.net.W)
    B = _flat(carry0.B) if carry0.B is not None else jnp.zeros_like(W0)
    W, losses, hits = inner(theta3, W0, B, train_x.astype(jnp.float32), train_y)
    state = carry0.net.__class__(W=_unflat(W, net.shapes), b=None, extra=carry0.net.extra)
    carry = carry0.__class__(state, carry0.B, carry0.neurons)
    return carry, jnp.array(False), (losses, hits)
