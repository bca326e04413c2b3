"""The ``metaplastic`` command line."""

from __future__ import annotations

import datetime as _dt
import functools
import json
import sys
from pathlib import Path

import click

from ._errors import MetaplasticError


def _default_out(prefix: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{prefix}-{stamp}"


def _user_errors(fn):
    """Turn user errors into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MetaplasticError as err:
            click.echo(f"metaplastic: error: {err}", err=True)
            sys.exit(2)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="metaplastic")
def main():
    """Discover synaptic plasticity rules by meta-learning."""


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
        type=click.Path(path_type=Path),
        default=None,
        help="Run directory (default runs/<name>-<time>).",
    )(fn)
    fn = click.option("--quiet", is_flag=True, help="No progress bar.")(fn)
    return fn


@main.command()
@_train_options
@click.option("--meta-batch", type=int, default=None, help="Episodes per meta-step.")
@click.option("--eval-episodes", type=int, default=None, help="Held-out episodes (default 500).")
@_user_errors
def discover(seed, episodes, out, quiet, meta_batch, eval_episodes):
    """Meta-learn a rule for online FA learning on digits; compare with baselines."""
    from ._report import results_table
    from ._run import discover as run_discover

    out = out or _default_out("discover")
    train_table = {
        "seed": seed,
        "episodes": episodes,
        "meta_batch": meta_batch,
        "eval_episodes": eval_episodes,
    }
    summary = run_discover(out, train_table, progress=not quiet)
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
    help="Credit assignment: backprop, fa, dfa, sign_symmetric or kolen_pollack.",
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
    type=click.Path(path_type=Path),
    default=None,
    help="Continue the run in this directory from its newest valid checkpoint.",
)
@_user_errors
def train_cmd(
    rule,
    task,
    seed,
    episodes,
    out,
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
):
    """Meta-train RULE on TASK and evaluate it on held-out episodes."""
    from ._config import build_config
    from ._distributed import init_distributed
    from ._report import results_table
    from ._run import Interrupted, resume_run, train

    try:
        init_distributed(coordinator, num_processes, process_id)
        if resume is not None:
            given = [
                n
                for n, v in (
                    ("--rule", rule),
                    ("--task", task),
                    ("--seed", seed),
                    ("--episodes", episodes),
                    ("--out", out),
                    ("--meta-batch", meta_batch),
                    ("--feedback", feedback),
                    ("--lr", lr),
                    ("--outer", outer),
                )
                if v is not None
            ]
            if given or overrides:
                drop = ", ".join(given) or "--set"
                raise MetaplasticError(
                    f"--resume continues a run with its saved config; drop {drop}"
                )
            out = resume
            summary = resume_run(resume, progress=not quiet)
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
            out = out or _default_out(f"train-{cfg.rule.name}-{cfg.task.name}")
            summary = train(cfg, out, progress=not quiet)
    except Interrupted as err:
        click.echo(f"metaplastic: {err}", err=True)
        sys.exit(130)
    click.echo(results_table(summary["meta_test"]))
    click.echo(f"learned rule: {summary['rule_equation']}")
    click.echo(f"run directory: {out}")


def _load_run(run_dir: Path):
    from ._config import config_from_dict, read_toml
    from ._export import read_rule_file

    if not run_dir.is_dir():
        raise MetaplasticError(f"{run_dir}: no such run directory")
    cfg = config_from_dict(read_toml(run_dir / "config.toml"), str(run_dir / "config.toml"))
    return cfg, read_rule_file(run_dir)


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
@_user_errors
def evaluate(run_dir, episodes, equations, task, feedback, overrides):
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
            cfg, _ = _load_run(run_dir)
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
        return
    if run_dir is None:
        raise MetaplasticError("evaluate needs a RUN_DIR or --equation")
    if task or feedback or overrides:
        raise MetaplasticError("--task/--feedback/--set go with --equation")
    cfg, rule = _load_run(run_dir)
    res = evaluate_run(cfg, rule, episodes=episodes)
    (run_dir / "evaluate.json").write_text(json.dumps({"learned": res}, indent=2) + "\n")
    click.echo(results_table({"learned": res}))


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
    "accuracy on validation episodes from the meta-train images (default: "
    "train.prune_effect; 0 = off).",
)
@click.option("--prune-episodes", type=int, default=None, help="Validation episodes for pruning.")
@click.option(
    "--check/--no-check",
    default=True,
    help="Parse the exported equation back and report its held-out accuracy next to the "
    "learned parameters' (default on).",
)
@click.option("--check-episodes", type=int, default=None, help="Held-out episodes for --check.")
@_user_errors
def export(run_dir, fmt, threshold, prune_effect, prune_episodes, check, check_episodes):
    """Print a run's learned rule as an equation (and check that the equation performs)."""
    from ._export import export_run

    cfg, rule = _load_run(run_dir)
    th = cfg.train.prune_threshold if threshold is None else threshold
    if th < 0:
        raise MetaplasticError("--threshold must be >= 0")
    prune_effect = cfg.train.prune_effect if prune_effect is None else prune_effect
    prune_episodes = cfg.train.prune_episodes if prune_episodes is None else prune_episodes
    if prune_effect < 0:
        raise MetaplasticError("--prune-effect must be >= 0")
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
@_user_errors
def distill(run_dir, episodes, samples, method, alpha, check_episodes):
    """Fit a sparse polynomial to a run's learned rule (e.g. an MLP rule) and evaluate it."""
    from ._distill import distill_run

    cfg, rule = _load_run(run_dir)
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
    default="forward,reverse",
    help="Gradient modes to time (comma-separated: forward, reverse).",
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
    from ._config import list_presets, load_rule, load_task
    from ._terms import TERMS

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
            click.echo(
                f"{name:18s} {t.dataset} {t.n_way}-way K={t.k_shot} Q={t.q_query} "
                f"hidden={list(n.hidden)}  {t.description}"
                if t.kind == "classification"
                else f"{name:18s} [{t.kind}] dim={t.dim} steps={t.steps}  {t.description}"
            )


if __name__ == "__main__":  # pragma: no cover
    main()
