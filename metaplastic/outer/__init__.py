"""Outer loops that meta-learn a rule's coefficients."""

from ._gradient import GRADIENT_MODES, OPTIMIZERS, GradientTrainer, OuterState, make_optimizer

__all__ = [
    "GRADIENT_MODES",
    "OPTIMIZERS",
    "EvolveResult",
    "GradientTrainer",
    "OuterState",
    "evolve",
    "make_optimizer",
]


def __getattr__(name: str):
    # evosax runs JAX code when it is imported, and jax.distributed.initialize() must come
    # before any JAX computation, so the ES modules load on first use, not with the package
    if name in ("evolve", "EvolveResult"):
        from . import _evolve

        return getattr(_evolve, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
