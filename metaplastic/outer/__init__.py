"""Outer loops that meta-learn a rule's coefficients."""

from .._errors import MetaplasticError, unknown_name
from ._gradient import GRADIENT_MODES, OPTIMIZERS, GradientTrainer, OuterState, make_optimizer
from ._trainer import TRAINERS, AbstractTrainer, register_trainer

__all__ = [
    "TRAINERS",
    "AbstractTrainer",
    "register_trainer",
    "trainer_for",
    "check_train_config",
    "GRADIENT_MODES",
    "OPTIMIZERS",
    "EvolveResult",
    "GradientTrainer",
    "OuterState",
    "evolve",
    "make_optimizer",
]


def trainer_for(outer: str) -> type[AbstractTrainer]:
    """The registered trainer class that serves ``train.outer = outer`` (the
    evolution-strategy trainer is registered here, on first use)."""
    if "evolution" not in TRAINERS:
        from ._evolution import EvolutionTrainer

        register_trainer("evolution", EvolutionTrainer)
    for cls in TRAINERS.values():
        if cls.accepts(outer):
            return cls
    raise MetaplasticError(f"train.outer = {outer!r}: no trainer serves it")


def check_train_config(train, where: str = "train") -> None:
    """Check the outer-loop part of a ``[train]`` config: some trainer serves
    ``train.outer`` (one line naming the choices otherwise), and every registered trainer
    refuses bad values of the keys it owns (:meth:`AbstractTrainer.check_config`)."""
    from ._evolution import refuse_strategy, strategy_names

    try:
        trainer_for(train.outer)
    except MetaplasticError:
        choices = list(OPTIMIZERS) + strategy_names()
        raise refuse_strategy(train.outer, f"{where}.outer") or unknown_name(
            "outer loop", train.outer, choices, f"{where}.outer"
        ) from None
    for cls in TRAINERS.values():
        cls.check_config(train, where)


def __getattr__(name: str):
    # evosax runs JAX code when it is imported, and jax.distributed.initialize() must come
    # before any JAX computation, so the ES modules load on first use, not with the package
    if name in ("evolve", "EvolveResult"):
        from . import _evolve

        return getattr(_evolve, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
