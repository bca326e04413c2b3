"""Reverse-mode meta-gradients of an episode by weight reconstruction.

Reverse mode through the inner ``lax.scan`` normally stores every step's weights: ``T``
copies of the network. But a plasticity step is usually *invertible* once its signals are
known: with the step's pre- and post-synaptic activities and errors fixed, the new carry is
``c_{t+1} = c_t + D(c_t)`` where the increment ``D`` (the rule's ``dW``, the plastic
feedback's ``dB``, the running averages' update) is small and depends on ``c_t`` only
weakly (``-eta y^2 W`` for Oja, ``-lambda W`` for decay). So ``c_t`` is the fixed point of

    c  <-  c_{t+1} - D(c),

which converges from ``c = c_{t+1}`` at the rate ``||dD/dc||`` (one iteration is exact when
no term reads the weights). :func:`reconstructed_scan` therefore stores only the per-step
signals (vectors: ``x``, ``y``, ``e`` per layer) and the guard's per-step stop flags, and
its backward pass walks the episode backwards: rebuild ``c_t`` from ``c_{t+1}``, recompute
step ``t`` from it and take that step's vector-Jacobian product. Memory is the signals plus
a few carries, flat in ``T`` up to the vectors; compute is about two forward passes plus the
fixed-point iterations.

Rounding makes the rebuilt carries drift from the true ones; :func:`reconstruction_drift`
measures it (the rebuilt ``c_0`` against the stored one). Where the increment is not a
contraction (a rule whose ``dW`` grows faster than ``W``) the iteration does not converge
and the drift shows it. With anchors (the true carry stored every ``every`` steps) the
backward pass works segment by segment and falls back to checkpointing where rebuilding
fails: a segment whose steps do not all invert, or whose rebuilt start misses its anchor by
more than :data:`DRIFT_LIMIT`, is recomputed forward from the anchor instead (``every``
carries of scratch), so the meta-gradient stays exact and the cost is paid only where
needed. Networks that change their weights after the rule
(:meth:`AbstractNetwork.after_update`, e.g. a clamp) cannot be inverted at all:
:func:`require_reconstructable` refuses them, and checkpointing is the mode for them.
"""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp

from .._errors import MetaplasticError
from ._network import AbstractNetwork

#: fixed-point iterations per step at most (the iteration stops earlier once converged)
MAX_ITERATIONS = 32
#: a step counts as inverted when the last iteration changed the carry by at most this many
#: float epsilons (relative to its largest entry)
CONVERGED_EPS = 64.0
#: the largest drift (relative to the carry's size) tolerated at an anchor in the backward
#: pass; beyond it, or where a step was not inverted, the segment is recomputed forward from
#: its anchor (without anchors the meta-gradient is NaN instead, so the outer loop counts
#: the episode as diverged rather than use a wrong gradient)
DRIFT_LIMIT = 1e-4


def require_reconstructable(net: AbstractNetwork) -> None:
    """Refuse, in one line, a network whose episodes cannot be rebuilt backwards."""
    if type(net).after_update is not AbstractNetwork.after_update:
        raise MetaplasticError(
            f"train.gradient = 'reconstruct' cannot be used: the network {type(net).__name__} "
            "changes its weights after the rule (after_update), which cannot be undone step "
            "by step; use train.gradient = 'checkpoint'"
        )


def _max_abs(tree) -> jax.Array:
    leaves = [jnp.max(jnp.abs(x)) for x in jax.tree_util.tree_leaves(tree) if x.size]
    return jnp.max(jnp.stack(leaves)) if leaves else jnp.zeros(())


def _invert(advance: Callable, c_next, sig):
    """``(c, ok)``: ``c`` with ``advance(c, sig) == c_next``, by the fixed-point iteration
    ``c <- c_next - (advance(c, sig) - c)`` from ``c = c_next``; ``ok`` when it converged
    (it does not where the increment changes faster than the carry, e.g. Oja's term with
    ``eta |y|^2 > 1``)."""
    leaves = jax.tree_util.tree_leaves(c_next)
    eps = jnp.finfo(leaves[0].dtype).eps if leaves else 1e-7
    tol = 2.0 * eps * jnp.maximum(_max_abs(c_next), 1.0)

    def update(c):
        inc = jax.tree_util.tree_map(jnp.subtract, advance(c, sig), c)
        return jax.tree_util.tree_map(jnp.subtract, c_next, inc)

    def cond(s):
        i, _, change = s
        return (i < MAX_ITERATIONS) & (change > tol)

    def body(s):
        i, c, _ = s
        new = update(c)
        return i + 1, new, _max_abs(jax.tree_util.tree_map(jnp.subtract, new, c))

    first = update(c_next)
    change = _max_abs(jax.tree_util.tree_map(jnp.subtract, first, c_next))
    _, c, change = jax.lax.while_loop(cond, body, (jnp.array(1), first, change))
    ok = jnp.isfinite(change) & (change <= CONVERGED_EPS / 2.0 * tol)
    return c, ok


def _is_cotangent(x) -> bool:
    return eqx.is_array(x) and x.dtype != jax.dtypes.float0


def _select(flag, a, b):
    return jax.tree_util.tree_map(lambda x, y: jnp.where(flag, x, y), a, b)


def _forward(signals, advance, stop, p_static, every: int):
    """The plain forward scan, also returning each step's signals and stop flag and the
    carry before every ``every``-th step (the anchors; none when ``every = 0``)."""

    def scan_fwd(pd, carry0, xs):
        p = eqx.combine(pd, p_static)
        T = jax.tree_util.tree_leaves(xs)[0].shape[0]
        n = anchors_count(T, every)
        anchors = jax.tree_util.tree_map(lambda a: jnp.zeros((n, *a.shape), a.dtype), carry0)

        def body(state, inp):
            carry, stopped, anchors = state
            x, t = inp
            if every:
                anchors = jax.lax.cond(
                    t % every == 0,
                    lambda a: jax.tree_util.tree_map(
                        lambda buf, c: buf.at[t // every].set(c), a, carry
                    ),
                    lambda a: a,
                    anchors,
                )
            sig, out = signals(p, carry, x)
            new = advance(p, carry, sig)
            now = stopped | stop(p, carry, new)
            return (_select(now, carry, new), now, anchors), (out, sig, now)

        init = (carry0, jnp.array(False), anchors)
        (carry, stopped, anchors), ys = jax.lax.scan(body, init, (xs, jnp.arange(T)))
        return (carry, stopped), ys, anchors

    return scan_fwd


def reconstructed_scan(
    signals: Callable,
    advance: Callable,
    stop: Callable,
    params,
    carry0,
    xs,
    every: int = 0,
):
    """A scan over ``xs`` whose reverse-mode derivative rebuilds the carries backwards.

    One step: ``signals(params, carry, x) -> (sig, out)`` (the step's signals and per-step
    outputs), ``advance(params, carry, sig) -> carry'`` (the update given the signals), and
    ``stop(params, carry, carry') -> bool`` (the guard: when true the carry stays at
    ``carry``, and it stays stopped). ``params``: the differentiated parameters (a pytree;
    its floating arrays get gradients); ``carry0`` a pytree of floating arrays. Returns
    ``((carry_T, stopped), outs)`` as the equivalent ``lax.scan`` would. Only reverse mode is
    defined (``jax.grad``, ``jax.vjp``), not ``jax.jvp``/``jax.jacfwd``.

    ``every > 0`` also stores the carry before every ``every``-th step (anchors) and restarts
    the backward reconstruction from them, so rounding errors grow over at most ``every``
    steps instead of ``T`` (memory: ``T / every`` carries), and a segment that cannot be
    rebuilt (a step that does not invert, or drift past :data:`DRIFT_LIMIT` at its anchor)
    is recomputed forward from its anchor instead (``every`` more carries of scratch): the
    meta-gradient is then exact whatever the rule. ``every = 0`` stores none, and a carry
    that cannot be rebuilt, or a rebuilt ``c_0`` that misses the true one by more than
    :data:`DRIFT_LIMIT`, makes the meta-gradient NaN.
    """
    p_dyn, p_static = eqx.partition(params, eqx.is_inexact_array)
    scan_fwd = _forward(signals, advance, stop, p_static, every)

    @jax.custom_vjp
    def run(pd, carry0, xs):  # not differentiated: no anchors needed
        (carry, stopped), (outs, _, _), _ = _forward(signals, advance, stop, p_static, 0)(
            pd, carry0, xs
        )
        return (carry, stopped), outs

    def run_fwd(pd, carry0, xs):
        (carry, stopped), (outs, sigs, stops), anchors = scan_fwd(pd, carry0, xs)
        return ((carry, stopped), outs), (pd, xs, carry0, carry, sigs, stops, anchors)

    def run_bwd(res, ct):
        pd, xs, carry0, carry_T, sigs, stops, anchors = res
        T = stops.shape[0]
        (ct_carry, _), ct_outs = ct
        p = eqx.combine(pd, p_static)
        xs_dyn, xs_static = eqx.partition(xs, eqx.is_inexact_array)
        ct_outs = eqx.filter(ct_outs, _is_cotangent)
        zero_g = jax.tree_util.tree_map(jnp.zeros_like, pd)

        def step_vjp(carry, lam, inp):
            """``(g_params, lam_before, g_x)`` of one step taken from ``carry``."""
            now, x_dyn, x_static, ct_out = inp

            def f(pd, carry, x_dyn):
                q = eqx.combine(pd, p_static)
                s, out = signals(q, carry, eqx.combine(x_dyn, x_static))
                new = advance(q, carry, s)
                return _select(now, carry, new), eqx.filter(out, eqx.is_inexact_array)

            _, vjp = jax.vjp(f, pd, carry, x_dyn)
            return vjp((lam, ct_out))

        def rebuild_back(acc, inp):
            """One step backwards: rebuild the carry before it, then its VJP."""
            carry_next, lam, g, ok = acc
            sig, step = inp
            carry, ok_t = _rebuild(lambda c, s: advance(p, c, s), carry_next, sig, step[0])
            g_p, lam_prev, g_x = step_vjp(carry, lam, step)
            return (carry, lam_prev, _add(g, g_p), ok & ok_t), g_x

        steps = (stops, xs_dyn, xs_static, ct_outs)
        if not every:
            init = (carry_T, ct_carry, zero_g, jnp.array(True))
            (c0, lam0, g, ok), g_xs = jax.lax.scan(rebuild_back, init, (sigs, steps), reverse=True)
            ok = ok & (_drift(c0, carry0) <= DRIFT_LIMIT)
            # a carry that could not be rebuilt, or a rebuilt start that misses the true one,
            # makes the whole meta-gradient NaN: the outer loop then drops the episode as
            # diverged instead of stepping along a wrong gradient (with anchors, the
            # segment is recomputed instead, below)
            g, lam0 = jax.tree_util.tree_map(lambda a: jnp.where(ok, a, jnp.nan), (g, lam0))
            return g, lam0, eqx.combine(g_xs, jax.tree_util.tree_map(lambda _: None, xs_static))

        # with anchors: segments of `every` steps, backwards. Each is first rebuilt from
        # its end; where a step does not invert or the rebuilt start misses the stored
        # anchor by more than DRIFT_LIMIT, the segment is recomputed forward from its anchor
        # instead (checkpointing: `every` carries), so the meta-gradient stays exact
        n = anchors_count(T, every)
        pad = n * every - T  # the last segment's missing steps: stopped, no cotangent
        segs = _segments((sigs, (stops, xs_dyn, xs_static)), every, pad, edge=True)
        segs = (segs[0], (*segs[1], _segments(ct_outs, every, pad, edge=False)))
        segs = (segs[0], (segs[1][0].at[-1, every - pad :].set(True), *segs[1][1:]))

        def segment(acc, inp):
            carry_end, lam = acc
            (seg_sigs, seg_steps), anchor = inp
            init = (carry_end, lam, zero_g, jnp.array(True))
            (start, lam_r, g_r, ok), gx_r = jax.lax.scan(
                rebuild_back, init, (seg_sigs, seg_steps), reverse=True
            )
            ok = ok & (_drift(start, anchor) <= DRIFT_LIMIT)

            def recompute(_):
                def fwd(c, inp):
                    sig, now = inp
                    return _select(now, c, advance(p, c, sig)), c

                _, carries = jax.lax.scan(fwd, anchor, (seg_sigs, seg_steps[0]))

                def back(acc, inp):
                    lam, g = acc
                    g_p, lam_prev, g_x = step_vjp(inp[0], lam, inp[1])
                    return (lam_prev, _add(g, g_p)), g_x

                (lam_c, g_c), gx_c = jax.lax.scan(
                    back, (lam, zero_g), (carries, seg_steps), reverse=True
                )
                return lam_c, g_c, gx_c

            lam_prev, g_seg, gx = jax.lax.cond(ok, lambda _: (lam_r, g_r, gx_r), recompute, None)
            return (anchor, lam_prev), (g_seg, gx)

        (_, lam0), (g_segs, g_xs) = jax.lax.scan(
            segment, (carry_T, ct_carry), (segs, anchors), reverse=True
        )
        g = jax.tree_util.tree_map(lambda a: jnp.sum(a, axis=0), g_segs)
        g_xs = jax.tree_util.tree_map(lambda a: a.reshape(n * every, *a.shape[2:])[:T], g_xs)
        return g, lam0, eqx.combine(g_xs, jax.tree_util.tree_map(lambda _: None, xs_static))

    run.defvjp(run_fwd, run_bwd)
    return run(p_dyn, carry0, xs)


def _add(a, b):
    return jax.tree_util.tree_map(jnp.add, a, b)


def anchors_count(T: int, every: int) -> int:
    """Anchors stored for ``T`` steps at one every ``every`` steps (``ceil(T / every)``)."""
    return -(-T // every) if every else 0


def _segments(tree, every: int, pad: int, *, edge: bool):
    """Per-step arrays ``(T, ...)`` as segments ``(n, every, ...)``, the last padded by
    ``pad`` steps (copies of the last step with ``edge``, else zeros)."""

    def cut(a):
        if pad:
            fill = (
                jnp.repeat(a[-1:], pad, axis=0) if edge else jnp.zeros((pad, *a.shape[1:]), a.dtype)
            )
            a = jnp.concatenate([a, fill])
        return a.reshape(-1, every, *a.shape[1:])

    return jax.tree_util.tree_map(cut, tree)


def _rebuild(advance: Callable, carry_next, sig, now):
    """``(carry, ok)``: the carry before a step (the same carry where the guard stopped the
    step) and whether it could be rebuilt."""
    carry, ok = _invert(advance, carry_next, sig)
    return _select(now, carry_next, carry), ok | now


def _anchor(anchors, t, every: int):
    """The stored carry of the anchor at or before step ``t``."""
    return jax.tree_util.tree_map(lambda a: a[t // every], anchors)


def _drift(carry, true):
    tiny = jnp.finfo(jnp.float32).tiny
    diff = _max_abs(jax.tree_util.tree_map(jnp.subtract, carry, true))
    return diff / jnp.maximum(_max_abs(true), tiny)


def reconstruction_drift(signals, advance, stop, params, carry0, xs, every: int = 0):
    """How far the carries rebuilt backwards drift from the true ones: the largest
    ``|rebuilt c_t - c_t|`` over the carry's entries at the steps where the true carry is
    known (``t = 0``, and every anchor with ``every > 0``), relative to ``max |c_t|``
    (arguments as :func:`reconstructed_scan`); ``inf`` when a step could not be inverted at
    all. Rounding alone gives about ``sqrt(every)`` float epsilons. Terms that contract the
    weights (Oja's ``-eta y y^T W``) have inverses that expand them, so errors grow
    exponentially over the steps between anchors. Where this exceeds :data:`DRIFT_LIMIT` at
    an anchor or a step is not inverted, the backward pass of :func:`reconstructed_scan`
    recomputes that segment forward (without anchors: a NaN meta-gradient)."""
    p_dyn, p_static = eqx.partition(params, eqx.is_inexact_array)
    p = eqx.combine(p_dyn, p_static)
    scan_fwd = _forward(signals, advance, stop, p_static, every)
    (carry_T, _), (_, sigs, stops), anchors = scan_fwd(p_dyn, carry0, xs)
    T = stops.shape[0]

    def back(state, inp):
        carry_next, worst = state
        sig, now, t = inp
        carry, ok = _rebuild(lambda c, s: advance(p, c, s), carry_next, sig, now)
        worst = jnp.where(ok, worst, jnp.inf)
        if every:
            true = _anchor(anchors, t, every)
            at = t % every == 0
            worst = jnp.where(at, jnp.maximum(worst, _drift(carry, true)), worst)
            carry = _select(at, true, carry)
        return (carry, worst), None

    (rebuilt, worst), _ = jax.lax.scan(
        back, (carry_T, jnp.zeros(())), (sigs, stops, jnp.arange(T)), reverse=True
    )
    return worst if every else jnp.maximum(worst, _drift(rebuilt, carry0))
