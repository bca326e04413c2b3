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
from evosax.algorithms.base import EvolutionaryAlgorithm
from evosax.algorithms.population_based.base import PopulationBasedAlgorithm
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, PRNGKeyArray

from .._errors import MetaplasticError, unknown_name
from ..rules._rules import AbstractRule
from ..tasks._problem import Problem
from ._sharding import AxisSharding
from ._trainer import AbstractTrainer

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
    "persistent_es": "PersistentES",
    "noise_reuse_es": "NoiseReuseES",
}
#: Strategies that estimate the gradient of a whole episode from its segments
#: (``train.truncation``): they carry each member's perturbation across the segments of an
#: episode, so the estimate sees how a change of the rule early on shows in later losses.
ONLINE_STRATEGIES = ("PersistentES", "NoiseReuseES")
FITNESS_SHAPING = {
    "default": None,
    "centered_rank": fs.centered_rank_fitness_shaping_fn,
    "standardize": fs.standardize_fitness_shaping_fn,
    "normalize": fs.normalize_fitness_shaping_fn,
    "weights": fs.weights_fitness_shaping_fn,
    "identity": fs.identity_fitness_shaping_fn,
}


_SV = "it evolves several search means at once (Stein variational), a run reports one rule"
#: evosax algorithms that a run cannot drive, and why; naming one is refused at config time.
UNSUPPORTED = {
    "DiffusionEvolution": (
        "its denoising schedule is fixed to a number of generations chosen up front and "
        "starts from noise over the whole search space, not from the rule's coefficients"
    ),
    "SV_CMA_ES": _SV,
    "SV_Open_ES": _SV,
}


def _algorithm_classes() -> dict[str, type]:
    """evosax's exported algorithm classes by name (not its helper types)."""
    out = {}
    for n in getattr(ea, "__all__", []):
        cls = getattr(ea, n, None)  # evosax 0.3 lists a few names it does not define
        if isinstance(cls, type) and issubclass(cls, EvolutionaryAlgorithm):
            out[n] = cls
    return out


def strategy_names() -> list[str]:
    """Every strategy name ``train.outer`` accepts: the short aliases and evosax's class
    names, less :data:`UNSUPPORTED`."""
    classes = [n for n in _algorithm_classes() if n not in UNSUPPORTED]
    return sorted(set(STRATEGY_ALIASES) | set(classes))


def is_strategy(name: str) -> bool:
    return name in STRATEGY_ALIASES or (name in _algorithm_classes() and name not in UNSUPPORTED)


def refuse_strategy(name: str, where: str = "train.outer") -> MetaplasticError | None:
    """The one-line error for an evosax algorithm that runs cannot use (else ``None``)."""
    if name not in UNSUPPORTED:
        return None
    return MetaplasticError(
        f"{where} = {name!r}: evosax's {name} is not supported ({UNSUPPORTED[name]}); "
        f"choose one of: {', '.join(strategy_names())}"
    )


def strategy_class_name(name: str) -> str:
    """evosax's class name for ``train.outer = name`` (an alias or a class name)."""
    return STRATEGY_ALIASES.get(name, name)


def refuse_truncation(name: str, where: str = "train") -> MetaplasticError | None:
    """The one-line error for ``train.truncation > 0`` with a strategy that evaluates whole
    episodes only (else ``None``)."""
    if strategy_class_name(name) in ONLINE_STRATEGIES:
        return None
    return MetaplasticError(
        f"{where}.truncation needs an outer loop that can learn from segments of an episode: "
        f"{where}.outer = {name!r} evaluates whole episodes; use the gradient outer loop, "
        "persistent_es or noise_reuse_es, or set "
        f"{where}.truncation = 0"
    )


def refuse_odd_population(name: str, population: int, antithetic: bool = True, where="train"):
    """The one-line error for an odd ``population`` that ``name`` cannot use: strategies that
    draw antithetic pairs (persistent and noise-reuse ES and PGPE always, the others with
    ``train.antithetic``); else ``None``."""
    if population % 2 == 0 or not is_strategy(name):
        return None
    cls = getattr(ea, strategy_class_name(name))
    accepted = inspect.signature(cls.__init__).parameters
    always = cls.__name__ in (*ONLINE_STRATEGIES, "PGPE")
    if always or ("use_antithetic_sampling" in accepted and antithetic):
        return MetaplasticError(
            f"{where}.population must be even for {name} (it draws antithetic pairs), got "
            f"{population}"
        )
    return None


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
        raise refuse_strategy(name) or unknown_name(
            "outer strategy", name, strategy_names(), "train.outer"
        )
    if fitness_shaping not in FITNESS_SHAPING:
        raise unknown_name(
            "fitness shaping", fitness_shaping, FITNESS_SHAPING, "train.fitness_shaping"
        )
    if population < 2:
        raise MetaplasticError(f"train.population must be at least 2, got {population}")
    cls = getattr(ea, strategy_class_name(name))
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
    if "sampling_fn" in accepted:  # RandomSearch: draws around the starting rule
        kwargs["sampling_fn"] = _gaussian_around(solution, sigma)
    odd = refuse_odd_population(name, population, antithetic)
    if odd is not None:
        raise odd
    if cls is ea.LM_MA_ES:
        # evosax's LM-MA-ES sets its path rates c_c[i] = population / (4^i n) and takes
        # sqrt(c_c (2 - c_c)): population > 2n makes every coefficient NaN after the first
        # generation; with n = 1 its first direction weight c_d[0] = 1/n wipes out every
        # search step from the second generation on, so the search stops
        n = ravel_pytree(solution)[0].size
        if n < 2 or population > 2 * n:
            raise MetaplasticError(
                f"train.outer {name!r}: evosax's LM_MA_ES needs at least 2 coefficients and "
                f"train.population <= 2 x their number (else its mean becomes NaN or its "
                f"search stops), got population {population} for {n} coefficient(s); "
                "choose MA_ES or CMA_ES"
            )
    try:
        strategy = cls(population_size=population, solution=solution, **kwargs)
    except (AssertionError, TypeError, ValueError) as err:
        raise MetaplasticError(f"train.outer {name!r}: cannot be configured ({err})") from None
    params = strategy.default_params
    if cls.__name__ in ONLINE_STRATEGIES:
        # evosax's defaults (an inner problem of 100 steps in unrolls of 10) would carry a
        # member's noise over 10 generations of unrelated episodes; by default every
        # generation is one whole unroll (see EvolutionTrainer for segments)
        params = params.replace(T=1, K=1)
    if hasattr(params, "std_init"):
        params = params.replace(std_init=jnp.asarray(sigma, dtype=jnp.float32))
    return strategy, params


def _gaussian_around(solution: Any, sigma: float):
    """``key -> solution + sigma * N(0, I)`` (a pytree like ``solution``)."""
    flat, unravel = ravel_pytree(solution)

    def sample(key):
        return unravel(flat + sigma * jax.random.normal(key, flat.shape, flat.dtype))

    return sample


def strategy_init(strategy, key: PRNGKeyArray, solution: Any, params, sigma: float):
    """The strategy's initial state, starting from the pytree ``solution``.

    Distribution-based strategies (evolution strategies proper) centre their search on it.
    Population-based ones (genetic algorithms, PSO, differential evolution) start from a
    population instead: ``solution`` itself as member 0 and the others drawn around it with
    standard deviation ``sigma``, all unevaluated (fitness +inf, evosax's own convention for
    an empty state), so the first generation's fitness replaces them.
    """
    if not isinstance(strategy, PopulationBasedAlgorithm):
        return _start_at_sigma(strategy, strategy.init(key, solution, params), sigma)
    n = strategy.population_size
    flat, unravel = ravel_pytree(solution)
    noise = sigma * jax.random.normal(key, (n, flat.size), flat.dtype)
    population = jax.vmap(unravel)(flat + noise.at[0].set(0.0))
    unevaluated = jnp.full((n,), jnp.inf, jnp.float32)
    state = strategy.init(key, population, unevaluated, params)
    # shaping +inf (standardize, normalize) would give NaN; keep "not evaluated" as +inf
    state = state.replace(fitness=unevaluated)
    if hasattr(state, "fitness_best"):  # PSO's personal bests
        state = state.replace(fitness_best=unevaluated)
    return state


def _start_at_sigma(strategy, state, sigma: float):
    """Make the first generation search at scale ~``sigma`` where evosax's state does not.

    xNES draws ``mean + std * z @ B`` with ``B = std_init * I`` as well as ``std = std_init``,
    a scale of ``sigma**2``; start ``B`` at ``I``. iAMaLGaM draws with ``std + sqrt(C)``
    (univariate) or covariance ``C + std**2 I`` (full) from ``C = I``, a scale of about 1
    whatever ``sigma``; start ``C`` at ``sigma**2`` (a scale of 1.4-2 ``sigma``), which it then
    adapts from its elites.
    """
    if type(strategy) is ea.xNES:  # not SNES, which subclasses it
        return state.replace(B=jnp.eye(strategy.num_dims, dtype=state.B.dtype))
    if type(strategy) in (ea.iAMaLGaM_Full, ea.iAMaLGaM_Univariate):
        return state.replace(C=jnp.asarray(sigma**2, state.C.dtype) * state.C)
    return state


def search_center(strategy, state) -> Any:
    """The rule a strategy currently stands for: the mean of its search distribution, or,
    for population-based strategies, the member with the best fitness in the population
    (the starting rule until the first generation is told)."""
    if isinstance(strategy, PopulationBasedAlgorithm):
        return strategy.get_best_solution(state)
    return strategy.get_mean(state)


#: What an ES member's fitness is (evosax minimises it): ``error`` (the default) = query error
#: rate (1 - accuracy) + L1, ``loss`` = the meta-loss (query cross-entropy + L1).
#: Cross-entropy rewards hedging: a rule that makes every output uniform scores ln(N), better
#: than a rule that learns a little but is confidently wrong sometimes, and noisy ES
#: estimates drift into that no-learning optimum (OpenAI-ES on digits reaches chance with
#: ``loss``, docs/outer-loops.md "Gradient vs ES"); the error rate does not reward it.
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


def member_stats(raw: Array, finite: Array, n_bad: Array, worst: Array) -> dict:
    """``best_fitness``, ``mean_fitness`` (over the finite members) and ``worst_fitness``
    of one generation, from :func:`finite_fitness`'s outputs on the raw fitness."""
    return {
        "best_fitness": jnp.min(jnp.where(finite, raw, jnp.inf)),
        "mean_fitness": jnp.sum(jnp.where(finite, raw, 0.0)) / jnp.maximum(1, raw.size - n_bad),
        "worst_fitness": worst,
    }


class ESState(eqx.Module):
    """Outer-loop state of an evolution strategy (checkpointable: arrays only)."""

    es_state: Any
    key: Array  # raw key data
    step: Array
    skipped: Array  # generations in which every member diverged
    diverged_members: Array  # member evaluations replaced by the penalty, in total


class EvolutionTrainer(AbstractTrainer):
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
    sigma: float = eqx.field(static=True)
    sharding: AxisSharding
    #: > 0: each generation learns one segment of this many updates of every episode
    #: (``train.truncation``; persistent_es and noise_reuse_es only)
    truncation: int = eqx.field(static=True, default=0)

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
        truncation=0,
    ):
        if objective not in ES_OBJECTIVES:
            raise unknown_name("ES fitness", objective, ES_OBJECTIVES, "train.es_fitness")
        self.objective = objective
        self.sigma = float(sigma)
        params, static = eqx.partition(rule, eqx.is_inexact_array)
        self.problem = problem
        self.static = static
        if truncation < 0:
            raise MetaplasticError(f"train.truncation must be >= 0, got {truncation}")
        self.truncation = int(truncation)
        n = 1  # generations per episode
        if truncation:
            why = refuse_truncation(name)
            if why is not None:
                raise why
            problem.task.check_segments(truncation)
            n = problem.task.episode_length() // truncation
            # lr and sigma_decay stay per episode: the mean moves and the search scale
            # decays once per segment, n times per episode
            lr, sigma_decay = lr / n, sigma_decay ** (1.0 / n)
        self.strategy, self.es_params = make_strategy(
            name, params, population, sigma, sigma_decay, lr, antithetic, fitness_shaping
        )
        if truncation:  # one unroll of the strategy = one episode, told segment by segment
            self.es_params = self.es_params.replace(T=n, K=1)
        self.meta_batch = int(meta_batch)
        self.l1 = float(l1)
        self.penalty = float(penalty)
        self.sharding = AxisSharding(devices, population, "population", vmap_width)
        self.mode = f"es:{type(self.strategy).__name__}"

    @classmethod
    def accepts(cls, outer: str) -> bool:
        return is_strategy(outer)

    @classmethod
    def check_config(cls, train, where: str = "train") -> None:
        """``population``, ``sigma``, ``sigma_decay``, ``fitness_shaping`` and
        ``es_fitness``."""
        if train.es_fitness not in ES_OBJECTIVES:
            raise unknown_name("ES fitness", train.es_fitness, ES_OBJECTIVES, f"{where}.es_fitness")
        if train.fitness_shaping not in FITNESS_SHAPING:
            raise unknown_name(
                "fitness shaping",
                train.fitness_shaping,
                FITNESS_SHAPING,
                f"{where}.fitness_shaping",
            )
        for n in ("sigma", "sigma_decay"):
            if not getattr(train, n) > 0:
                raise MetaplasticError(f"{where}.{n} must be positive, got {getattr(train, n)}")
        if train.population < 2:
            raise MetaplasticError(f"{where}.population must be at least 2, got {train.population}")
        odd = refuse_odd_population(train.outer, train.population, train.antithetic, where)
        if odd is not None:  # None for outer loops that are not evolution strategies
            raise odd
        if train.truncation and cls.accepts(train.outer):
            why = refuse_truncation(train.outer, where)
            if why is not None:
                raise why

    @classmethod
    def from_config(cls, train, problem, rule, *, units_key=None, trainable=None):
        """The evosax strategy ``train.outer`` with the run's population, sigma, fitness and
        sharding. Evolution strategies cannot freeze coefficients (``trainable``)."""
        t = train
        if trainable is not None:
            raise MetaplasticError(
                f"freezing coefficients needs a gradient outer loop; train.outer = {t.outer!r} "
                "is an evolution strategy"
            )
        return cls(
            problem,
            rule,
            t.outer,
            population=t.population,
            sigma=t.sigma,
            sigma_decay=t.sigma_decay,
            lr=t.lr,
            antithetic=t.antithetic,
            fitness_shaping=t.fitness_shaping,
            meta_batch=t.meta_batch,
            l1=t.l1,
            penalty=t.penalty,
            devices=t.devices,
            vmap_width=t.vmap_width,
            objective=t.es_fitness,
            truncation=t.truncation,
        )

    def rule(self, state: ESState) -> AbstractRule:
        return eqx.combine(search_center(self.strategy, state.es_state), self.static)

    def init(self, rule: AbstractRule, key: PRNGKeyArray) -> ESState:
        params, _ = eqx.partition(rule, eqx.is_inexact_array)
        es_state = strategy_init(self.strategy, key, params, self.es_params, self.sigma)
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
        """One generation (``truncation = 0``): every member learns whole episodes.
        With ``truncation > 0``, one episode of generations: see :meth:`_step_segments`."""
        if self.truncation:
            return self._step_segments(state)
        key, k_ask, k_tell, k_eps = jax.random.split(jax.random.wrap_key_data(state.key), 4)
        keys = jax.random.split(k_eps, self.meta_batch)
        population, es_state = self.strategy.ask(k_ask, state.es_state, self.es_params)
        population = self.sharding.gather(population)
        mean = search_center(self.strategy, state.es_state)
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
            **member_stats(raw, finite, n_bad, worst),
            "sigma": jnp.mean(jnp.asarray(sigma)),
            "diverged": n_bad,
            "grad_finite": ~all_bad,
        }
        return new, aux

    def _segment(self, p, carry, stopped, seg, index, context):
        """Rule ``p`` learns segment ``index`` of every episode of the meta-batch from
        ``carry``: ``(carry, stopped, fitness, loss, accuracy, diverged)``, the last four
        over the meta-batch (the segment's query loss and accuracy over the classes seen so
        far; fitness as ``objective`` says, on either, plus the L1 penalty; NaN if the loss
        is not finite; whether any episode has diverged)."""
        pb = self.problem
        rule = eqx.combine(p, self.static)

        def one(c, s, sg, ctx):
            return pb.task.run_segment(
                rule, pb.net, pb.feedback, c, s, sg, index, ctx, remat=pb.remat
            )

        new, now, loss, acc, dv = eqx.filter_vmap(one)(carry, stopped, seg, context)
        # an episode that diverged (or was stopped by train.weight_limit) scores as in
        # Problem.outcomes: accuracy 0, never its frozen weights' accuracy; with the loss as
        # fitness, the member gets the generation's worst fitness (NaN, replaced)
        acc = jnp.mean(jnp.where(dv, 0.0, acc))
        loss = jnp.mean(loss)
        pen = self.l1 * rule.l1()
        fit = 1.0 - acc + pen if self.objective == "error" else loss + pen
        bad = ~jnp.isfinite(loss) | (jnp.any(dv) & (self.objective == "loss"))
        return new, now, jnp.where(bad, jnp.nan, fit), loss, acc, jnp.any(dv)

    def _step_segments(self, state: ESState) -> tuple[ESState, dict]:
        """One episode per meta-batch entry, learned segment by segment, one generation
        per segment (persistent ES, Vicol et al. 2021; noise-reuse ES, Li et al. 2023).

        Every member and the search mean keep their own network state from segment to
        segment of the same episodes, so member ``i`` at segment ``k`` has learned
        segments ``0..k`` with the perturbations it was given so far; its fitness ``f_i``
        is that of segment ``k`` (the task's segment loss, or query error rate over the
        classes seen so far). The strategy accumulates each member's perturbations
        ``xi_i = sum_{j<=k} eps_i^j`` (antithetic pairs) and moves the mean along
        ``g = sum_i f_i xi_i / (sigma^2 N)``, for a mean held still an unbiased estimate
        of the gradient of ``sum_k L_k`` over the whole episode (noise-reuse ES keeps one
        perturbation per episode instead); the accumulators reset when the episode ends.
        ``lr`` and ``sigma_decay`` were turned into per-segment values in ``__init__``. Memory: the
        network state of ``(population + 1) x meta_batch`` episodes, whatever the length.
        The metrics are the search mean's at the end of the episode (every class seen)
        and the members' fitness averaged over the segments.
        """
        pb = self.problem
        key, k_eps, k_gen = jax.random.split(jax.random.wrap_key_data(state.key), 3)
        keys = jax.random.split(k_eps, self.meta_batch)
        start = eqx.combine(search_center(self.strategy, state.es_state), self.static)

        def cut(k):  # the start network state does not depend on the coefficients' values
            return pb.task.segments(start, pb.net, pb.feedback, k, pb.pool, self.truncation)

        carry0, xs, context = eqx.filter_vmap(cut)(keys)
        xs = jax.tree_util.tree_map(lambda a: jnp.swapaxes(a, 0, 1), xs)  # segments first
        n = jax.tree_util.tree_leaves(xs)[0].shape[0]
        P = self.strategy.population_size

        def tile(tree, m):
            return jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (m, *a.shape)), tree)

        stopped0 = jnp.zeros((self.meta_batch,), bool)

        def generation(inner, inp):
            es_state, members, mean_c = inner
            seg, index, k = inp
            k_ask, k_tell = jax.random.split(k)
            mean = search_center(self.strategy, es_state)
            population, es_state = self.strategy.ask(k_ask, es_state, self.es_params)
            population = self.sharding.gather(population)

            def member(args):
                p, (c, s) = args
                return self._segment(p, c, s, seg, index, context)

            c, s, raw, _, _, m_dv = self.sharding.map(member, (population, members))
            mc, ms, mean_fit, mean_loss, mean_acc, _ = self._segment(
                mean, *mean_c, seg, index, context
            )
            fit, finite, n_bad, worst = finite_fitness(raw, self.penalty)
            population, fit = self.sharding.gather((population, fit))
            es_state, _ = self.strategy.tell(k_tell, population, fit, es_state, self.es_params)
            stats = {
                "loss": mean_loss + self.l1 * eqx.combine(mean, self.static).l1(),
                "query_loss": mean_loss,
                "query_accuracy": mean_acc,
                "fitness": mean_fit,
                **member_stats(raw, finite, n_bad, worst),
                "diverged": jnp.sum((m_dv | ~finite).astype(jnp.int32)),
                "non_finite": n_bad,
            }
            return (es_state, (c, s), (mc, ms)), stats

        inner0 = (state.es_state, (tile(carry0, P), tile(stopped0, P)), (carry0, stopped0))
        inp = (xs, jnp.arange(n), jax.random.split(k_gen, n))
        (es_state, _, _), stats = jax.lax.scan(generation, inner0, inp)
        last = jax.tree_util.tree_map(lambda a: a[-1], stats)
        all_bad = last["non_finite"] == P
        new = ESState(
            es_state=es_state,
            key=jax.random.key_data(key),
            step=state.step + 1,
            skipped=state.skipped + all_bad.astype(jnp.int32),
            diverged_members=state.diverged_members + last["non_finite"],
        )
        aux = {
            "loss": last["loss"],
            "query_loss": last["query_loss"],
            "query_accuracy": last["query_accuracy"],
            "fitness": jnp.mean(stats["fitness"]),
            "best_fitness": jnp.mean(stats["best_fitness"]),
            "mean_fitness": jnp.mean(stats["mean_fitness"]),
            "worst_fitness": jnp.max(stats["worst_fitness"]),
            "sigma": jnp.mean(jnp.asarray(getattr(es_state, "std", jnp.nan))),
            "diverged": last["diverged"],
            "grad_finite": ~all_bad,
        }
        return new, aux
