"""metaplastic: discover biologically plausible synaptic plasticity rules by meta-learning.

Subpackages, lowest layer first (a layer imports only the layers below it): ``rules``
(signals, terms, rule kinds), ``inner`` (networks, credit pathways, the online episode),
``tasks`` (data, classification, PCA, the meta-loss problem), ``outer`` (gradient and
evolution-strategy trainers), ``export`` (equations, pruning, distillation) and ``run`` (config,
train/discover loops, checkpoints, reports, command line). The names below are the most used
ones of each."""

from . import export, inner, outer, rules, run, tasks
from ._errors import MetaplasticError
from .export import rule_expression, rule_from_json, rule_to_json
from .inner import (
    FEEDBACK_MODES,
    Episode,
    InnerResult,
    NetState,
    Network,
    backward,
    init_feedback,
    online_step,
    run_episode,
)
from .outer import GradientTrainer, OuterState, make_optimizer
from .rules import (
    RULE_KINDS,
    TERMS,
    AbstractRule,
    AbstractTerm,
    EquationRule,
    ErrorHebbian,
    Hebbian,
    LocalSignals,
    MLPRule,
    NeuronState,
    Oja,
    PlasticFeedback,
    PseudoGradient,
    TaylorRule,
    TermPoolRule,
    WeightDecay,
    parse_equation,
    sympy_symbols,
    user_term,
)
from .run import RunConfig, build_config, discover, evaluate_run, load_rule, load_task, train
from .tasks import (
    ClassificationTask,
    Dataset,
    ImagePool,
    PCATask,
    Problem,
    evaluate_rule,
    load_dataset,
    mean_ci95,
    split_pools,
)

__version__ = "0.1.0"

__all__ = [
    "export",
    "inner",
    "outer",
    "rules",
    "run",
    "tasks",
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
