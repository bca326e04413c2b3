"""metaplastic: discover biologically plausible synaptic plasticity rules by meta-learning."""

from ._config import RunConfig, build_config, load_rule, load_task
from ._data import Dataset, ImagePool, load_dataset, split_pools
from ._errors import MetaplasticError
from ._export import rule_expression, rule_from_json, rule_to_json
from ._feedback import FEEDBACK_MODES, backward, init_feedback
from ._inner import Episode, InnerResult, online_step, run_episode
from ._meta import Problem, evaluate_rule, mean_ci95
from ._network import NetState, Network
from ._pca import PCATask
from ._rule_kinds import RULE_KINDS, EquationRule, MLPRule, TaylorRule
from ._rules import AbstractRule, PlasticFeedback, TermPoolRule
from ._run import discover, evaluate_run, train
from ._signals import LocalSignals, NeuronState
from ._symbolic import parse_equation
from ._tasks import ClassificationTask
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
from .outer import GradientTrainer, OuterState, make_optimizer

__version__ = "0.1.0"

__all__ = [
    "RULE_KINDS",
    "TERMS",
    "EquationRule",
    "MLPRule",
    "NeuronState",
    "PCATask",
    "PlasticFeedback",
    "TaylorRule",
    "parse_equation",
    "user_term",
    "FEEDBACK_MODES",
    "AbstractRule",
    "AbstractTerm",
    "ClassificationTask",
    "Dataset",
    "Episode",
    "ErrorHebbian",
    "GradientTrainer",
    "Hebbian",
    "ImagePool",
    "InnerResult",
    "LocalSignals",
    "MetaplasticError",
    "NetState",
    "Network",
    "Oja",
    "OuterState",
    "Problem",
    "PseudoGradient",
    "RunConfig",
    "TermPoolRule",
    "WeightDecay",
    "backward",
    "build_config",
    "discover",
    "evaluate_rule",
    "evaluate_run",
    "init_feedback",
    "load_dataset",
    "load_rule",
    "load_task",
    "make_optimizer",
    "mean_ci95",
    "online_step",
    "rule_expression",
    "rule_from_json",
    "rule_to_json",
    "run_episode",
    "split_pools",
    "sympy_symbols",
    "train",
]
