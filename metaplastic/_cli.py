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
@click.option("--feedback", default=None, help="Credit assignment: fa or backprop.")
@click.option("--lr", type=float, default=None, help="Outer learning rate.")
@click.option(
    "--outer",
    default=None,
    help="Outer loop: an optax optimiser (adam, sgd, ...) or an evosax strategy "
    "(open_es, cma_es, snes, pgpe, or any evosax class name).",
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
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--episodes", type=int, default=None, help="Held-out episodes (default: config).")
@_user_errors
def evaluate(run_dir, episodes):
    """Evaluate a run's learned rule on held-out (meta-test) episodes."""
    from ._report import results_table
    from ._run import evaluate_run

    cfg, rule = _load_run(run_dir)
    if episodes is not None and episodes < 1:
        raise MetaplasticError("--episodes must be at least 1")
    res = evaluate_run(cfg, rule, episodes=episodes)
    (run_dir / "evaluate.json").write_text(json.dumps({"learned": res}, indent=2) + "\n")
    click.echo(results_table({"learned": res}))


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--format", "fmt", default="text", help="text, latex or json.")
@click.option(
    "--threshold",
    type=float,
    default=None,
    help="Prune coefficients with |theta| at or below this (default: config).",
)
@_user_errors
def export(run_dir, fmt, threshold):
    """Print a run's learned rule as an equation."""
    from ._export import format_rule

    cfg, rule = _load_run(run_dir)
    th = cfg.train.prune_threshold if threshold is None else threshold
    if th < 0:
        raise MetaplasticError("--threshold must be >= 0")
    click.echo(format_rule(rule, fmt, th))


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
@_user_errors
def bench(rule, task, json_path, repeats, unrolls):
    """Time meta-gradients and ES evaluation; measure peak memory vs unroll length."""
    from ._bench import run_bench

    try:
        lengths = tuple(int(u) for u in unrolls.split(",") if u.strip())
    except ValueError:
        raise MetaplasticError(f"--unrolls {unrolls!r}: give comma-separated integers") from None
    res = run_bench(
        rule,
        task,
        repeats=max(1, repeats),
        unrolls=lengths,
        progress=lambda m: click.echo(m, err=True),
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
            click.echo(f"{name:18s} {', '.join(r.terms)}  {r.description}")
    else:
        for name in list_presets("tasks"):
            t, n, _ = load_task(name)
            click.echo(
                f"{name:18s} {t.dataset} {t.n_way}-way K={t.k_shot} Q={t.q_query} "
                f"hidden={list(n.hidden)}  {t.description}"
            )


if __name__ == "__main__":  # pragma: no cover
    main()
