"""Gradient outer loop: optax on the rule's coefficients, meta-gradients through the unroll."""

from __future__ import annotations

import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, PRNGKeyArray

from .._errors import MetaplasticError, unknown_name
from ..inner._native import native_support
from ..inner._reconstruct import require_reconstructable
from ..rules._rules import AbstractRule
from ..tasks._problem import Problem
from ._sharding import WHOLE_SHARE, AxisSharding
from ._trainer import AbstractTrainer, register_trainer

OPTIMIZERS = {
    "adam": optax.adam,
    "adamw": optax.adamw,
    "sgd": optax.sgd,
    "rmsprop": optax.rmsprop,
    "lion": optax.lion,
}
GRADIENT_MODES = ("auto", "forward", "reverse", "checkpoint", "reconstruct", "native")
#: ``auto`` uses forward mode up to this many live coefficients (its cost grows with the
#: number of coefficients); above, plain reverse mode while its stored steps fit in
#: :data:`AUTO_REVERSE_MAX_MB`, else checkpointed reverse mode. Measured at the reference
#: size on this project's CPU (ms per episode, T = 250): the 3-term pool at meta-batch 8
#: (results/bench/reference_pool_cpu.json) took 73 by forward mode, 512 by plain reverse
#: mode (peak RSS 2.3 / 4.0 / 12.3 GB at T = 250 / 1000 / 4000), 605 by checkpointing and
#: 1,762 by reconstruction (both flat at 2.3 GB); the 81-monomial Taylor rule at meta-batch
#: 1 (results/bench/reference_taylor_cpu.json) 10,632 by forward mode, 350 by plain reverse
#: mode, 256 by checkpointing and 657 by reconstruction.
FORWARD_MODE_MAX_COEFFS = 16
#: plain reverse mode keeps about REVERSE_BYTES_PER_WEIGHT bytes per weight per step
#: (measured at the reference size: +1.7 GB of peak RSS from T = 250 to 1000 for 178,670
#: weights, 3.2 float32 copies); ``auto`` checkpoints when that would pass this many MB
#: (553 MB for one reference episode: checkpointing is about as fast there, and its memory
#: stays flat as episodes grow)
AUTO_REVERSE_MAX_MB = 256.0
REVERSE_BYTES_PER_WEIGHT = 13.0


def reverse_memory_mb(problem, steps: int = 0) -> float:
    """What plain reverse mode would store for ``steps`` updates (default: one episode)
    of ``problem``, in MB (``steps * weights * REVERSE_BYTES_PER_WEIGHT``; 0 when the task
    does not know its episode length in advance)."""
    shapes = jax.eval_shape(problem.net.init, jax.random.key(0))
    weights = sum(math.prod(w.shape) for w in jax.tree_util.tree_leaves(shapes))
    steps = steps or problem.task.episode_length()
    return steps * weights * REVERSE_BYTES_PER_WEIGHT / 2**20


def native_refusal(problem, rule, truncation: int) -> str | None:
    """Why ``train.gradient = "native"`` cannot run this problem, or ``None``."""
    from ..tasks._classification import ClassificationTask

    if type(problem.task) is not ClassificationTask:
        return f"it runs classification episodes only, not task.kind = {problem.task.name!r}"
    if truncation:
        return "it does not truncate episodes: set train.truncation = 0"
    limit = getattr(problem.task, "weight_limit", 0.0)
    return native_support(rule, problem.net, problem.feedback, limit)


def make_optimizer(
    name: str,
    lr: float,
    clip: float | None = None,
    lr_end: float = 1.0,
    steps: int = 0,
) -> optax.GradientTransformation:
    """An optax optimiser by name; ``clip`` adds global-norm clipping of the meta-gradient.

    ``lr_end < 1`` (with ``steps``): the step size follows a cosine from ``lr`` down to
    ``lr * lr_end`` over ``steps`` meta-steps, so the last iterates settle instead of
    jittering by about ``lr`` around the optimum (a constant ``lr`` when ``lr_end = 1``).
    """
    if name not in OPTIMIZERS:
        raise unknown_name("optimizer", name, OPTIMIZERS, "train.outer")
    if not lr > 0:
        raise MetaplasticError(f"train.lr must be positive, got {lr}")
    if lr_end < 1.0 and steps > 0:
        lr = optax.cosine_decay_schedule(lr, steps, alpha=lr_end)
    opt = OPTIMIZERS[name](lr)
    if clip is not None and clip > 0:
        opt = optax.chain(optax.clip_by_global_norm(clip), opt)
    return opt


def bound_gradient(grads, limit: float):
    """Rescale a finite gradient whose largest entry exceeds ``limit`` down to ``limit``.

    Rules that make the inner loop explode can give finite meta-gradients of 1e20 and more.
    Their squares overflow float32 (above ~1.8e19): global-norm clipping then divides by an
    infinite norm and Adam's second moment becomes inf, so every update is exactly 0 and
    training silently stalls with all gradients "finite". Rescaling keeps the direction
    (clipping and Adam are scale-invariant anyway) and is a no-op below ``limit``.
    Returns ``(grads, rescaled)``. Used when ``train.grad_limit > 0``.
    """
    leaves = jax.tree_util.tree_leaves(grads)
    if not leaves:
        return grads, jnp.array(False)
    gmax = jnp.max(jnp.array([jnp.max(jnp.abs(g)) for g in leaves]))
    rescaled = gmax > limit
    scale = jnp.where(rescaled, limit / jnp.where(rescaled, gmax, 1.0), 1.0)
    return jax.tree_util.tree_map(lambda g: g * scale.astype(g.dtype), grads), rescaled


#: A bad meta-step multiplies the step size by this (and reverts the coefficients).
BACKOFF = 0.5
#: Each good meta-step multiplies a backed-off step size by this, up to 1 (the configured lr).
RECOVER = 2.0 ** (1.0 / 16.0)


class OuterState(eqx.Module):
    """The whole outer-loop state: coefficients, optimiser state, PRNG key, counters.

    ``good`` holds the last coefficients whose episodes were finite (where a bad step
    reverts to); ``lr_scale`` multiplies every update (halved by each bad step, regrown by
    good ones); ``skipped`` counts bad steps in total.
    """

    params: AbstractRule  # the array leaves of the rule (eqx.partition); None elsewhere
    opt_state: optax.OptState
    key: Array  # raw key data (jax.random.key_data), so the state serialises as plain arrays
    step: Array
    skipped: Array  # bad meta-steps (non-finite meta-gradient, or most episodes diverged)
    good: AbstractRule = None  # last good coefficients (same structure as params)
    lr_scale: Array = None  # step-size multiplier after back-offs, in (0, 1]
    bad_run: Array = None  # bad meta-steps in a row (0 after a good one)


#: with train.weight_limit, a stopped episode's meta-gradient is scaled to at most this many
#: times the batch's median per-episode norm (GradientTrainer._clip_stopped)
STOPPED_CLIP = 3.0


class GradientTrainer(AbstractTrainer):
    """Meta-learns a rule's coefficients by gradient descent on the meta-loss.

    One call of :meth:`step` is one jitted meta-step: sample ``meta_batch`` episodes, run
    them online (vmapped), differentiate ``mean query CE + l1 * sum|theta|`` with respect to
    the coefficients (forward mode via ``jax.jacfwd`` or reverse mode via ``jax.grad``), and
    apply the optax update. Episodes that blew up (non-finite loss or gradient) are dropped
    from the average and counted in ``diverged``; when more than ``max_diverged`` of them
    blew up, or the gradient is not finite, the step is *bad*: see :meth:`step` (revert and
    back off). Dropping diverged episodes hides the cliff from the gradient, so a step that
    lands where episodes blow up must not be kept.
    """

    problem: Problem
    static: AbstractRule
    optimizer: optax.GradientTransformation
    meta_batch: int = eqx.field(static=True)
    l1: float = eqx.field(static=True)
    mode: str = eqx.field(static=True)
    sharding: AxisSharding
    grad_limit: float = eqx.field(static=True)
    max_diverged: float = eqx.field(static=True)
    units: AbstractRule | None = None  # see outer._units; None = raw coefficients
    stopped_clip: float = eqx.field(static=True, default=0.0)
    #: 1/0 per coefficient (a pytree like the rule's parameters): 0 freezes that coefficient
    #: exactly (no gradient reaches the optimiser, no update). None = all trainable. Used to
    #: refit the coefficients left after pruning (``train.prune_refit``).
    trainable: AbstractRule | None = None
    #: > 0: truncated meta-gradients over segments of this many updates (train.truncation)
    truncation: int = eqx.field(static=True, default=0)

    def __init__(
        self,
        problem,
        rule,
        optimizer,
        meta_batch=8,
        l1=0.0,
        mode="auto",
        devices=1,
        vmap_width=0,
        grad_limit=0.0,
        max_diverged=0.25,
        units=None,
        stopped_clip=0.0,
        trainable=None,
        truncation=0,
    ):
        self.units = units
        self.trainable = trainable
        self.stopped_clip = float(stopped_clip)
        self.grad_limit = float(grad_limit)
        self.max_diverged = float(max_diverged)
        if mode not in GRADIENT_MODES:
            raise unknown_name("gradient mode", mode, GRADIENT_MODES, "train.gradient")
        if meta_batch < 1:
            raise MetaplasticError(f"train.meta_batch must be at least 1, got {meta_batch}")
        if truncation < 0:
            raise MetaplasticError(f"train.truncation must be >= 0, got {truncation}")
        if truncation:
            problem.task.check_segments(truncation)
        self.truncation = int(truncation)
        params, static = eqx.partition(rule, eqx.is_inexact_array)
        self.problem = problem
        self.static = static
        self.optimizer = optimizer
        self.meta_batch = int(meta_batch)
        self.l1 = float(l1)
        if mode == "native":
            why = native_refusal(problem, rule, truncation)
            if why:
                raise MetaplasticError(f"train.gradient = 'native' cannot be used: {why}")
            # a device's whole share goes to the native loop in one call, which runs its
            # episodes on parallel threads (each alone: the loop's output per episode does
            # not depend on the batch; the JAX query loss around it is vmapped)
            vmap_width = WHOLE_SHARE
            self.problem = problem = dataclasses.replace(problem, remat="native")
        self.sharding = AxisSharding(devices, self.meta_batch, "meta_batch", vmap_width)
        if mode == "auto":
            n = sum(x.size for x in jax.tree_util.tree_leaves(params))
            if n <= FORWARD_MODE_MAX_COEFFS:
                mode = "forward"
            else:
                big = reverse_memory_mb(problem, truncation) > AUTO_REVERSE_MAX_MB
                mode = "checkpoint" if big else "reverse"
        if mode == "checkpoint" and not problem.remat:  # reverse mode, sqrt(T) segments
            self.problem = dataclasses.replace(problem, remat=-1)
        if mode == "reconstruct":  # reverse mode, carries rebuilt backwards
            require_reconstructable(problem.net)  # one line now, not at the first step
            self.problem = dataclasses.replace(problem, remat="reconstruct")
        self.mode = mode

    @classmethod
    def accepts(cls, outer: str) -> bool:
        return outer in OPTIMIZERS

    @classmethod
    def check_config(cls, train, where: str = "train") -> None:
        """``gradient``, ``units``, ``lr_end``, ``clip``, ``grad_limit`` and ``prune_refit``
        (refitting uses this trainer)."""
        from ._units import UNITS

        if train.gradient not in GRADIENT_MODES:
            raise unknown_name("gradient mode", train.gradient, GRADIENT_MODES, f"{where}.gradient")
        if train.units not in UNITS:
            raise unknown_name("coefficient units", train.units, UNITS, f"{where}.units")
        if not 0.0 <= train.lr_end <= 1.0:
            raise MetaplasticError(
                f"{where}.lr_end must be a fraction of train.lr between 0 and 1, got {train.lr_end}"
            )
        for n in ("clip", "grad_limit", "truncation"):
            if getattr(train, n) < 0:
                raise MetaplasticError(f"{where}.{n} must be >= 0, got {getattr(train, n)}")
        if train.prune_refit > 0 and not cls.accepts(train.outer):
            raise MetaplasticError(
                f"{where}.prune_refit refits with the gradient outer loop; {where}.outer = "
                f"{train.outer!r} is an evolution strategy: set {where}.prune_refit = 0"
            )

    @classmethod
    def from_config(cls, train, problem, rule, *, units_key=None, trainable=None):
        """An optax optimiser ``train.outer`` with the run's step-size schedule, clipping,
        L1, gradient mode, sharding, divergence limits, coefficient units and freezing."""
        from ._units import episode_units

        t = train
        units = None
        if t.units == "episode":
            if units_key is None:
                raise MetaplasticError("train.units = 'episode' needs a probe key (units_key)")
            units = episode_units(problem, rule, units_key)
        return cls(
            problem,
            rule,
            make_optimizer(t.outer, t.lr, t.clip, t.lr_end, t.episodes // t.meta_batch),
            meta_batch=t.meta_batch,
            l1=t.l1,
            mode=t.gradient,
            devices=t.devices,
            vmap_width=t.vmap_width,
            grad_limit=t.grad_limit,
            max_diverged=t.max_step_diverged,
            units=units,
            stopped_clip=STOPPED_CLIP if t.weight_limit > 0 else 0.0,
            trainable=trainable,
            truncation=t.truncation,
        )

    def rule(self, state_or_params) -> AbstractRule:
        params = getattr(state_or_params, "params", state_or_params)
        return eqx.combine(params, self.static)

    def init(self, rule: AbstractRule, key: PRNGKeyArray) -> OuterState:
        params, _ = eqx.partition(rule, eqx.is_inexact_array)
        return OuterState(
            params=params,
            opt_state=self.optimizer.init(params),
            key=jax.random.key_data(key),
            step=jnp.array(0, jnp.int32),
            skipped=jnp.array(0, jnp.int32),
            good=params,
            lr_scale=jnp.array(1.0, jnp.float32),
            bad_run=jnp.array(0, jnp.int32),
        )

    def _to_units(self, tree):
        """``theta / u`` (identity without units)."""
        if self.units is None:
            return tree
        return jax.tree_util.tree_map(lambda x, u: x / u, tree, self.units)

    def _times_units(self, tree):
        """``x * u``: a gradient in theta to one in phi, or a step in phi to one in theta."""
        if self.units is None:
            return tree
        return jax.tree_util.tree_map(lambda x, u: x * u.astype(x.dtype), tree, self.units)

    def _only_trainable(self, tree):
        """Zero the entries of frozen coefficients (identity when all are trainable)."""
        if self.trainable is None:
            return tree
        return jax.tree_util.tree_map(lambda x, m: x * m.astype(x.dtype), tree, self.trainable)

    def _clip_stopped(self, grads_b, stopped):
        """Episodes stopped by the weight guard have losses and gradients orders of magnitude
        above the others (the weights sit at the guard's bound). Their direction is what
        matters -- away from the blow-up -- so each is scaled down to at most
        ``stopped_clip`` times the batch's median per-episode gradient norm (measured in the
        optimiser's units), so that one of them cannot swamp the average or Adam's moments.
        """
        sq = 0.0
        for g in jax.tree_util.tree_leaves(self._times_units(grads_b)):
            sq = sq + jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1)
        norm = jnp.sqrt(sq)
        cap = self.stopped_clip * jnp.median(jnp.where(jnp.isfinite(norm), norm, 0.0))
        scale = jnp.where(stopped & (norm > cap), cap / jnp.where(norm > 0, norm, 1.0), 1.0)
        return jax.tree_util.tree_map(
            lambda g: g * scale.reshape((-1,) + (1,) * (g.ndim - 1)).astype(g.dtype), grads_b
        )

    def loss_and_grad(self, params, keys):
        """``(grads, aux)`` of the meta-loss at ``params`` on the episodes of ``keys``.

        Each episode's gradient is computed separately (vmapped, split over the devices),
        gathered, then averaged, so the result does not depend on the device count.
        """

        def per_episode(p, key):
            res = self.problem.episode(eqx.combine(p, self.static), key)
            return res.query_loss, (res.query_loss, res.query_accuracy, res.diverged)

        forward = self.mode in ("forward", "native")
        grad_fn = (jax.jacfwd if forward else jax.grad)(per_episode, has_aux=True)

        def one(key_data):
            key = jax.random.wrap_key_data(key_data)
            if self.truncation:
                return self._truncated(params, key)
            return grad_fn(params, key)

        grads_b, (ql, qa, dv) = self.sharding.map(one, jax.random.key_data(keys))

        def penalty(p):  # on the coefficients in their units (phi = theta / u)
            return self.l1 * eqx.combine(self._to_units(p), self.static).l1()

        pen, pen_grad = jax.value_and_grad(penalty)(params)
        # Episodes whose loss or gradient is not finite (the rule blew up there) are left out
        # of the average; when every episode is finite this is exactly the plain mean.
        ok = jnp.isfinite(ql)
        for g in jax.tree_util.tree_leaves(grads_b):
            ok = ok & jnp.all(jnp.isfinite(g.reshape(g.shape[0], -1)), axis=1)
        if self.stopped_clip > 0:
            grads_b = self._clip_stopped(grads_b, dv & ok)
        n_ok = jnp.sum(ok.astype(jnp.int32))
        all_ok = n_ok == ok.shape[0]

        def plain(args):
            g, l_, a_ = args
            return jax.tree_util.tree_map(lambda x: jnp.mean(x, axis=0), (g, l_, a_))

        def finite_only(args):  # NaN when n_ok == 0: the step is then skipped
            def avg(x):
                okb = ok.reshape((-1,) + (1,) * (x.ndim - 1))
                return jnp.sum(jnp.where(okb, x, 0.0), axis=0) / n_ok

            return jax.tree_util.tree_map(avg, args)

        # lax.cond keeps the all-finite branch exactly the plain mean (same compiled reduction)
        g_mean, qloss, qacc = jax.lax.cond(all_ok, plain, finite_only, (grads_b, ql, qa))
        grads = jax.tree_util.tree_map(lambda g, h: g + h, g_mean, pen_grad)
        aux = {
            "loss": qloss + pen,
            "query_loss": qloss,
            "query_accuracy": qacc,
            "diverged": jnp.sum((dv | ~ok).astype(jnp.int32)),
            # left out of the average (not finite); episodes stopped by train.weight_limit
            # are diverged but finite: they stay in, their gradient points off the cliff
            "dropped": jnp.sum((~ok).astype(jnp.int32)),
        }
        return grads, aux

    def _truncated(self, params, key):
        """Truncated meta-gradient of one episode: ``(grads, (loss, accuracy,
        diverged))``.

        The episode is cut into ``n`` segments of ``truncation`` updates; segment ``k``
        starts from the carry segment ``k - 1`` ended with (passed on without gradient)
        and its loss ``L_k`` (:meth:`AbstractTask.run_segment`: the task's query loss at
        the segment's end) is differentiated through that segment alone, inside the scan
        over segments, so only one segment's residuals are ever alive. The episode's
        meta-loss is ``mean_k L_k``, its gradient ``mean_k dL_k/dtheta`` (the terms that
        cross a segment boundary are what truncation drops); accuracy and divergence are
        those at the last segment's end."""
        pb = self.problem
        rule0 = eqx.combine(params, self.static)
        carry0, xs, ctx = pb.task.segments(
            rule0, pb.net, pb.feedback, key, pb.pool, self.truncation
        )
        diff = jax.jacfwd if self.mode == "forward" else jax.grad

        def body(state, inp):
            carry, stopped = state
            seg, index = inp

            def f(p):
                out = pb.task.run_segment(
                    eqx.combine(p, self.static),
                    pb.net,
                    pb.feedback,
                    carry,
                    stopped,
                    seg,
                    index,
                    ctx,
                    remat=pb.remat,
                )
                return out[2], out

            g, (new, now, loss, acc, dv) = diff(f, has_aux=True)(params)
            return (jax.lax.stop_gradient(new), now), (g, loss, acc, dv)

        n = jax.tree_util.tree_leaves(xs)[0].shape[0]
        init = (carry0, jnp.array(False))
        _, (gs, losses, accs, dvs) = jax.lax.scan(body, init, (xs, jnp.arange(n)))
        g = jax.tree_util.tree_map(lambda a: jnp.mean(a, axis=0), gs)
        return g, (jnp.mean(losses), accs[-1], dvs[-1])

    @eqx.filter_jit
    def step(self, state: OuterState) -> tuple[OuterState, dict]:
        """One meta-step. A *bad* step -- a non-finite meta-gradient, or more than
        ``max_diverged`` of the meta-batch's episodes diverged (``train.max_step_diverged``)
        -- does not update: the coefficients go back to the
        last good ones (``state.good``, the coefficients before the update that led here),
        the optimiser state is kept exactly, and the step size is halved (``lr_scale``); each
        good step regrows it by ``2**(1/16)`` up to 1. So a rule at the edge of a cliff
        steps back and approaches it more carefully instead of freezing there."""
        key, sub = jax.random.split(jax.random.wrap_key_data(state.key))
        keys = jax.random.split(sub, self.meta_batch)
        grads, aux = self.loss_and_grad(state.params, keys)
        leaves = jax.tree_util.tree_leaves(grads)
        finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(g)) for g in leaves]))
        good = finite & (aux["dropped"] <= self.max_diverged * self.meta_batch)
        safe = jax.tree_util.tree_map(lambda g: jnp.where(finite, g, 0.0), grads)
        # with units the optimiser works on phi = theta / u: its gradient is g * u, and its
        # step in phi is a step of (step * u) in theta
        safe = self._only_trainable(self._times_units(safe))
        extra = {}
        if self.mode == "reconstruct":  # the drift monitor, on the meta-batch's first episode
            pb = self.problem
            extra["reconstruction_drift"] = pb.task.reconstruction_drift(
                self.rule(state.params), pb.net, pb.feedback, keys[0], pb.pool, pb.remat
            )
        if self.grad_limit > 0:  # off by default: see TrainConfig.grad_limit
            safe, extra["grad_rescaled"] = bound_gradient(safe, self.grad_limit)
        updates, new_opt = self.optimizer.update(
            safe, state.opt_state, self._to_units(state.params)
        )
        updates = self._only_trainable(self._times_units(updates))
        updates = jax.tree_util.tree_map(lambda u: u * state.lr_scale.astype(u.dtype), updates)
        new_params = optax.apply_updates(state.params, updates)

        def pick(new, old):
            return jax.tree_util.tree_map(lambda n, o: jnp.where(good, n, o), new, old)

        lr_scale = jnp.where(
            good, jnp.minimum(1.0, state.lr_scale * RECOVER), state.lr_scale * BACKOFF
        )
        new_state = OuterState(
            params=pick(new_params, state.good),
            opt_state=pick(new_opt, state.opt_state),
            key=jax.random.key_data(key),
            step=state.step + 1,
            skipped=state.skipped + (~good).astype(jnp.int32),
            good=pick(state.params, state.good),
            lr_scale=lr_scale.astype(jnp.float32),
            bad_run=jnp.where(good, 0, state.bad_run + 1).astype(jnp.int32),
        )
        aux = dict(aux, grad_finite=finite, step_ok=good, lr_scale=lr_scale, **extra)
        return new_state, aux


register_trainer("gradient", GradientTrainer)
