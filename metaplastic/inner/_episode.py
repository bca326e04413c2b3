"""The inner loop: online learning (one sample per update) over one episode."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ..rules._rules import AbstractRule
from ..rules._signals import LocalSignals, NeuronState
from ._feedback import as_pathway
from ._native import native_scan, native_support
from ._network import AbstractNetwork, NetState
from ._reconstruct import reconstructed_scan, reconstruction_drift, require_reconstructable


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
    ``diverged``: any weight, or the query loss, non-finite at the end.
    """

    state: NetState
    train_loss: Float[Array, " T"]
    train_correct: Float[Array, " T"]
    query_loss: Float[Array, ""]
    query_accuracy: Float[Array, ""]
    diverged: Array
    #: what a ``record`` hook of :func:`scan_episode` returned at every step (else ``None``)
    record: Any = None


class Carry(eqx.Module):
    """What changes during an episode: the network's weights, the feedback matrices (``None``
    when derived from ``W``) and the per-neuron state (``None`` when the rule reads none)."""

    net: NetState
    B: tuple[Array, ...] | None
    neurons: tuple[NeuronState, ...] | None

    @classmethod
    def start(cls, rule: AbstractRule, state0: NetState, B) -> Carry:
        """Per-neuron state only when the rule reads it."""
        neurons = tuple(NeuronState.start(w) for w in state0.W) if rule.uses_state() else None
        return cls(state0, B, neurons)


def start_carry(rule: AbstractRule, net: AbstractNetwork, feedback, key: PRNGKeyArray) -> Carry:
    """Fresh network weights and feedback matrices drawn from ``key`` (``feedback``: a
    credit pathway or its name)."""
    k_net, k_fb = jax.random.split(key)
    return Carry.start(rule, net.init(k_net), as_pathway(feedback).init(net, k_fb))


def apply_rule(
    rule: AbstractRule,
    carry: Carry,
    pres,
    posts,
    errs,
    feedback="fa",
    net: AbstractNetwork | None = None,
) -> Carry:
    """Apply the rule at every layer given its pre/post activities and the errors
    ``errs = [e_0, ..., e_L]``; advance the per-neuron state and plastic feedback, then let
    ``net`` apply its constraints and own plasticity (:meth:`AbstractNetwork.after_update`)."""
    state = carry.net
    plastic = as_pathway(feedback).plastic
    rate = rule.state_rate()
    new_W, new_b, new_n, new_B = [], [], [], []
    for layer, W in enumerate(state.W):
        extra = {}
        if carry.neurons is not None:
            ns = carry.neurons[layer].advance(posts[layer], rate)
            ybar, theta_m = ns.averages(rate)
            extra = {"ybar": ybar, "theta_M": theta_m, "nrm0": ns.nrm0}
            new_n.append(ns)
        s = LocalSignals(
            x=pres[layer], y=posts[layer], e=errs[layer + 1], e_pre=errs[layer], W=W, **extra
        )
        new_W.append(W + rule(layer, s))
        if state.b is not None:
            new_b.append(state.b[layer] + rule.bias(layer, s))
        if plastic:
            new_B.append(carry.B[layer] + rule.feedback_delta(layer, s, carry.B[layer]))
    net_state = NetState(
        W=tuple(new_W), b=tuple(new_b) if state.b is not None else None, extra=state.extra
    )
    if net is not None:
        net_state = net.after_update(net_state, pres)
    return Carry(
        net_state,
        tuple(new_B) if plastic else carry.B,
        tuple(new_n) if carry.neurons is not None else None,
    )


def weight_limits(state: NetState, factor: float) -> tuple[Array, ...] | None:
    """Per layer ``factor * max|W_0|``: the bound of :func:`guard` (``None`` when off)."""
    if not factor > 0:
        return None
    return tuple(factor * jnp.max(jnp.abs(w)) for w in state.W)


def guard(old: Carry, new: Carry, stopped: Array, limits) -> tuple[Carry, Array]:
    """Stop an episode whose weights blow up, keeping its gradient finite and informative.

    When any weight of ``new`` leaves ``[-limit, limit]`` of its layer (or is not finite),
    the episode *stops*: from then on the carry stays at ``old``, the last state within the
    bound, and ``stopped`` is set. Without this a rule past a cliff makes the weights
    overflow, the episode's loss and meta-gradient become NaN and the outer loop can only
    drop it, blind to why. A stopped episode ends with large but finite weights, so its
    loss is large and its meta-gradient points away from the cliff. Stopped episodes still
    count as diverged everywhere results are reported. ``limits=None``: no guard.
    """
    if limits is None:
        return new, stopped
    out = jnp.array(False)
    for w, lim in zip(new.net.W, limits, strict=True):
        out = out | ~jnp.all(jnp.abs(w) <= lim)  # NaN compares False: caught too
    stop = stopped | out
    carry = jax.tree_util.tree_map(lambda o, n: jnp.where(stop, o, n), old, new)
    return carry, stop


def forward_backward(net: AbstractNetwork, feedback, carry: Carry, x, label):
    """Activities and errors for one labelled sample.

    Returns ``(pres, posts, errs, loss, correct)``: each layer's pre-synaptic activity,
    post-synaptic activity (softmax at the output), the errors ``[e_0, ..., e_L]``, the
    cross-entropy and whether the prediction was right.
    """
    hs = net.forward(carry.net, x)
    logits = hs[-1]
    p = jax.nn.softmax(logits)
    loss = -jax.nn.log_softmax(logits)[label]
    correct = (jnp.argmax(logits) == label).astype(logits.dtype)
    e_out = p - jax.nn.one_hot(label, logits.shape[-1], dtype=p.dtype)
    errs = as_pathway(feedback).errors(net, carry.net, carry.B, hs, e_out)
    L = net.n_layers
    posts = [hs[layer + 1] if layer < L - 1 else p for layer in range(L)]
    return hs[:L], posts, errs, loss, correct


def online_step(rule: AbstractRule, net: AbstractNetwork, feedback, carry: Carry, x, label):
    """One online update on one sample; returns the new carry, the loss and correctness."""
    pres, posts, errs, loss, correct = forward_backward(net, feedback, carry, x, label)
    return apply_rule(rule, carry, pres, posts, errs, feedback, net), loss, correct


#: Meta-objectives on the query set (what the outer loop minimises), see :func:`query_metrics`.
OBJECTIVES = ("cross_entropy", "prob_error")


def query_metrics(
    net: AbstractNetwork,
    state: NetState,
    qx,
    qy,
    objective: str = "cross_entropy",
    temperature: float = 1.0,
    mask=None,
):
    """Query loss (the meta-objective) and accuracy of the network on the query set
    (``mask``: 1/0 per query image, the images the means run over; default all).

    ``objective``: ``"cross_entropy"``, ``mean_q -log p_T(y_q | x_q)``, or ``"prob_error"``,
    ``1 - mean_q p_T(y_q | x_q)`` (one minus the mean probability of the right class, a
    smooth accuracy), where ``p_T = softmax(z / T)`` with ``T = temperature``. Cross-entropy
    pays more for a confident mistake than it gains from a confident hit, so uniform outputs
    (loss ``ln n_out``) can beat a network that learns but is over-confident; the smooth
    accuracy scores uniform outputs at ``1 - 1/n_out``, worse than any network whose
    accuracy is above chance and whose confidence follows it.

    A query image whose logits are not all finite counts as wrong: ``argmax`` of NaN logits
    is a valid class index, which would otherwise score a blown-up network at chance.
    """
    logits = net.logits(state, qx)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits / temperature), qy[:, None], axis=1)
    finite = jnp.all(jnp.isfinite(logits), axis=1)
    hit = (jnp.argmax(logits, axis=1) == qy) & finite
    if mask is None:
        if objective == "prob_error":
            loss = 1.0 - jnp.mean(jnp.exp(logp))
        else:
            loss = -jnp.mean(logp)
        return loss, jnp.mean(hit.astype(logits.dtype))
    w = mask.astype(logits.dtype) / jnp.sum(mask)
    per = 1.0 - jnp.exp(logp[:, 0]) if objective == "prob_error" else -logp[:, 0]
    return jnp.sum(w * per), jnp.sum(w * hit.astype(logits.dtype))


def scan_episode(
    rule: AbstractRule,
    net: AbstractNetwork,
    feedback,
    carry0: Carry,
    stream,
    signals: Callable,
    *,
    weight_limit: float = 0.0,
    remat: bool | int = False,
    record: Callable | None = None,
    limits_from: NetState | None = None,
):
    """The online scan every task runs: one ``lax.scan`` over the samples of ``stream``
    (a pytree whose leaves have a leading time axis) in which the rule changes the weights
    after every sample.

    At step ``t`` with sample ``s``: ``signals(carry, s) -> (pres, posts, errs, out)`` gives
    each layer's pre- and post-synaptic activity, the errors ``[e_0, ..., e_L]`` and
    per-step outputs; :func:`apply_rule` updates the carry (then the network's own
    :meth:`~AbstractNetwork.after_update`); :func:`guard` stops the episode when
    ``weight_limit > 0`` and a weight leaves its bound. ``record(carry, pres, posts, errs,
    t)``, when given, adds what it returns to the per-step outputs (distillation samples
    synapses this way). ``remat`` sets ``jax.checkpoint`` for reverse-mode memory
    (:func:`segment_length`): ``True`` each step, ``k > 1`` segments of ``k`` steps, ``-1``
    segments of ``sqrt(T)`` steps; ``"reconstruct"`` stores no carries at all and rebuilds
    them backwards in reverse mode (:func:`~metaplastic.inner._reconstruct.reconstructed_scan`;
    reverse mode only, not for networks with an ``after_update``).

    ``limits_from``: the network state whose largest weights set the guard's bounds
    (default ``carry0.net``; a segment of a longer episode passes the episode's start).

    Returns ``(carry, stopped, outs)``: the final carry, whether the guard stopped the
    episode, and the stacked per-step ``out`` (``(out, recorded)`` with ``record``).
    """
    limits = weight_limits(carry0.net if limits_from is None else limits_from, weight_limit)
    T = jax.tree_util.tree_leaves(stream)[0].shape[0]
    if isinstance(remat, str):
        parts = _reconstruct_parts(rule, net, feedback, signals, limits, record)
        xs = (stream, jnp.arange(T))
        (carry, stopped), outs = reconstructed_scan(*parts, carry0, xs, anchor_spacing(remat, T))
        return carry, stopped, outs

    def body(state, inp):
        carry, stopped = state
        sample, t = inp
        pres, posts, errs, out = signals(carry, sample)
        new = apply_rule(rule, carry, pres, posts, errs, feedback, net)
        if record is not None:
            out = (out, record(carry, pres, posts, errs, t))
        return guard(carry, new, stopped, limits), out

    (carry, stopped), outs = checkpointed_scan(
        body, (carry0, jnp.array(False)), (stream, jnp.arange(T)), segment_length(remat, T)
    )
    return carry, stopped, outs


def _reconstruct_parts(rule, net, feedback, signals, limits, record):
    """The step of :func:`scan_episode` split as :func:`reconstructed_scan` needs it."""
    require_reconstructable(net)

    def sig_out(params, carry, inp):
        sample, t = inp
        pres, posts, errs, out = signals(carry, sample)
        if record is not None:
            out = (out, record(carry, pres, posts, errs, t))
        return (pres, posts, errs), out

    def advance(params, carry, sig):
        return apply_rule(params[0], carry, *sig, feedback, net)

    def stop(params, old, new):  # never, without limits
        return guard(old, new, jnp.array(False), params[1])[1]

    return sig_out, advance, stop, (rule, limits)


def anchor_spacing(remat: str, T: int) -> int:
    """Steps between stored carries for ``remat = "reconstruct"`` (``ceil(sqrt(T))``) or
    ``"reconstruct:K"`` (``K``; ``0`` stores none: memory flat in ``T``, but rounding
    errors then grow over the whole episode, see :func:`episode_reconstruction_drift`)."""
    name, _, k = remat.partition(":")
    if name != "reconstruct" or (k and not k.isdigit()):
        raise ValueError(
            f"remat must be a bool, an int, 'reconstruct' or 'reconstruct:K', got {remat!r}"
        )
    return min(int(k), T) if k else max(1, math.ceil(math.sqrt(T)))


def episode_reconstruction_drift(
    rule: AbstractRule,
    net: AbstractNetwork,
    feedback,
    key: PRNGKeyArray,
    episode: Episode,
    *,
    weight_limit: float = 0.0,
    remat: str = "reconstruct",
) -> Array:
    """:func:`~metaplastic.inner._reconstruct.reconstruction_drift` of one episode of
    :func:`run_episode`: how far ``train.gradient = "reconstruct"`` (anchors as
    :func:`anchor_spacing` of ``remat``) rebuilds the weights and the rest of the carry
    backwards, relative to their size."""
    carry0 = start_carry(rule, net, feedback, key)
    limits = weight_limits(carry0.net, weight_limit)
    parts = _reconstruct_parts(rule, net, feedback, labelled_signals(net, feedback), limits, None)
    T = episode.train_x.shape[0]
    xs = ((episode.train_x, episode.train_y), jnp.arange(T))
    return reconstruction_drift(*parts, carry0, xs, anchor_spacing(remat, T))


def labelled_signals(net: AbstractNetwork, feedback) -> Callable:
    """``signals`` of :func:`scan_episode` for a stream of ``(x, label)`` samples."""

    def signals(carry, sample):
        x, label = sample
        pres, posts, errs, loss, correct = forward_backward(net, feedback, carry, x, label)
        return pres, posts, errs, (loss, correct)

    return signals


def segment_length(remat: bool | int, T: int) -> int:
    """Steps per ``jax.checkpoint`` segment for ``remat``: ``False``/0 = none (0), ``True``/1
    = every step, ``k > 1`` = segments of ``k`` steps, ``-1`` = segments of ``ceil(sqrt(T))``
    steps (the memory optimum; see :func:`checkpointed_scan`)."""
    remat = int(remat)
    if remat < -1:
        raise ValueError(f"remat must be -1, 0, 1 or a segment length > 1, got {remat}")
    if remat == -1:
        return max(1, math.ceil(math.sqrt(T)))
    return min(remat, T)


def checkpointed_scan(body: Callable, init, xs, segment: int):
    """``lax.scan(body, init, xs)`` whose reverse-mode derivative keeps only every
    ``segment``-th carry (``segment = 0``: a plain scan, which keeps every step's residuals).

    The ``T`` steps are scanned as ``T // segment`` segments, each a ``jax.checkpoint``-ed
    inner scan, then the ``T % segment`` remaining steps as one more checkpointed segment.
    The backward pass recomputes one segment at a time from its stored start carry, so
    memory is about ``(T / segment + segment)`` carries instead of ``T``: ``O(sqrt(T))`` at
    ``segment = sqrt(T)``, for one more forward pass of compute. The outputs are stacked
    along time as by ``lax.scan``, and the values are those of the plain scan.
    """
    if segment <= 0:
        return jax.lax.scan(body, init, xs)
    if segment == 1:
        return jax.lax.scan(jax.checkpoint(body), init, xs)
    T = jax.tree_util.tree_leaves(xs)[0].shape[0]
    n = T // segment
    run = jax.checkpoint(lambda c, x: jax.lax.scan(body, c, x))
    carry, parts = init, []
    if n:
        head = jax.tree_util.tree_map(
            lambda a: a[: n * segment].reshape(n, segment, *a.shape[1:]), xs
        )
        carry, ys = jax.lax.scan(run, carry, head)
        parts.append(jax.tree_util.tree_map(lambda a: a.reshape(n * segment, *a.shape[2:]), ys))
    if T % segment:
        carry, ys = run(carry, jax.tree_util.tree_map(lambda a: a[n * segment :], xs))
        parts.append(ys)
    if len(parts) == 1:
        return carry, parts[0]
    return carry, jax.tree_util.tree_map(lambda *a: jnp.concatenate(a), *parts)


def run_episode(
    rule: AbstractRule,
    net: AbstractNetwork,
    feedback,
    key: PRNGKeyArray,
    episode: Episode,
    *,
    remat: bool | int = False,
    objective: str = "cross_entropy",
    temperature: float = 1.0,
    weight_limit: float = 0.0,
    record: Callable | None = None,
) -> InnerResult:
    """Online learning over ``episode.train_*`` (:func:`scan_episode`), then query metrics.

    The network and (for ``fa``) the feedback matrices are drawn fresh from ``key``.
    ``remat`` checkpoints steps or segments of steps (:func:`segment_length`: less
    memory for reverse-mode meta-gradients, at the cost of recomputing the forward pass).
    ``weight_limit > 0`` stops the episode when a weight exceeds that multiple of its
    layer's largest initial weight (:func:`guard`); the episode then counts as diverged.
    """
    carry0 = start_carry(rule, net, feedback, key)
    if remat == "native":  # the fused numba loop (forward mode only)
        why = native_support(rule, net, feedback, weight_limit)
        if why is not None or record is not None:
            raise MetaplasticError(
                f"train.gradient = 'native' cannot run this: {why or 'a record hook is set'}"
            )
        carry, stopped, outs = native_scan(
            rule, net, feedback, carry0, episode.train_x, episode.train_y
        )
    else:
        carry, stopped, outs = scan_episode(
            rule,
            net,
            feedback,
            carry0,
            (episode.train_x, episode.train_y),
            labelled_signals(net, feedback),
            weight_limit=weight_limit,
            remat=remat,
            record=record,
        )
    (losses, corrects), recorded = outs if record is not None else (outs, None)
    state = carry.net
    qloss, qacc = query_metrics(
        net, state, episode.query_x, episode.query_y, objective, temperature
    )
    leaves = jax.tree_util.tree_leaves(state)
    diverged = ~jnp.all(jnp.array([jnp.all(jnp.isfinite(w)) for w in leaves]))
    diverged = diverged | ~jnp.isfinite(qloss) | stopped
    return InnerResult(state, losses, corrects, qloss, qacc, diverged, recorded)
