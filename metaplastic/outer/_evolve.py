"""Evolve the coefficients of any training procedure: a generic evosax loop.

:class:`~metaplastic.outer._evolution.EvolutionTrainer` meta-learns a plasticity *rule* on a
:class:`~metaplastic.tasks._problem.Problem`. Studies that wrap their own training procedure (say,
mini-batch SGD plus a synaptic-scaling step whose coefficients are to be learned) need the
same machinery on a plain function instead: :func:`evolve` takes ``fitness(params, key)``
(lower is better, jittable) and runs one jitted generation per step, with every member and
the current mean evaluated on the **same** key (common random numbers), non-finite fitness
replaced as in the rule trainer, and a progress bar.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PRNGKeyArray

from .._errors import MetaplasticError
from ._evolution import finite_fitness, make_strategy, search_center, strategy_init


class EvolveResult(NamedTuple):
    """The final search mean, the best member seen, and one history row per generation."""

    params: Any
    best_params: Any
    best_fitness: float
    history: list[dict]


def evolve(
    fitness: Callable[[Any, PRNGKeyArray], jax.Array],
    init: Any,
    key: PRNGKeyArray,
    *,
    strategy: str = "open_es",
    population: int = 16,
    generations: int = 20,
    sigma: float = 0.1,
    lr: float = 0.05,
    fitness_shaping: str = "centered_rank",
    penalty: float = -1.0,
    progress: bool = True,
    desc: str = "evolve",
) -> EvolveResult:
    """Minimise ``fitness(params, key)`` over the pytree ``init`` with an evosax strategy.

    History rows hold ``generation``, ``mean_fitness`` (the search mean's fitness on that
    generation's key), ``best_member``, ``median_member``, ``diverged`` (non-finite member
    evaluations) and ``params`` (the mean, as nested lists).
    """
    if generations < 1:
        raise MetaplasticError(f"evolve: generations must be at least 1, got {generations}")
    strat, es_params = make_strategy(
        strategy, init, population, sigma, lr=lr, fitness_shaping=fitness_shaping
    )
    k_init, key = jax.random.split(key)
    state = strategy_init(strat, k_init, init, es_params, sigma)
    state = jax.tree_util.tree_map(
        lambda x: jax.lax.convert_element_type(x, jnp.asarray(x).dtype), state
    )

    @jax.jit
    def generation(state, key):
        k_ask, k_tell, k_fit = jax.random.split(key, 3)
        members, state = strat.ask(k_ask, state, es_params)
        mean = search_center(strat, state)
        both = jax.tree_util.tree_map(lambda m, x: jnp.concatenate([m, x[None]]), members, mean)
        raw_all = jax.vmap(lambda p: fitness(p, k_fit))(both)
        raw, mean_fit = raw_all[:-1], raw_all[-1]
        fit, finite, n_bad, _ = finite_fitness(raw, penalty)
        state, _ = strat.tell(k_tell, members, fit, state, es_params)
        i_best = jnp.argmin(jnp.where(finite, raw, jnp.inf))
        best = jax.tree_util.tree_map(lambda x: x[i_best], members)
        stats = {
            "mean_fitness": mean_fit,
            "best_member": raw[i_best],
            "median_member": jnp.nanmedian(jnp.where(finite, raw, jnp.nan)),
            "diverged": n_bad,
        }
        return state, stats, mean, best

    history: list[dict] = []
    best_params, best_fit = init, np.inf
    bar = range(generations)
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(bar, desc=desc, leave=False)
    for g in bar:
        key, k = jax.random.split(key)
        state, stats, mean, best = generation(state, k)
        row = {k_: float(v) for k_, v in stats.items()}
        row["generation"] = g
        row["params"] = jax.tree_util.tree_map(lambda x: np.asarray(x).tolist(), mean)
        history.append(row)
        if np.isfinite(row["best_member"]) and row["best_member"] < best_fit:
            best_fit, best_params = row["best_member"], best
        if progress:
            bar.set_postfix(mean=f"{row['mean_fitness']:.4f}", best=f"{row['best_member']:.4f}")
    return EvolveResult(search_center(strat, state), best_params, float(best_fit), history)
