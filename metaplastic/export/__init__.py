"""From a learned rule to what a scientist reads and re-runs: equations (text, LaTeX,
Python, JSON rule files), pruning by magnitude or by effect, and distillation into a sparse
Taylor polynomial. Nothing here runs a training loop: scores and refits come in as
functions (see :mod:`metaplastic.run` for the commands that supply them)."""

from ._distill import (
    collect_synapses,
    distill,
    fit_sparse,
)
from ._export import (
    FORMATS,
    RULE_JSON_VERSION,
    coefficient_getter,
    equations,
    format_rule,
    prune_by_effect,
    read_rule_file,
    rule_expression,
    rule_from_json,
    rule_to_json,
    write_rule_files,
)

__all__ = [
    "FORMATS",
    "RULE_JSON_VERSION",
    "coefficient_getter",
    "collect_synapses",
    "distill",
    "equations",
    "fit_sparse",
    "format_rule",
    "prune_by_effect",
    "read_rule_file",
    "rule_expression",
    "rule_from_json",
    "rule_to_json",
    "write_rule_files",
]
