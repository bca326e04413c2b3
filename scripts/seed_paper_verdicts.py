"""The seed-paper studies' verdicts in one markdown table (for the docs' index page).

Reads ``results/<study>/verdict.json`` of the three study scripts (``oja_constraints.py``,
``scaling_normalization.py``, ``inhibitory_normalization.py``) and prints one row per claim.
A study without a committed full run is listed as not run.

Usage (repository root)::

    python scripts/seed_paper_verdicts.py           # print the table
    python scripts/seed_paper_verdicts.py --out F   # also write it to F
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

STUDIES = {
    "oja_constraints": ("Oja's rule under constraints", "oja-constraints.md"),
    "scaling_normalization": ("Synaptic scaling", "synaptic-scaling.md"),
    "inhibitory_normalization": ("Inhibitory normalisation", "inhibitory-normalisation.md"),
}


def table(root: Path) -> str:
    lines = ["| study | claim | verdict | seeds |", "|---|---|---|---|"]
    for study, (title, page) in STUDIES.items():
        path = root / "results" / study / "verdict.json"
        if not path.exists():
            lines.append(f"| [{title}]({page}) | — | not run | — |")
            continue
        doc = json.loads(path.read_text())
        if doc.get("quick"):
            raise SystemExit(f"{path}: a --quick run; commit the full run's verdicts")
        for c in doc["claims"]:
            lines.append(
                f"| [{title}]({page}) | {c['claim']} | **{c['verdict']}** | {c['seeds']} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    text = table(Path(__file__).resolve().parent.parent)
    if args.out:
        args.out.write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
