"""Evolution-strategy outer loop: evosax strategies on the rule's coefficients.

Only the rule's inexact-array leaves evolve (``eqx.partition(rule, eqx.is_inexact_array)``).
evosax **minimises**, and the fitness we pass is the query error rate (default) or the
meta-loss (query cross-entropy), each plus ``l1 * sum|theta|``, so lower is better throughout.
"""

from __future__ import annotations

import inspect
from typing import Any

import equinox as eqx
import evosax.algorithms as ea
import evosax.core.fitness_shaping as fs
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, PRNGKeyArray

from .._errors import MetaplasticError, unknown_name
from .._meta import Problem
from .._rules import AbstractRule
from .._sharding import AxisSharding

#: Short names for the common strategies; any evosax algorithm class name also works.
STRATEGY_ALIASES = {
    "open_es": "Open_ES",
    "cma_es": "CMA_ES",
    "sep_cma_es": "Sep_CMA_ES",
    "snes": "SNES",
    "xnes": "xNES",
    "pgpe": "PGPE",
    "simple_es": "SimpleES",
    "ars": "ARS",
}
FITNESS_SHAPING = {
    "default": None,
    "centered_rank": fs.centered_rank_fitness_shaping_fn,
    "standardize": fs.standardize_fitness_shaping_fn,
    "normalize": fs.normalize_fitness_shaping_fn,
    "weights": fs.weights_fitness_shaping_fn,
    "identity": fs.identity_fitness_shaping_fn,
}


def strategy_names() -> list[str]:
    classes = [n for n in ea.__all__ if isinstance(getattr(ea, n, None), type)]
    return sorted(set(STRATEGY_ALIASES) | set(classes))


def is_strategy(name: str) -> bool:
    return name in STRATEGY_ALIASES or (
        name in getattr(ea, "__all__", []) and isinstance(getattr(ea, name), type)
    )


def make_strategy(
    name: str,
    solution: Any,
    population: int,
    sigma: float,
    sigma_decay: float = 1.0,
    lr: float = 1e-3,
    antithetic: bool = True,
    fitness_shaping: str = "default",
):
    """An evosax strategy and its params, configured from plain settings.

    ``sigma`` is the initial search scale; ``sigma_decay`` multiplies it every generation
    (strategies that take a schedule); ``lr`` sets the Adam optimiser of strategies that
    update their mean with an optax optimiser (OpenAI-ES, PGPE, SNES, ...).
    """
    if not is_strategy(name):
        raise unknown_name("outer strategy", name, strategy_names(), "train.outer")
    if fitness_shaping not in FITNESS_SHAPING:
        raise unknown_name(
            "fitness shaping", fitness_shaping, FITNESS_SHAPING, "train.fitness_shaping"
        )
    if population < 2:
        raise MetaplasticError(f"train.population must be at least 2, got {population}")
    cls = getattr(ea, STRATEGY_ALIASES.get(name, name))
    accepted = inspect.signature(cls.__init__).parameters
    kwargs: dict[str, Any] = {}
    if "optimizer" in accepted:
        kwargs["optimizer"] = optax.adam(lr)
    if "std_schedule" in accepted:
        kwargs["std_schedule"] = optax.exponential_decay(sigma, 1, sigma_decay)
    if "use_antithetic_sampling" in accepted:
        kwargs["use_antithetic_sampling"] = antithetic
    if FITNESS_SHAPING[fitness_shaping] is not None:
        kwargs["fitness_shaping_fn"] = FITNESS_SHAPING[fitness_shaping]
    if ("use_antithetic_sampling" in accepted and antithetic) or name in ("pgpe", "PGPE"):
        if population % 2:
            raise MetaplasticError(
                f"train.population must be even for {name} with antithetic sampling, "
                f"got {population}"
            )
    try:
        strategy = cls(population_size=population, solution=solution, **kwargs)
    except (AssertionError, TypeError, ValueError) as err:
        raise MetaplasticError(f"train.outer {name!r}: cannot be configured ({err})") from None
    params = strategy.default_params
    if hasattr(params, "std_init"):
        params = params.replace(std_init=jnp.asarray(sigma, dtype=jnp.float32))
    return strategy, params


#: What an ES member's fitness is (evosax minimises it): ``error`` (the default) = query error
#: rate (1 - accuracy) + L1, ``loss`` = the meta-loss (query cross-entropy + L1).
#: Cross-entropy rewards hedging: a rule that makes every output uniform scores ln(N), better
#: than a rule that learns a little but is confidently wrong sometimes, and noisy ES
#: estimates drift into that no-learning optimum (OpenAI-ES on digits reaches chance with
#: ``loss``, README "Gradient vs ES"); the error rate does not reward it.
ES_OBJECTIVES = ("error", "loss")
DEFAULT_ES_OBJECTIVE = "error"


def finite_fitness(raw: Array, penalty: float = -1.0):
    """Replace non-finite fitness values for ``tell``.

    Returns ``(fitness, finite_mask, n_bad, worst)``: non-finite entries become the worst
    finite fitness of the generation (``1e6`` if none is finite), or ``penalty`` if it is
    >= 0; ``worst`` is the worst finite raw fitness (``-inf`` if none).
    """
    finite = jnp.isfinite(raw)
    n_bad = jnp.sum(~finite).astype(jnp.int32)
    worst = jnp.max(jnp.where(finite, raw, -jnp.inf))
    fallback = jnp.where(jnp.isfinite(worst), worst, 1e6)
    fill = fallback if penalty < 0 else jnp.asarray(penalty, raw.dtype)
    return jnp.where(finite, raw, fill), finite, n_bad, worst


class ESState(eqx.Module):
    """Outer-loop state of an evolution strategy (checkpointable: arrays only)."""

    es_state: Any
    key: Array  # raw key data
    step: Array
    skipped: Array  # generations in which every member diverged
    diverged_members: Array  # member evaluations replaced by the penalty, in total


class EvolutionTrainer(eqx.Module):
    """Meta-learns a rule's coefficients with an evosax strategy.

    One :meth:`step` is one jitted generation: ask for ``population`` coefficient vectors,
    evaluate every member (vmapped) on the **same** ``meta_batch`` episodes (common random
    numbers), replace non-finite fitness by the worst finite fitness of the generation (or
    ``penalty`` if it is set, >= 0) and count it, then tell the strategy.
    """

    problem: Problem
    static: AbstractRule
    strategy: Any = eqx.field(static=True)
    es_params: Any
    meta_batch: int = eqx.field(static=True)
    l1: float = eqx.field(static=True)
    penalty: float = eqx.field(static=True)
    mode: str = eqx.field(static=True)
    objective: str = eqx.field(static=True)
    sharding: AxisSharding

    def __init__(
        self,
        problem,
        rule,
        name,
        *,
        population=16,
        sigma=0.01,
        sigma_decay=1.0,
        lr=1e-3,
        antithetic=True,
        fitness_shaping="default",
        meta_batch=8,
        l1=0.0,
        penalty=-1.0,
        devices=1,
        vmap_width=0,
        objective=DEFAULT_ES_OBJECTIVE,
    ):
        if objective not in ES_OBJECTIVES:
            raise unknown_name("ES fitness", objective, ES_OBJECTIVES, "train.es_fitness")
        self.objective = objective
        params, static = eqx.partition(rule, eqx.is_inexact_array)
        self.problem = problem
        self.static = static
        self.strategy, self.es_params = make_strategy(
            name, params, population, sigma, sigma_decay, lr, antithetic, fitness_shaping
        )
        self.meta_batch = int(meta_batch)
        self.l1 = float(l1)
        self.penalty = float(penalty)
        self.sharding = AxisSharding(devices, population, "population", vmap_width)
        self.mode = f"es:{type(self.strategy).__name__}"

    def rule(self, state: ESState) -> AbstractRule:
        mean = self.strategy.get_mean(state.es_state)
        return eqx.combine(mean, self.static)

    def init(self, rule: AbstractRule, key: PRNGKeyArray) -> ESState:
        params, _ = eqx.partition(rule, eqx.is_inexact_array)
        es_state = self.strategy.init(key, params, self.es_params)
        # strong dtypes: a weakly typed leaf in the initial state would make the second
        # generation retrace (and recompile) the whole step
        es_state = jax.tree_util.tree_map(
            lambda x: jax.lax.convert_element_type(x, jnp.asarray(x).dtype), es_state
        )
        return ESState(
            es_state=es_state,
            key=jax.random.key_data(jax.random.fold_in(key, 1)),
            step=jnp.array(0, jnp.int32),
            skipped=jnp.array(0, jnp.int32),
            diverged_members=jnp.array(0, jnp.int32),
        )

    def evaluate(self, p, keys):
        """``(fitness, aux)`` of one member on ``keys``: fitness as ``objective`` says, and
        :meth:`Problem.meta_loss`'s aux (``loss`` = meta-loss, ``query_loss``,
        ``query_accuracy``, ``diverged``)."""
        loss, aux = self.problem.meta_loss(eqx.combine(p, self.static), keys, self.l1)
        if self.objective == "error":
            err = 1.0 - aux["query_accuracy"] + (loss - aux["query_loss"])  # + l1 penalty
            return jnp.where(jnp.isfinite(loss), err, jnp.nan), aux
        return loss, aux

    def member_fitness(self, p, keys):
        """Fitness (see ``objective``) and query accuracy of one member on ``keys``."""
        fit, aux = self.evaluate(p, keys)
        return fit, aux["query_accuracy"]

    def fitness(self, population, keys):
        """Fitness (see ``objective``) and query accuracy of every member on the same
        episodes."""
        return jax.vmap(lambda p: self.member_fitness(p, keys))(population)

    @eqx.filter_jit
    def step(self, state: ESState) -> tuple[ESState, dict]:
        key, k_ask, k_tell, k_eps = jax.random.split(jax.random.wrap_key_data(state.key), 4)
        keys = jax.random.split(k_eps, self.meta_batch)
        population, es_state = self.strategy.ask(k_ask, state.es_state, self.es_params)
        population = self.sharding.gather(population)
        mean = self.strategy.get_mean(state.es_state)
        raw = self.sharding.map(lambda p: self.member_fitness(p, keys)[0], population)
        # the search mean (the rule the run reports) on the same episodes, for the metrics
        mean_fit, mean_aux = jax.vmap(lambda p: self.evaluate(p, keys))(
            jax.tree_util.tree_map(lambda m: m[None], mean)
        )
        fit, finite, n_bad, worst = finite_fitness(raw, self.penalty)
        # evosax minimises: fitness = meta-loss, or the error rate (lower is better)
        # tell runs on replicated inputs, so its reductions do not depend on the device count
        population, fit = self.sharding.gather((population, fit))
        es_state, _ = self.strategy.tell(k_tell, population, fit, es_state, self.es_params)
        all_bad = n_bad == raw.shape[0]
        sigma = getattr(es_state, "std", jnp.nan)
        new = ESState(
            es_state=es_state,
            key=jax.random.key_data(key),
            step=state.step + 1,
            skipped=state.skipped + all_bad.astype(jnp.int32),
            diverged_members=state.diverged_members + n_bad,
        )
        # metrics name what they hold: loss / query_loss / query_accuracy / fitness are the
        # search mean's meta-loss (CE + L1), cross-entropy, accuracy and fitness (the error
        # rate or the meta-loss, see ``objective``); *_fitness are over the members
        aux = {
            "loss": mean_aux["loss"][0],
            "query_loss": mean_aux["query_loss"][0],
            "query_accuracy": mean_aux["query_accuracy"][0],
            "fitness": mean_fit[0],
            "best_fitness": jnp.min(jnp.where(finite, raw, jnp.inf)),
            "mean_fitness": jnp.sum(jnp.where(finite, raw, 0.0))
            / jnp.maximum(1, raw.shape[0] - n_bad),
            "worst_fitness": worst,
            "sigma": jnp.mean(jnp.asarray(sigma)),
            "diverged": n_bad,
            "grad_finite": ~all_bad,
        }
        return new, aux
