"""Export a learned rule as an equation: pruned, simplified, as text, LaTeX and JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import sympy as sp

from ._errors import MetaplasticError
from ._rules import AbstractRule, TermPoolRule

FORMATS = ("text", "latex", "json")
RULE_JSON_VERSION = 1


def _round_floats(expr: sp.Basic, digits: int) -> sp.Basic:
    return expr.xreplace({f: sp.Float(f, digits) for f in expr.atoms(sp.Float)})


def simplify(expr: sp.Basic) -> sp.Basic:
    """Expand and collect the expression (sympy's ``simplify`` for scalar expressions)."""
    if isinstance(expr, sp.MatrixExpr):
        return sp.expand(expr).doit()
    return sp.simplify(expr)


def rule_expression(
    rule: AbstractRule, threshold: float = 0.0, digits: int = 4, layer: int | None = None
) -> sp.Basic:
    """The rule as a sympy expression: terms with ``|theta| <= threshold`` pruned,
    coefficients rounded to ``digits`` significant digits, simplified."""
    expr = rule.to_sympy(layer=layer, threshold=threshold)
    return simplify(_round_floats(expr, digits))


def equation_text(expr: sp.Basic) -> str:
    return f"dW = {sp.sstr(expr)}"


def equation_latex(expr: sp.Basic) -> str:
    return rf"\Delta W = {sp.latex(expr)}"


def _layer_indices(rule: TermPoolRule) -> list[int | None]:
    return [None] if rule.shared else list(range(rule.theta.shape[0]))


def equations(rule: TermPoolRule, threshold: float) -> dict[str, dict[str, str]]:
    """Text and LaTeX for the shared rule (key ``all``) or for each layer (``layer0``...)."""
    out = {}
    for layer in _layer_indices(rule):
        expr = rule_expression(rule, threshold, layer=layer)
        key = "all" if layer is None else f"layer{layer}"
        out[key] = {"text": equation_text(expr), "latex": equation_latex(expr)}
    return out


def pruned_terms(rule: TermPoolRule, threshold: float) -> list[str]:
    """Coefficient names whose magnitude is at or below the threshold."""
    return [k for k, v in rule.coefficients().items() if abs(v) <= threshold]


def rule_to_json(rule: TermPoolRule, threshold: float) -> dict[str, Any]:
    """Everything needed to rebuild the rule, plus its equation."""
    eqs = equations(rule, threshold)
    main = eqs.get("all") or next(iter(eqs.values()))
    return {
        "format_version": RULE_JSON_VERSION,
        "kind": "term_pool",
        "terms": list(rule.names),
        "mask": list(rule.mask),
        "shared": rule.shared,
        "theta": np.asarray(rule.theta).tolist(),
        "coefficients": rule.coefficients(),
        "prune_threshold": threshold,
        "pruned": pruned_terms(rule, threshold),
        "equation": main["text"],
        "latex": main["latex"],
        "equations": eqs,
    }


def rule_from_json(data: Any, where: str = "rule.json") -> TermPoolRule:
    """Rebuild a rule from :func:`rule_to_json` output (validated)."""
    if not isinstance(data, dict) or data.get("kind") != "term_pool":
        raise MetaplasticError(f"{where}: not a metaplastic rule file (kind 'term_pool' expected)")
    try:
        theta = np.asarray(data["theta"], dtype=np.float32)
        terms = [str(t) for t in data["terms"]]
        mask = [bool(m) for m in data["mask"]]
    except (KeyError, TypeError, ValueError) as err:
        raise MetaplasticError(f"{where}: malformed rule file ({err}); re-export the run") from None
    if not np.all(np.isfinite(theta)):
        raise MetaplasticError(f"{where}: coefficients are not finite; the run diverged")
    rule = TermPoolRule.from_names(terms)
    return TermPoolRule(rule.terms, theta, mask)


def write_rule_files(run_dir: Path, rule: TermPoolRule, threshold: float) -> dict[str, Any]:
    data = rule_to_json(rule, threshold)
    (run_dir / "rule.json").write_text(json.dumps(data, indent=2) + "\n")
    (run_dir / "rule.tex").write_text(data["latex"] + "\n")
    return data


def read_rule_file(run_dir: Path) -> TermPoolRule:
    path = run_dir / "rule.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise MetaplasticError(
            f"{path}: not found; is {run_dir} a finished run directory?"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MetaplasticError(f"{path}: corrupt JSON ({err})") from None
    return rule_from_json(data, str(path))


def format_rule(rule: TermPoolRule, fmt: str, threshold: float) -> str:
    if fmt not in FORMATS:
        from ._errors import unknown_name

        raise unknown_name("format", fmt, FORMATS, "--format")
    data = rule_to_json(rule, threshold)
    if fmt == "json":
        return json.dumps(data, indent=2)
    key = "text" if fmt == "text" else "latex"
    if len(data["equations"]) == 1:
        return next(iter(data["equations"].values()))[key]
    return "\n".join(f"{k}: {v[key]}" for k, v in data["equations"].items())
