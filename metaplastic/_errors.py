"""User-facing errors: one line that names the problem and the fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MetaplasticError(Exception):
    """A problem with the user's input (config, names, data files); the CLI exits with 2."""


class RunFailed(Exception):
    """A run ended without a usable rule (diverged, most meta-steps bad, or no better than
    its start): ``status`` says why (also in ``summary.json``), and everything finished so
    far is kept in ``run_dir``. The CLI prints one line and exits with 1."""

    def __init__(self, run_dir, status: str):
        super().__init__(f"{status} (everything finished so far is kept in {run_dir})")
        self.run_dir, self.status = run_dir, status


def unknown_name(kind: str, name: str, choices: Iterable[str], where: str = "") -> MetaplasticError:
    """Build the error for an unknown name, with a did-you-mean suggestion."""
    choices = sorted(choices)
    close = difflib.get_close_matches(str(name), choices, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    loc = f"{where}: " if where else ""
    return MetaplasticError(
        f"{loc}unknown {kind} {name!r}; {hint}choose one of: {', '.join(choices)}"
    )
