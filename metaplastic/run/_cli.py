"""The ``metaplastic`` command line."""

from __future__ import annotations

import datetime as _dt
import functools
import json
import sys
from pathlib import Path

import click

from .._errors import MetaplasticError, RunFailed


def _default_out(prefix: str, now: _dt.datetime | None = None) -> Path:
    """A new directory ``runs/<prefix>-<time>`` (``-2``, ``-3``, ... when taken), created
    here so that two runs started in the same second never share it."""
    stamp = (now or _dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{prefix}-{stamp}"
    for k in range(1, 1000):
        path = base if k == 1 else base.with_name(f"{base.name}-{k}")
        try:
            path.parent.mkdir(exist_ok=True)
            path.mkdir()
        except FileExistsError:
            if not path.parent.is_dir():
                raise MetaplasticError(
                    f"{path.parent} is not a directory; give --out DIR"
                ) from None
            continue
        except OSError as err:
            raise MetaplasticError(f"cannot create {path} ({err}); give --out DIR") from None
        return path
    raise MetaplasticError(f"{base}: 999 directories of that name exist; give --out DIR")


def _dir_arg(value: str | None, flag: str) -> Path | None:
    """A directory option; an empty string (which would mean the current directory) is an
    error."""
    if value is None:
        return None
    if not value.strip():
        raise MetaplasticError(
            f"{flag} {value!r} names no directory; give one, e.g. {flag} runs/mine"
        )
    return Path(value)


def _release(out: Path) -> None:
    """Remove a default run directory that a failed start left empty."""
    try:
        out.rmdir()
    except OSError:
        pass


def _user_errors(fn):
    """Turn user errors into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MetaplasticError as err:
            click.echo(f"metaplastic: error: {err}", err=True)
            sys.exit(2)
        except RunFailed as err:
            click.echo(f"metaplastic: run failed: {err}", err=True)
            sys.exit(1)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="metaplastic")
def main():
    """Discover synaptic plasticity rules by meta-learning."""


_TRUST_HELP = (
    "Loading a run: load its user-defined terms (the copies in RUN/user_terms/, checked "
    "against their recorded SHA-256, or modules named in its rule). Only for runs whose code "
    "you trust."
)


def _train_options(fn):
    fn = click.option("--seed", type=int, default=None, help="Random seed (default 0).")(fn)
    fn = click.option(
        "--episodes",
        type=int,
        default=None,
        help="Meta-training episodes in total (steps = episodes // meta-batch).",
    )(fn)
    fn = click.option(
        "--out",
        default=None,
        metavar="DIR",
        help="Run directory (default runs/<name>-<time>); must be new or empty unless --force.",
    )(fn)
    fn = click.option(
        "--force",
        is_flag=True,
        help="Replace the run in --out: delete its checkpoints, metrics, summary, rule files, "
        "plots and baselines first.",
    )(fn)
    fn = click.option("--trust-user-terms", is_flag=True, help=_TRUST_HELP)(fn)
    fn = click.option("--quiet", is_flag=True, help="No progress bar.")(fn)
    return fn


_SEEDS_HELP = (
    "Meta-training seeds: N > 1 runs seeds SEED..SEED+N-1 one after another into "
    "OUT/seed-<s>/ and writes their mean ± sd, 95% CI and the seed chosen on validation "
    "episodes to OUT/summary.json and OUT/results.md."
)


def _no_options_with_resume(values: dict, overrides=()) -> None:
    given = [name for name, v in values.items() if v not in (None, False)]
    if given or overrides:
        drop = ", ".join(given) or "--set"
        raise MetaplasticError(f"--resume continues a run with its saved config; drop {drop}")


@main.command()
@click.option("--rule", "rule", default=None, help="Rule preset name or TOML file (default: pool).")
@click.option(
    "--task", "task", default=None, help="Task preset name or TOML file (default: digits)."
)
@_train_options
@click.option("--meta-batch", type=int, default=None, help="Episodes per meta-step.")
@click.option("--eval-episodes", type=int, default=None, help="Held-out episodes (default 500).")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="SECTION.KEY=VALUE",
    help="Override a config value for every method (rule.* ones: the learned rule only), "
    "e.g. --set train.lr=0.003 (repeatable).",
)
@click.option(
    "--resume",
    default=None,
    metavar="DIR",
    help="Finish the interrupted discover run in this directory: the interrupted run "
    "continues from its checkpoint, the ones not yet started start, then the table.",
)
@click.option("--seeds", type=int, default=1, help=_SEEDS_HELP)
@_user_errors
def discover(
    rule,
    task,
    seed,
    episodes,
    out,
    force,
    trust_user_terms,
    quiet,
    meta_batch,
    eval_episodes,
    overrides,
    resume,
    seeds,
):
    """Meta-learn a rule for online FA learning; compare with FA and backprop baselines.

    The baselines learn only their learning rate (the pseudo-gradient term), starting where
    the learned rule's pseudo-gradient coefficient starts."""
    if seeds < 1:  # before any directory is made
        raise MetaplasticError(f"--seeds must be at least 1, got {seeds}")
    from ._report import results_table
    from ._run import (
        DISCOVER_METHODS,
        DISCOVER_TASK,
        Interrupted,
        check_new_run_dir,
        discover_configs,
        run_seeds,
    )
    from ._run import discover as run_discover

    out = _dir_arg(out, "--out")
    resume = _dir_arg(resume, "--resume")
    train_table = {
        "seed": seed,
        "episodes": episodes,
        "meta_batch": meta_batch,
        "eval_episodes": eval_episodes,
    }
    fresh_dir = False
    try:
        if resume is not None:
            _no_options_with_resume(
                {
                    "--rule": rule,
                    "--task": task,
                    "--seed": seed,
                    "--episodes": episodes,
                    "--meta-batch": meta_batch,
                    "--eval-episodes": eval_episodes,
                    "--out": out,
                    "--force": force,
                    "--seeds": seeds if seeds != 1 else None,
                },
                overrides,
            )
            out = resume
        else:
            # every config (names, overrides, data) is checked before a directory is made
            discover_configs(
                train_table, task or DISCOVER_TASK, DISCOVER_METHODS, list(overrides), rule
            )
            if out is None:
                out, fresh_dir = _default_out("discover"), True
            else:
                check_new_run_dir(out, force=force, command="discover")
        kw = {
            "progress": not quiet,
            "trust_user_terms": trust_user_terms,
            "task": task or DISCOVER_TASK,
            "rule": rule,
            "overrides": list(overrides),
        }
        if seeds != 1:
            agg = run_seeds(
                out,
                seeds,
                seed or 0,
                lambda s, d: run_discover(d, dict(train_table, seed=s), **kw),
            )
            click.echo((out / "results.md").read_text())
            click.echo(f"run directory: {out}  (status {agg['status']})")
            return
        try:
            summary = run_discover(out, train_table, resume=resume is not None, **kw)
        except MetaplasticError:
            if fresh_dir:
                _release(out)
            raise
    except Interrupted as err:
        click.echo(f"metaplastic: {err}", err=True)
        sys.exit(130)
    click.echo("")
    click.echo(results_table(summary["meta_test"]))
    click.echo("")
    click.echo(f"discovered rule: {summary['rule_equation']}")
    click.echo(f"run directory: {out}  ({summary['discover_s']:.0f} s)")


@main.command("train")
@click.option("--rule", "rule", default=None, help="Rule preset name or TOML file.")
@click.option("--task", "task", default=None, help="Task preset name or TOML file.")
@_train_options
@click.option("--meta-batch", type=int, default=None, help="Episodes per meta-step.")
@click.option(
    "--feedback",
    default=None,
    help="Credit assignment: backprop, fa, dfa, sign_symmetric, kolen_pollack or "
    "predictive_coding (or a registered pathway).",
)
@click.option("--lr", type=float, default=None, help="Outer learning rate.")
@click.option(
    "--outer",
    default=None,
    help="Outer loop: an optax optimiser (adam, sgd, ...) or an evosax strategy "
    "(open_es, cma_es, snes, pgpe, or an evosax class name such as PSO; a wrong name "
    "lists them all).",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="SECTION.KEY=VALUE",
    help="Override any config value, e.g. --set train.l1=1e-4 (repeatable).",
)
@click.option(
    "--coordinator",
    default=None,
    metavar="HOST:PORT",
    help="Multi-process run: address of process 0 (or METAPLASTIC_COORDINATOR).",
)
@click.option("--num-processes", type=int, default=None, help="Multi-process run: how many.")
@click.option("--process-id", type=int, default=None, help="Multi-process run: this one's id.")
@click.option(
    "--resume",
    default=None,
    metavar="DIR",
    help="Continue the run in this directory from its newest valid checkpoint.",
)
@click.option("--seeds", type=int, default=1, help=_SEEDS_HELP)
@_user_errors
def train_cmd(
    rule,
    task,
    seed,
    episodes,
    out,
    force,
    trust_user_terms,
    quiet,
    meta_batch,
    feedback,
    lr,
    outer,
    overrides,
    coordinator,
    num_processes,
    process_id,
    resume,
    seeds,
):
    """Meta-train RULE on TASK and evaluate it on held-out episodes."""
    if seeds < 1:  # before any directory is made
        raise MetaplasticError(f"--seeds must be at least 1, got {seeds}")
    from ._config import build_config
    from ._distributed import init_distributed
    from ._report import results_table
    from ._run import Interrupted, check_new_run_dir, resume_run, train

    out = _dir_arg(out, "--out")
    resume = _dir_arg(resume, "--resume")
    try:
        multi = init_distributed(coordinator, num_processes, process_id)
        if resume is not None:
            _no_options_with_resume(
                {
                    "--rule": rule,
                    "--task": task,
                    "--seed": seed,
                    "--episodes": episodes,
                    "--out": out,
                    "--force": force,
                    "--meta-batch": meta_batch,
                    "--feedback": feedback,
                    "--lr": lr,
                    "--outer": outer,
                },
                overrides,
            )
            out = resume
            summary = resume_run(resume, progress=not quiet, trust_user_terms=trust_user_terms)
        else:
            if rule is None or task is None:
                raise MetaplasticError("train needs --rule and --task (or --resume DIR)")
            cfg = build_config(
                rule,
                task,
                {
                    "seed": seed,
                    "episodes": episodes,
                    "meta_batch": meta_batch,
                    "feedback": feedback,
                    "lr": lr,
                    "outer": outer,
                },
                list(overrides),
            )
            if seeds != 1:
                import dataclasses

                from ._run import run_seeds

                if out is None:
                    out = _default_out(f"train-{cfg.rule.name}-{cfg.task.name}")
                else:
                    check_new_run_dir(out, force=force, command="train")

                def one(s, d):
                    c = cfg.replace(train=dataclasses.replace(cfg.train, seed=s))
                    return train(c, d, progress=not quiet)

                agg = run_seeds(out, seeds, cfg.train.seed, one)
                click.echo((out / "results.md").read_text())
                click.echo(f"run directory: {out}  (status {agg['status']})")
                return
            if out is None:
                if multi:
                    raise MetaplasticError(
                        "a multi-process run needs --out DIR, the same for every process"
                    )
                out = _default_out(f"train-{cfg.rule.name}-{cfg.task.name}")
                try:
                    summary = train(cfg, out, progress=not quiet)
                except MetaplasticError:
                    _release(out)
                    raise
            else:
                check_new_run_dir(out, force=force, command="train")
                summary = train(cfg, out, progress=not quiet)
    except Interrupted as err:
        click.echo(f"metaplastic: {err}", err=True)
        sys.exit(130)
    click.echo(results_table(summary["meta_test"]))
    click.echo(f"learned rule: {summary['rule_equation']}")
    click.echo(f"run directory: {out}")


def _load_run(run_dir: Path, trust_user_terms: bool = False, rule: bool = True):
    """A run's config and (with ``rule``) its learned rule; user terms load only when
    trusted, and only from the run's verified copies."""
    from ..export._export import read_rule_file
    from ._run import read_run_config

    cfg, _ = read_run_config(run_dir)
    if not rule:
        return cfg, None
    return cfg, read_rule_file(run_dir, trust_user_terms=trust_user_terms)


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path), required=False)
@click.option("--episodes", type=int, default=None, help="Held-out episodes (default: config).")
@click.option(
    "--equation",
    "equations",
    multiple=True,
    help="Evaluate this equation instead of a run's rule (repeat once per layer), e.g. "
    "--equation '-0.03*e*x.T + 0.01*(y*x.T - y*y.T*W)'.",
)
@click.option("--task", default=None, help="Task preset or file for --equation (default digits).")
@click.option("--feedback", default=None, help="Feedback pathway for --equation (default fa).")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE")
@click.option("--trust-user-terms", is_flag=True, help=_TRUST_HELP)
@_user_errors
def evaluate(run_dir, episodes, equations, task, feedback, overrides, trust_user_terms):
    """Evaluate a run's learned rule, or an equation, on held-out (meta-test) episodes."""
    from ._config import build_config
    from ._report import results_table
    from ._run import build_rule, build_setup, evaluate_run

    if episodes is not None and episodes < 1:
        raise MetaplasticError("--episodes must be at least 1")
    if equations:
        from ._config import RuleConfig, apply_overrides, parse_section

        if run_dir is not None:
            if task or feedback:
                raise MetaplasticError("with RUN_DIR the task comes from the run; drop --task")
            cfg, _ = _load_run(run_dir, rule=False)
        else:
            cfg = build_config("pseudo_gradient", task or "digits", {"feedback": feedback})
        rule_cfg = parse_section(
            RuleConfig,
            {"kind": "equation", "equations": list(equations)},
            "--equation",
            RuleConfig(name="equation"),
        )
        cfg = apply_overrides(cfg.replace(rule=rule_cfg), overrides)
        setup = build_setup(cfg)
        rule = build_rule(cfg, setup.net.n_layers)
        res = evaluate_run(cfg, rule, setup, episodes=episodes)
        click.echo(results_table({"equation": res}))
        _fail_if_diverged(cfg, res, "the equation")
        return
    if run_dir is None:
        raise MetaplasticError("evaluate needs a RUN_DIR or --equation")
    if task or feedback or overrides:
        raise MetaplasticError("--task/--feedback/--set go with --equation")
    cfg, rule = _load_run(run_dir, trust_user_terms)
    res = evaluate_run(cfg, rule, episodes=episodes)
    (run_dir / "evaluate.json").write_text(json.dumps({"learned": res}, indent=2) + "\n")
    click.echo(results_table({"learned": res}))
    _fail_if_diverged(cfg, res, f"the rule of {run_dir}")


def _fail_if_diverged(cfg, res: dict, what: str) -> None:
    """Exit 1 (one line, after the table) when the evaluated rule blew up on more than
    ``train.max_diverged`` of the held-out episodes: its accuracy is not a result."""
    if res["diverged"] > cfg.train.max_diverged * res["episodes"]:
        click.echo(
            f"metaplastic: {what} diverged on {res['diverged']} of {res['episodes']} held-out "
            f"episodes (limit train.max_diverged = {cfg.train.max_diverged:g}); those score 0",
            err=True,
        )
        sys.exit(1)


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--format", "fmt", default="text", help="text, latex, json or python.")
@click.option(
    "--threshold",
    type=float,
    default=None,
    help="Prune coefficients with |theta| at or below this (default: config).",
)
@click.option(
    "--prune-effect",
    type=float,
    default=None,
    metavar="TOL",
    help="Also drop each coefficient (smallest first) whose removal costs less than TOL "
    "accuracy on validation episodes (the validation split; default: "
    "train.prune_effect; 0 = off).",
)
@click.option("--prune-episodes", type=int, default=None, help="Validation episodes for pruning.")
@click.option(
    "--prune-refit",
    type=int,
    default=None,
    metavar="STEPS",
    help="With --prune-effect: a coefficient whose removal alone costs more than TOL is "
    "still dropped if refitting the others for STEPS meta-steps brings the score back "
    "(default: train.prune_refit; 0 = off).",
)
@click.option(
    "--check/--no-check",
    default=True,
    help="Parse the exported equation back and report its held-out accuracy next to the "
    "learned parameters' (default on).",
)
@click.option("--check-episodes", type=int, default=None, help="Held-out episodes for --check.")
@click.option(
    "--allow-failed",
    is_flag=True,
    help="Export the rule of a run that failed (diverged, mostly skipped, or no better than "
    "its start) or did not finish; refused by default.",
)
@click.option("--trust-user-terms", is_flag=True, help=_TRUST_HELP)
@_user_errors
def export(
    run_dir,
    fmt,
    threshold,
    prune_effect,
    prune_episodes,
    prune_refit,
    check,
    check_episodes,
    allow_failed,
    trust_user_terms,
):
    """Print a run's learned rule as an equation (and check that the equation performs)."""
    from ..outer import OPTIMIZERS
    from ._exporting import export_run
    from ._run import check_run_usable

    cfg, rule = _load_run(run_dir, trust_user_terms)
    if not allow_failed:
        check_run_usable(run_dir)
    th = cfg.train.prune_threshold if threshold is None else threshold
    if th < 0:
        raise MetaplasticError("--threshold must be >= 0")
    prune_effect = cfg.train.prune_effect if prune_effect is None else prune_effect
    prune_episodes = cfg.train.prune_episodes if prune_episodes is None else prune_episodes
    prune_refit = cfg.train.prune_refit if prune_refit is None else prune_refit
    if prune_effect < 0:
        raise MetaplasticError("--prune-effect must be >= 0")
    if prune_refit < 0:
        raise MetaplasticError("--prune-refit must be >= 0")
    if prune_refit > 0 and cfg.train.outer not in OPTIMIZERS:
        raise MetaplasticError(
            f"--prune-refit refits with a gradient outer loop; this run used "
            f"{cfg.train.outer!r} (an evolution strategy): use --prune-refit 0"
        )
    if prune_episodes < 1 or (check_episodes is not None and check_episodes < 1):
        raise MetaplasticError("--prune-episodes and --check-episodes must be at least 1")
    text, report = export_run(
        run_dir,
        cfg,
        rule,
        fmt,
        th,
        prune_effect=prune_effect or None,
        prune_episodes=prune_episodes,
        prune_refit=prune_refit,
        check=check,
        check_episodes=check_episodes,
    )
    click.echo(text)
    if report:
        click.echo(report, err=fmt in ("latex", "python", "json"))


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option(
    "--episodes", type=int, default=20, help="Meta-train episodes to sample signals from."
)
@click.option("--samples", type=int, default=50000, help="Synapse samples for the fit.")
@click.option("--method", default="stlsq", help="stlsq (thresholded least squares) or lasso.")
@click.option("--alpha", type=float, default=None, help="Threshold (stlsq) or penalty (lasso).")
@click.option("--check-episodes", type=int, default=None, help="Held-out episodes for accuracy.")
@click.option("--trust-user-terms", is_flag=True, help=_TRUST_HELP)
@_user_errors
def distill(run_dir, episodes, samples, method, alpha, check_episodes, trust_user_terms):
    """Fit a sparse polynomial to a run's learned rule (e.g. an MLP rule) and evaluate it."""
    from ._exporting import distill_run

    cfg, rule = _load_run(run_dir, trust_user_terms)
    if episodes < 1 or samples < 100:
        raise MetaplasticError("--episodes must be >= 1 and --samples >= 100")
    summary = distill_run(
        run_dir,
        cfg,
        rule,
        episodes=episodes,
        samples=samples,
        method=method,
        alpha=alpha,
        check_episodes=check_episodes,
    )
    click.echo(summary["equation"])
    click.echo(
        f"fit R^2 = {summary['r2']:.4f} (held-out synapse samples); "
        f"{summary['n_terms']} of 81 monomials"
    )
    click.echo(summary["table"])
    click.echo(f"written: {run_dir / 'distilled.json'}")


@main.command()
@click.option("--rule", "rule", default="reference_pool", help="Rule preset or TOML file.")
@click.option("--task", "task", default="fashion_mnist_reference", help="Task preset or file.")
@click.option(
    "--json",
    "json_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Also write the results to this JSON file.",
)
@click.option("--repeats", type=int, default=5, help="Timing repeats (the median is kept).")
@click.option("--unrolls", default="250,1000,4000", help="Unroll lengths for peak memory.")
@click.option(
    "--meta-batch",
    type=int,
    default=0,
    help="Episodes per timed meta-step (times are per episode); 0 = the task's.",
)
@click.option(
    "--modes",
    default="auto,forward,reverse,checkpoint,reconstruct,native",
    help="Gradient modes to time and measure (comma-separated: auto, forward, reverse, "
    "checkpoint, reconstruct, native; native is recorded as unusable where the set-up is "
    "outside its scope).",
)
@click.option(
    "--vmap-width",
    type=int,
    default=None,
    help="train.vmap_width for the timed meta-steps (default: the config's; -1 = vmap the "
    "whole meta-batch at once).",
)
@_user_errors
def bench(rule, task, json_path, repeats, unrolls, meta_batch, modes, vmap_width):
    """Time meta-gradients and ES evaluation; measure peak memory vs unroll length."""
    from ._bench import run_bench

    try:
        lengths = tuple(int(u) for u in unrolls.split(",") if u.strip())
    except ValueError:
        raise MetaplasticError(f"--unrolls {unrolls!r}: give comma-separated integers") from None
    mode_list = tuple(m.strip() for m in modes.split(",") if m.strip())
    res = run_bench(
        rule,
        task,
        repeats=max(1, repeats),
        unrolls=lengths,
        progress=lambda m: click.echo(m, err=True),
        meta_batch=meta_batch,
        modes=mode_list,
        vmap_width=vmap_width,
    )
    text = json.dumps(res, indent=2)
    click.echo(text)
    if json_path is not None:
        json_path.write_text(text + "\n")


@main.command("list")
@click.argument("what", type=click.Choice(["rules", "tasks", "terms"]))
@_user_errors
def list_cmd(what):
    """List rule presets, task presets or built-in terms."""
    from ..rules._terms import TERMS
    from ._config import list_presets, load_rule, load_task

    if what == "terms":
        for name, cls in TERMS.items():
            click.echo(f"{name:18s} {cls.description}")
    elif what == "rules":
        for name in list_presets("rules"):
            r = load_rule(name)
            what = ", ".join(r.terms) if r.kind == "term_pool" else f"[{r.kind}]"
            click.echo(f"{name:18s} {what}  {r.description}")
    else:
        for name in list_presets("tasks"):
            t, n, _ = load_task(name)
            if t.kind == "classification":
                what = f"{t.dataset} {t.n_way}-way K={t.k_shot} Q={t.q_query}"
            elif t.kind == "continual":
                what = (
                    f"[continual] {t.dataset} {t.n_way} classes in {t.stages} stages of "
                    f"{t.stage_steps} updates, K={t.k_shot} Q={t.q_query}"
                )
            else:
                click.echo(f"{name:18s} [{t.kind}] dim={t.dim} steps={t.steps}  {t.description}")
                continue
            click.echo(f"{name:18s} {what} hidden={list(n.hidden)}  {t.description}")


if __name__ == "__main__":  # pragma: no cover
    main()
