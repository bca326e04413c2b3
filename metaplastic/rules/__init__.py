"""Plasticity rules: local signals, the terms rules are built from, the rule kinds (term
pool, Taylor polynomial, MLP, parsed equation, feedback plasticity), their registry and their
symbolic form. Extension points: :data:`TERMS` (add a term class, or :func:`user_term` from a
file) and :data:`RULE_KINDS` (:func:`register_rule_kind`)."""

from ._rule_kinds import MONOMIALS, EquationRule, MLPRule, TaylorRule
from ._rules import (
    RULE_KINDS,
    AbstractRule,
    PlasticFeedback,
    TermPoolRule,
    l1_norm,
    register_rule_kind,
    rule_from_data,
)
from ._signals import LocalSignals, NeuronState
from ._symbolic import parse_equation
from ._terms import (
    TERMS,
    AbstractTerm,
    ErrorHebbian,
    Hebbian,
    Oja,
    PseudoGradient,
    WeightDecay,
    sympy_symbols,
)
from ._user_terms import user_term

__all__ = [
    "AbstractRule",
    "AbstractTerm",
    "EquationRule",
    "ErrorHebbian",
    "Hebbian",
    "LocalSignals",
    "MLPRule",
    "MONOMIALS",
    "NeuronState",
    "Oja",
    "PlasticFeedback",
    "PseudoGradient",
    "RULE_KINDS",
    "TERMS",
    "TaylorRule",
    "TermPoolRule",
    "WeightDecay",
    "l1_norm",
    "parse_equation",
    "register_rule_kind",
    "rule_from_data",
    "sympy_symbols",
    "user_term",
]
