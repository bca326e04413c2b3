"""The application layer: configs and presets, building a run from a config, the train
and discover loops with checkpoints and failure checks, reports and plots, export and
distillation of runs, benchmarks and the command line."""

from ._bench import (
    bench_trainer,
    run_bench,
)
from ._chaos import (
    kill_and_resume,
)
from ._config import (
    SECTIONS,
    RunConfig,
    apply_overrides,
    build_config,
    load_rule,
    load_task,
    parse_override,
)
from ._exporting import (
    distill_run,
    export_run,
)
from ._report import (
    plot_curves,
    plot_evolution,
    plot_meta_test,
    plot_seeds,
    results_table,
    seeds_table,
)
from ._run import (
    DISCOVER_METHODS,
    DISCOVER_TASK,
    Interrupted,
    Setup,
    aggregate_seeds,
    build_rule,
    build_setup,
    check_new_run_dir,
    discover,
    discover_configs,
    eval_key,
    evaluate_run,
    finished_summary,
    keep_failed,
    make_trainer,
    read_run_config,
    resume_run,
    run_seeds,
    train,
    units_key,
    validate_rule,
    validation_key,
)

__all__ = [
    "DISCOVER_METHODS",
    "DISCOVER_TASK",
    "Interrupted",
    "RunConfig",
    "SECTIONS",
    "Setup",
    "aggregate_seeds",
    "apply_overrides",
    "bench_trainer",
    "build_config",
    "build_rule",
    "build_setup",
    "check_new_run_dir",
    "discover",
    "discover_configs",
    "distill_run",
    "eval_key",
    "evaluate_run",
    "export_run",
    "finished_summary",
    "keep_failed",
    "kill_and_resume",
    "load_rule",
    "load_task",
    "make_trainer",
    "parse_override",
    "plot_curves",
    "plot_evolution",
    "plot_meta_test",
    "plot_seeds",
    "read_run_config",
    "results_table",
    "resume_run",
    "run_bench",
    "run_seeds",
    "seeds_table",
    "train",
    "units_key",
    "validate_rule",
    "validation_key",
]
