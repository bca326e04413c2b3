"""The inner loop: online learning (one sample per update) over one episode."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ._feedback import backward, init_feedback
from ._network import NetState, Network
from ._rules import AbstractRule
from ._signals import LocalSignals


class Episode(eqx.Module):
    """One task instance: training stream (presented in order) and query set."""

    train_x: Float[Array, "T d"]
    train_y: Int[Array, " T"]
    query_x: Float[Array, "Q d"]
    query_y: Int[Array, " Q"]


class InnerResult(eqx.Module):
    """What one online episode produced.

    ``train_loss`` / ``train_correct``: per step, measured on the sample *before* the update
    (online "test-then-train"). ``query_loss`` / ``query_accuracy``: of the final network.
    ``diverged``: any weight non-finite at the end.
    """

    state: NetState
    train_loss: Float[Array, " T"]
    train_correct: Float[Array, " T"]
    query_loss: Float[Array, ""]
    query_accuracy: Float[Array, ""]
    diverged: Array


def online_step(rule: AbstractRule, net: Network, B, state: NetState, x, label):
    """One online update on one sample; returns the new state, the loss and correctness."""
    hs = net.forward(state, x)
    logits = hs[-1]
    p = jax.nn.softmax(logits)
    loss = -jax.nn.log_softmax(logits)[label]
    correct = (jnp.argmax(logits) == label).astype(logits.dtype)
    e_out = p - jax.nn.one_hot(label, logits.shape[-1], dtype=p.dtype)
    errs = backward(net, state, B, hs, e_out)
    L = net.n_layers
    new_W, new_b = [], []
    for layer in range(L):
        post = hs[layer + 1] if layer < L - 1 else p
        s = LocalSignals(
            x=hs[layer], y=post, e=errs[layer + 1], e_pre=errs[layer], W=state.W[layer]
        )
        new_W.append(state.W[layer] + rule(layer, s))
        if state.b is not None:
            new_b.append(state.b[layer] + rule.bias(layer, s))
    new_state = NetState(W=tuple(new_W), b=tuple(new_b) if state.b is not None else None)
    return new_state, loss, correct


def query_metrics(net: Network, state: NetState, qx, qy):
    """Mean cross-entropy and accuracy of the network on the query set."""
    logits = net.logits(state, qx)
    loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), qy[:, None], axis=1))
    acc = jnp.mean((jnp.argmax(logits, axis=1) == qy).astype(logits.dtype))
    return loss, acc


def run_episode(
    rule: AbstractRule,
    net: Network,
    feedback: str,
    key: PRNGKeyArray,
    episode: Episode,
    *,
    remat: bool = False,
) -> InnerResult:
    """Online learning over ``episode.train_*`` with ``lax.scan``, then query metrics.

    The network and (for ``fa``) the feedback matrices are drawn fresh from ``key``.
    ``remat=True`` wraps each step in ``jax.checkpoint`` (less memory for reverse-mode
    meta-gradients, at the cost of recomputing the forward pass).
    """
    k_net, k_fb = jax.random.split(key)
    state0 = net.init(k_net)
    B = init_feedback(feedback, net, k_fb)

    def body(state, xy):
        x, label = xy
        new_state, loss, correct = online_step(rule, net, B, state, x, label)
        return new_state, (loss, correct)

    if remat:
        body = jax.checkpoint(body)
    state, (losses, corrects) = jax.lax.scan(body, state0, (episode.train_x, episode.train_y))
    qloss, qacc = query_metrics(net, state, episode.query_x, episode.query_y)
    leaves = jax.tree_util.tree_leaves(state)
    diverged = ~jnp.all(jnp.array([jnp.all(jnp.isfinite(w)) for w in leaves]))
    return InnerResult(state, losses, corrects, qloss, qacc, diverged)
