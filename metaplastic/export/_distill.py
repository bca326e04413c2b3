"""Distillation: fit a sparse polynomial (the 81-monomial Taylor library) to a learned rule.

The rule's outputs are sampled on the signals the network actually produced while learning
meta-train episodes with that rule (random synapses at every online step of every layer);
a sparse linear regression over the monomials ``x^a y^b W^c e^d`` (a,b,c,d in 0..2) is fitted
by sequentially thresholded least squares (``stlsq``, as in SINDy) or scikit-learn's
``Lasso``; R^2 is reported on held-out samples, and the polynomial becomes a
:class:`~metaplastic.rules._rule_kinds.TaylorRule` that is evaluated next to the original rule.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .._errors import MetaplasticError, unknown_name
from ..rules._rule_kinds import MONOMIALS, TaylorRule
from ..rules._rules import AbstractRule
from ..rules._signals import LocalSignals

METHODS = ("stlsq", "lasso")
DEFAULT_ALPHA = {"stlsq": 0.01, "lasso": 1e-3}


def collect_synapses(problem, rule: AbstractRule, key, episodes: int, per_layer_step: int):
    """``(features, targets)``: rows ``[x_j, y_i, W_ij, e_i]`` and the rule's ``dW_ij`` at
    ``per_layer_step`` random synapses of every layer at every online step, recorded inside
    the task's own episode scan (``record`` of :func:`metaplastic.inner.scan_episode`)."""
    net = problem.net

    def episode(k):
        k_run, k_pick = jax.random.split(k)

        def record(carry, pres, posts, errs, t):
            kk = jax.random.fold_in(k_pick, t)
            rows = []
            for layer, W in enumerate(carry.net.W):
                s = LocalSignals(
                    x=pres[layer], y=posts[layer], e=errs[layer + 1], e_pre=errs[layer], W=W
                )
                dW = rule(layer, s)
                ki, kj = jax.random.split(jax.random.fold_in(kk, layer))
                i = jax.random.randint(ki, (per_layer_step,), 0, W.shape[0])
                j = jax.random.randint(kj, (per_layer_step,), 0, W.shape[1])
                rows.append(jnp.stack([s.x[j], s.y[i], W[i, j], s.e[i], dW[i, j]], axis=1))
            return jnp.concatenate(rows)

        res = problem.task.run(rule, net, problem.feedback, k_run, problem.pool, record=record)
        return res.record.reshape(-1, 5)

    rows = jax.jit(jax.vmap(episode))(jax.random.split(key, episodes))
    rows = np.asarray(rows, np.float64).reshape(-1, 5)
    rows = rows[np.all(np.isfinite(rows), axis=1)]
    return rows[:, :4], rows[:, 4]


def library(features: np.ndarray) -> np.ndarray:
    """The 81 monomials of each feature row, in :data:`MONOMIALS` order."""
    x, y, w, e = (features[:, k] for k in range(4))
    cols = [x**a * y**b * w**c * e**d for a, b, c, d in MONOMIALS]
    return np.stack(cols, axis=1)


def _r2(y, pred) -> float:
    ss = float(np.sum((y - y.mean()) ** 2))
    return 1.0 - float(np.sum((y - pred) ** 2)) / ss if ss > 0 else float("nan")


def fit_sparse(phi: np.ndarray, y: np.ndarray, method: str, alpha: float) -> np.ndarray:
    """Sparse coefficients ``theta`` with ``phi @ theta ~ y`` (columns standardised
    internally; ``alpha`` is in standardised units)."""
    if method not in METHODS:
        raise unknown_name("distillation method", method, METHODS, "--method")
    scale = phi.std(axis=0)
    const = scale < 1e-12
    scale[const] = 1.0
    z = phi / scale
    ys = y.std() or 1.0
    t = y / ys
    if method == "lasso":
        from sklearn.linear_model import Lasso

        model = Lasso(alpha=alpha, fit_intercept=False, max_iter=20000)
        model.fit(z, t)
        coef = model.coef_
    else:
        live = np.ones(z.shape[1], bool)
        coef = np.zeros(z.shape[1])
        for _ in range(20):
            sol, *_ = np.linalg.lstsq(z[:, live], t, rcond=None)
            coef = np.zeros(z.shape[1])
            coef[live] = sol
            keep = np.abs(coef) >= alpha
            if np.array_equal(keep, live):
                break
            live = keep
            if not live.any():
                break
    return coef * ys / scale


def distill(problem, rule, key, episodes: int, samples: int, method: str, alpha: float | None):
    """Fit the library to ``rule``; returns ``(taylor_rule, info)``."""
    if rule.uses_state():
        raise MetaplasticError(
            "distillation fits x, y, W, e monomials; this rule reads per-neuron state, which "
            "the library does not have"
        )
    alpha = DEFAULT_ALPHA.get(method, 0.0) if alpha is None else alpha
    if not alpha >= 0:
        raise MetaplasticError("--alpha must be >= 0")
    steps = problem.task.episode_length() or 100
    per = max(1, -(-samples // (episodes * steps * problem.net.n_layers)))
    feats, target = collect_synapses(problem, rule, key, episodes, per)
    if len(target) < 100:
        raise MetaplasticError("fewer than 100 finite synapse samples; the rule diverges")
    rng = np.random.default_rng(0)
    order = rng.permutation(len(target))[: max(samples, 100)]
    feats, target = feats[order], target[order]
    n_fit = int(0.8 * len(target))
    phi = library(feats)
    theta = fit_sparse(phi[:n_fit], target[:n_fit], method, alpha)
    r2 = _r2(target[n_fit:], phi[n_fit:] @ theta)
    poly = TaylorRule(theta.astype(np.float32), mask=(theta != 0).tolist())
    info = {
        "method": method,
        "alpha": alpha,
        "samples": int(len(target)),
        "fit_samples": n_fit,
        "r2": r2,
        "n_terms": int(np.count_nonzero(theta)),
    }
    return poly, info
