"""Outer loops that meta-learn a rule's coefficients."""

from .._errors import MetaplasticError
from ._gradient import GRADIENT_MODES, OPTIMIZERS, GradientTrainer, OuterState, make_optimizer
from ._trainer import TRAINERS, AbstractTrainer, register_trainer

__all__ = [
    "TRAINERS",
    "AbstractTrainer",
    "register_trainer",
    "trainer_for",
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


def __getattr__(name: str):
    # evosax runs JAX code when it is imported, and jax.distributed.initialize() must come
    # before any JAX computation, so the ES modules load on first use, not with the package
    if name in ("evolve", "EvolveResult"):
        from . import _evolve

        return getattr(_evolve, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
