"""Pieces shared by the study scripts that meta-learn with :func:`metaplastic.outer.evolve`.

The scripts run as ``python scripts/<name>.py``, which puts this folder on ``sys.path``.
"""

from __future__ import annotations

import argparse


def add_meta_args(ap: argparse.ArgumentParser, generations: tuple[int, int], what: str) -> None:
    """``--meta`` and the ES search options; ``generations`` = (quick, full) default."""
    q, full = generations
    ap.add_argument("--meta", action="store_true", help=f"add the meta-learned {what} condition")
    ap.add_argument(
        "--meta-generations", type=int, default=None, help=f"default {full} (quick: {q})"
    )
    ap.add_argument("--meta-population", type=int, default=None, help="default 12 (quick: 4)")
    ap.add_argument("--meta-train", type=int, default=None, help="default 10000 (quick: 600)")
    ap.add_argument("--meta-val", type=int, default=None, help="default 5000 (quick: 300)")
    ap.set_defaults(_meta_generations=generations)


def resolve_meta_args(args: argparse.Namespace) -> None:
    """Fill the ES search options left unset with their quick or full defaults."""
    q = args.quick
    args.meta_generations = args.meta_generations or args._meta_generations[0 if q else 1]
    args.meta_population = args.meta_population or (4 if q else 12)
    args.meta_train = args.meta_train or (600 if q else 10_000)
    args.meta_val = args.meta_val or (300 if q else 5_000)


def meta_split(x, y, n_val: int):
    """``(train_x, train_y, val_x, val_y)``: the last ``n_val`` training images (at most a
    quarter) are the search's validation set, so the test split never enters it."""
    n_val = min(n_val, x.shape[0] // 4)
    return x[:-n_val], y[:-n_val], x[-n_val:], y[-n_val:]


# --------------------------------------------------------------------------- verdicts

VERDICTS = ("reproduced", "partly", "not")


def verdict_of(hits: int, total: int) -> str:
    """``reproduced`` when a claim holds in every case it names, ``partly`` in some,
    ``not`` in none."""
    if total <= 0:
        raise ValueError("a claim needs at least one case")
    return "reproduced" if hits == total else ("partly" if hits > 0 else "not")


def write_verdict(out, claims: list[dict], quick: bool) -> dict:
    """Write ``out/verdict.json``: ``{"claims": [{"claim", "verdict", "seeds", ...}],
    "quick": bool}``; every claim carries the numbers its verdict rests on."""
    import json
    from pathlib import Path

    for c in claims:
        missing = {"claim", "verdict", "seeds"} - set(c)
        if missing:
            raise ValueError(f"claim {c.get('claim')!r} lacks {sorted(missing)}")
        if c["verdict"] not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {c['verdict']!r}")
    doc = {"claims": claims, "quick": quick}
    Path(out, "verdict.json").write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def verdict_table(claims: list[dict]) -> list[str]:
    """The verdicts as markdown table lines."""
    lines = ["| claim | verdict | seeds | evidence |", "|---|---|---|---|"]
    for c in claims:
        lines.append(f"| {c['claim']} | **{c['verdict']}** | {c['seeds']} | {c['evidence']} |")
    return lines


# --------------------------------------------------------------------------- resuming


def load_progress(path, args, free: tuple[str, ...], empty: dict) -> dict:
    """The study's ``progress.json`` if it was made with the same settings (``args`` minus
    the keys in ``free``, which only add or select runs), else ``{"settings": ...,
    **empty}``: a finished part is reused, never one made with other settings."""
    import json
    from pathlib import Path

    every = json.loads(json.dumps(vars(args), default=str))
    settings = {k: v for k, v in every.items() if k not in free}
    path = Path(path)
    prog = json.loads(path.read_text()) if path.exists() else {}
    kept = {k: v for k, v in prog.get("settings", {}).items() if k not in free}
    return prog if kept == settings and prog else {"settings": settings, **empty}
