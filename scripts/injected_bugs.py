"""Re-inject the plausible bugs that the first test suite let through, one at a time, and
check that the default test run catches each.

Each bug is a literal text replacement in one core module. It is written into a scratch copy
of the repository (the mutation script's copy: package, tests, presets), and the test files
that the mutation script maps to that module run there with ``pytest -x`` and the default
markers (``-m "not slow"``, from ``pyproject.toml``). A bug is *caught* when a test fails.

    python scripts/injected_bugs.py [--json results/mutation/injected_bugs.json] [NAME ...]

Exit status 0 when every bug is caught, 1 when one is not (its name is printed), 2 when a
replacement no longer matches the code (the bug list needs updating).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mutation_score as ms  # noqa: E402

ROOT = ms.ROOT

#: name -> (module, original text, buggy text, what the bug does)
BUGS = {
    "es_negated_fitness": (
        "metaplastic/outer/_evolution.py",
        "self.strategy.tell(k_tell, population, fit, es_state",
        "self.strategy.tell(k_tell, population, -fit, es_state",
        "the evolution strategy is told the negated fitness (it maximises the meta-loss)",
    ),
    "kolen_pollack_decay_sign": (
        "metaplastic/rules/_rules.py",
        "jnp.outer(s.e, s.x) - self.theta_fb[1] * B",
        "jnp.outer(s.e, s.x) + self.theta_fb[1] * B",
        "the Kolen-Pollack feedback decay term has its sign flipped",
    ),
    "bias_correction_frozen": (
        "metaplastic/rules/_signals.py",
        "(1.0 - rate) ** jnp.maximum(self.t, 1.0)",
        "(1.0 - rate) ** 1.0",
        "the running averages' bias correction (1 - r)^t is frozen at t = 1",
    ),
    "optimiser_state_from_bad_step": (
        "metaplastic/outer/_gradient.py",
        "opt_state=pick(new_opt, state.opt_state)",
        "opt_state=new_opt",
        "a skipped (bad) meta-step keeps the optimiser state it computed",
    ),
    "negated_optimiser_update": (
        "metaplastic/outer/_gradient.py",
        "new_params = optax.apply_updates(state.params, updates)",
        "new_params = optax.apply_updates(state.params, jax.tree_util.tree_map(lambda u: -u, "
        "updates))",
        "the optimiser's update is negated (meta-ascent)",
    ),
    "sign_symmetric_first_layer_only": (
        "metaplastic/inner/_feedback.py",
        "mats = tuple(jnp.sign(w) * jnp.mean(jnp.abs(w)) for w in fwd)",
        "mats = tuple(jnp.sign(w) * jnp.mean(jnp.abs(w)) if i == 0 else w "
        "for i, w in enumerate(fwd))",
        "sign-symmetric feedback on the first layer only (the exact transpose elsewhere)",
    ),
}


def run_bug(name: str, work: Path) -> dict:
    module, old, new, what = BUGS[name]
    scratch = ms.make_scratch(work, name)
    path = scratch / module
    text = path.read_text()
    if text.count(old) != 1:
        return {"name": name, "status": "stale", "module": module, "what": what}
    path.write_text(text.replace(old, new))
    tests = ms.CORE_TESTS[module]
    cache = Path(tempfile.gettempdir()) / "metaplastic-injected-jax"
    rc, out, secs = ms._run(ms.PYTEST + tests, scratch, ms._env(scratch, cache), None)
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", out, re.M)
    return {
        "name": name,
        "module": module,
        "what": what,
        "status": "caught" if rc not in (0, 5) else "missed",
        "caught_by": failed[0] if failed else None,
        "tests": tests,
        "seconds": round(secs, 1),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help=f"bugs to inject (default all: {', '.join(BUGS)})")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    unknown = [n for n in args.names if n not in BUGS]
    if unknown:
        print(f"unknown bug {unknown[0]!r}; choose from {', '.join(BUGS)}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="injected-"))
    results = []
    try:
        for name in args.names or list(BUGS):
            r = run_bug(name, work)
            results.append(r)
            print(f"{r['status']:7s} {name}: {r.get('caught_by') or r['what']}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        summary = {
            "command": "python scripts/injected_bugs.py " + " ".join(argv or sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d"),
            "commit": ms._git_commit(),
            "bugs": results,
        }
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    if any(r["status"] == "stale" for r in results):
        return 2
    return 0 if all(r["status"] == "caught" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
