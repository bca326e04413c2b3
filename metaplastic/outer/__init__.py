"""Outer loops that meta-learn a rule's coefficients."""

from ._evolve import EvolveResult, evolve
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
