"""Export a learned rule as an equation: pruned, simplified, as text, LaTeX, JSON, Python.

Works for every rule kind (:data:`metaplastic.rules._rule_kinds.RULE_KINDS`). Pruning is by
magnitude (``threshold``) here and by effect in :func:`prune_by_effect`; the round trip
(:func:`round_trip`) parses the exported text back into a rule and evaluates it next to the
learned parameters.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import sympy as sp

from .._errors import MetaplasticError, unknown_name
from ..rules._rules import AbstractRule, PlasticFeedback
from ..rules._symbolic import is_matrix, to_python
from ..rules._user_terms import check_manifest, manifest_of, run_user_terms

FORMATS = ("text", "latex", "json", "python")
RULE_JSON_VERSION = 2
#: Above this many operations an expression is expanded but not run through sp.simplify.
SIMPLIFY_MAX_OPS = 80


def _round_floats(expr: sp.Basic, digits: int) -> sp.Basic:
    return expr.xreplace({f: sp.Float(f, digits) for f in expr.atoms(sp.Float)})


def simplify(expr: sp.Basic) -> sp.Basic:
    """Expand matrix expressions; expand and (when small) simplify scalar ones."""
    if isinstance(expr, sp.MatrixExpr):
        return sp.expand(expr).doit()
    expr = sp.expand(expr)
    if sp.count_ops(expr) <= SIMPLIFY_MAX_OPS:
        simple = sp.collect(expr, sorted(expr.free_symbols, key=str))
        return simple if sp.count_ops(simple) <= sp.count_ops(expr) else expr
    return expr


def _base(rule: AbstractRule) -> AbstractRule:
    return rule.rule if isinstance(rule, PlasticFeedback) else rule


def layer_indices(rule: AbstractRule) -> list[int | None]:
    """``[None]`` for a rule shared by all layers, else one index per layer."""
    r = _base(rule)
    if getattr(r, "shared", True):
        return [None]
    n = len(r.exprs) if hasattr(r, "exprs") else int(r.theta.shape[0])
    return list(range(n))


def rule_expression(
    rule: AbstractRule, threshold: float = 0.0, digits: int = 4, layer: int | None = None
) -> sp.Basic:
    """The rule as a sympy expression: coefficients with ``|theta| <= threshold`` pruned,
    rounded to ``digits`` significant digits, simplified."""
    expr = rule.to_sympy(layer=layer, threshold=threshold)
    return simplify(_round_floats(expr, digits))


def equation_text(expr: sp.Basic) -> str:
    return f"dW = {sp.sstr(expr)}"


def equation_latex(expr: sp.Basic) -> str:
    return rf"\Delta W = {sp.latex(expr)}"


def equations(rule: AbstractRule, threshold: float) -> dict[str, dict[str, str]]:
    """Text and LaTeX for the shared rule (key ``all``) or each layer (``layer0``...);
    with plastic feedback also the feedback update (key ``feedback``)."""
    out = {}
    for layer in layer_indices(rule):
        expr = rule_expression(rule, threshold, layer=layer)
        key = "all" if layer is None else f"layer{layer}"
        out[key] = {
            "text": equation_text(expr),
            "latex": equation_latex(expr),
            "form": "matrix" if is_matrix(expr) else "elementwise",
        }
    if isinstance(rule, PlasticFeedback):
        fb = _round_floats(rule.feedback_sympy(), 4)
        out["feedback"] = {
            "text": f"dB = {sp.sstr(fb)}",
            "latex": rf"\Delta B = {sp.latex(fb)}",
            "form": "matrix",
        }
    return out


def pruned_terms(rule: AbstractRule, threshold: float) -> list[str]:
    """Coefficient names whose magnitude is at or below the threshold."""
    if _base(rule).kind == "mlp":
        return []
    return [k for k, v in rule.coefficients().items() if abs(v) <= threshold]


def rule_to_json(rule: AbstractRule, threshold: float) -> dict[str, Any]:
    """Everything needed to rebuild the rule, plus its equation(s)."""
    eqs = equations(rule, threshold)
    main = eqs.get("all") or next(iter(eqs.values()))
    data = {"format_version": RULE_JSON_VERSION, **rule.to_json_data(threshold)}
    data.update(
        {
            "coefficients": rule.coefficients(),
            "prune_threshold": threshold,
            "pruned": pruned_terms(rule, threshold),
            "equation": main["text"],
            "latex": main["latex"],
            "equations": eqs,
        }
    )
    user = manifest_of(rule)
    if user:  # where each user term's code is: the run's copy and its SHA-256
        data["user_terms"] = user
    return data


def rule_from_json(
    data: Any,
    where: str = "rule.json",
    *,
    run_dir: Path | None = None,
    trust_user_terms: bool = False,
) -> AbstractRule:
    """Rebuild a rule from :func:`rule_to_json` output (validated).

    User terms are loaded only from the copies in ``run_dir/user_terms`` whose SHA-256
    matches ``data["user_terms"]``, and only with ``trust_user_terms=True``; never from the
    paths the term names hold.
    """
    from ..rules._rules import RULE_KINDS, rule_from_data

    if not isinstance(data, dict) or data.get("kind") not in RULE_KINDS:
        raise MetaplasticError(
            f"{where}: not a metaplastic rule file (kind one of {', '.join(RULE_KINDS)})"
        )
    version = data.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise MetaplasticError(f"{where}: format_version {version!r} is not a positive integer")
    if version > RULE_JSON_VERSION:
        raise MetaplasticError(
            f"{where}: written in rule-file format {version}; this metaplastic reads formats "
            f"up to {RULE_JSON_VERSION}: upgrade metaplastic"
        )
    manifest = check_manifest(data.get("user_terms"), where)
    try:
        with run_user_terms(run_dir, manifest, trusted=trust_user_terms):
            rule = rule_from_data(data)
    except MetaplasticError as err:
        raise MetaplasticError(f"{where}: {err}") from None
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise MetaplasticError(f"{where}: malformed rule file ({err}); re-export the run") from None
    leaves = jax.tree_util.tree_leaves(eqx.filter(rule, eqx.is_inexact_array))
    if not all(bool(np.all(np.isfinite(np.asarray(v)))) for v in leaves):
        raise MetaplasticError(f"{where}: coefficients are not finite; the run diverged")
    return rule


def write_rule_files(run_dir: Path, rule: AbstractRule, threshold: float) -> dict[str, Any]:
    data = rule_to_json(rule, threshold)
    (run_dir / "rule.json").write_text(json.dumps(data, indent=2) + "\n")
    (run_dir / "rule.tex").write_text(data["latex"] + "\n")
    return data


def read_rule_file(
    run_dir: Path, name: str = "rule.json", *, trust_user_terms: bool = False
) -> AbstractRule:
    """The rule saved in ``run_dir`` (user terms: see :func:`rule_from_json`)."""
    path = run_dir / name
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise MetaplasticError(
            f"{path}: not found; is {run_dir} a finished run directory?"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MetaplasticError(f"{path}: corrupt JSON ({err})") from None
    return rule_from_json(data, str(path), run_dir=run_dir, trust_user_terms=trust_user_terms)


def python_source(rule: AbstractRule, threshold: float) -> str:
    """A stand-alone JAX module with one ``delta_w`` function (or one per layer)."""
    parts = []
    for layer in layer_indices(rule):
        name = "delta_w" if layer is None else f"delta_w_layer{layer}"
        src = to_python(rule_expression(rule, threshold, layer=layer), name)
        parts.append(src if not parts else src.split("\n", 3)[3])
    return "\n\n".join(parts)


def format_rule(rule: AbstractRule, fmt: str, threshold: float) -> str:
    if fmt not in FORMATS:
        raise unknown_name("format", fmt, FORMATS, "--format")
    if fmt == "python":
        return python_source(rule, threshold)
    data = rule_to_json(rule, threshold)
    if fmt == "json":
        return json.dumps(data, indent=2)
    key = "text" if fmt == "text" else "latex"
    if len(data["equations"]) == 1:
        return next(iter(data["equations"].values()))[key]
    return "\n".join(f"{k}: {v[key]}" for k, v in data["equations"].items())


def exported_texts(rule: AbstractRule, threshold: float) -> list[str]:
    """The exported weight-update equation(s) as text, one for all layers or one each."""
    return [sp.sstr(rule_expression(rule, threshold, layer=layer)) for layer in layer_indices(rule)]


def equation_rule_from_export(rule: AbstractRule, threshold: float):
    """Parse the exported text back into an :class:`EquationRule` (what a reader of the
    paper would re-implement), keeping feedback plasticity if the rule has it."""
    from ..rules._rule_kinds import EquationRule

    eq = EquationRule.from_text(exported_texts(rule, threshold), _base(rule).state_rate())
    if isinstance(rule, PlasticFeedback):
        # the numbers the exported feedback equation shows: 4 significant digits, as its text
        fb = [float(sp.sstr(sp.Float(float(v), 4))) for v in np.asarray(rule.theta_fb)]
        return PlasticFeedback(eq, jnp.asarray(fb, jnp.float32))
    return eq


def coefficient_getter(rule: AbstractRule):
    """``where(rule) -> theta``: the coefficient array that pruning by effect may zero."""
    base = _base(rule)
    if not hasattr(base, "theta"):
        raise MetaplasticError(
            f"pruning by effect needs a rule with coefficients; the {base.kind} rule has none "
            "(distil it first: metaplastic distill RUN)"
        )

    def where(r):
        return r.rule.theta if isinstance(r, PlasticFeedback) else r.theta

    return where


def prune_by_effect(
    rule: AbstractRule,
    accuracy,
    tolerance: float,
    progress=None,
    max_passes: int = 3,
    refit=None,
) -> tuple[AbstractRule, list[dict[str, Any]]]:
    """Greedily zero coefficients, smallest first, while the score stays within
    ``tolerance`` of the unpruned rule's; sweep again (at most ``max_passes`` times) while a
    sweep still removes something, since a term may only become removable once the terms it
    compensated for are gone.

    ``refit(rule, keep) -> rule`` (optional): when zeroing a coefficient alone costs more
    than ``tolerance``, the remaining coefficients (``keep``: a bool array like the
    coefficients, False where zeroed) are re-optimised and the coefficient is dropped if the
    refitted rule is back within ``tolerance``; the refitted values are kept. Without it a
    term that the others can replace (for instance one of several terms that all shrink the
    weights) stays, because the others, fitted alongside it, are too small on their own.
    Each coefficient is refitted at most once (in the first sweep that tries it). After
    the sweeps, when anything was dropped, the remaining coefficients are refitted once more
    together (the final least-squares step of sequential thresholding: the last drops were
    judged without readjusting the rest) and that fit is kept if it scores at least as well.

    ``accuracy(rule) -> float`` must measure on validation episodes (the validation split, not
    the meta-test set); :func:`export_run` passes the mean query accuracy (classification)
    or ``1 - meta-loss`` (pca, where the alignment alone would not see the weight norm).
    Returns the pruned rule and one record per tried coefficient.
    """
    where = coefficient_getter(rule)
    theta = np.asarray(where(rule), np.float32)
    mask = np.asarray(getattr(_base(rule), "mask", [True] * theta.shape[-1]), bool)
    live = [idx for idx in np.ndindex(theta.shape) if theta[idx] != 0.0 and mask[idx[-1]]]
    live.sort(key=lambda idx: abs(theta[idx]))
    full = float(accuracy(rule))
    current = theta.copy()
    names = list(rule.coefficients())
    report = [{"pass": 0, "coefficient": "(none)", "score": full, "pruned": False}]
    refitted_once: set = set()  # each coefficient gets at most one refit (they are costly)
    current_score = full

    def labelled(values) -> dict[str, float]:
        return {
            _coef_label(names, theta.shape, j, mask): float(values[j])
            for j in np.ndindex(values.shape)
            if values[j] != 0.0
        }

    def refitted(values):
        """Refit the nonzero ``values``: (coefficients, validation score), the score None
        when the refit is not finite."""
        new = np.asarray(where(refit(eqx.tree_at(where, rule, jnp.asarray(values)), values != 0)))
        if not np.all(np.isfinite(new)):
            return new, None
        return new, float(accuracy(eqx.tree_at(where, rule, jnp.asarray(new))))

    for sweep in range(1, max_passes + 1):
        changed = False
        for idx in [i for i in live if current[i] != 0.0]:
            trial = current.copy()
            trial[idx] = 0.0
            score = float(accuracy(eqx.tree_at(where, rule, jnp.asarray(trial))))
            drop = full - score < tolerance
            entry = {
                "pass": sweep,
                "coefficient": _coef_label(names, theta.shape, idx, mask),
                "value": float(theta[idx]),
                "score": score,
                "pruned": drop,
            }
            if not drop and refit is not None and idx not in refitted_once and np.any(trial):
                refitted_once.add(idx)
                new, score = refitted(trial)
                drop = score is not None and full - score < tolerance
                entry.update(refit_score=score, pruned=drop)
                if drop:
                    entry["refit"] = labelled(new)
                    trial = new
            report.append(entry)
            if drop:
                current, current_score, changed = trial, score, True
            if progress:
                progress(len(report) - 1)
        if not changed:
            break
    if refit is not None and np.any(current != theta) and np.any(current):
        # the last drops were judged without readjusting the rest: refit the final set
        # once (the least-squares step at the end of sequential thresholding) and keep it
        # when it scores at least as well on validation
        new, score = refitted(current)
        keep = score is not None and score >= current_score
        report.append(
            {
                "pass": "final refit",
                "coefficient": "(all kept)",
                "score": current_score,
                "refit_score": score,
                "pruned": False,
                "accepted": keep,
                "refit": labelled(new) if score is not None else {},
            }
        )
        if keep:
            current = new
    return eqx.tree_at(where, rule, jnp.asarray(current)), report


def _coef_label(names: list[str], shape, idx, mask) -> str:
    live_cols = [k for k in range(shape[-1]) if mask[k]]
    col = live_cols.index(idx[-1]) if idx[-1] in live_cols else None
    if col is None:
        return str(idx)
    pos = col if len(shape) == 1 else idx[0] * len(live_cols) + col
    return names[pos] if pos < len(names) else str(idx)
