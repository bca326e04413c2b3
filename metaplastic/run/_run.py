"""Drive meta-training and evaluation; write the run directory."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tomli_w

from .._errors import MetaplasticError, RunFailed
from .._io import atomic_write
from ..export._export import write_rule_files
from ..inner._feedback import CREDIT_PATHWAYS, AbstractCreditPathway, check_mode
from ..inner._network import AbstractNetwork, Network, network_from_config
from ..outer import AbstractTrainer, OuterState, trainer_for
from ..outer._units import units_record
from ..rules._rule_kinds import EquationRule, MLPRule, TaylorRule
from ..rules._rules import AbstractRule, PlasticFeedback, TermPoolRule
from ..rules._user_terms import (
    USER_TERMS_DIR,
    check_manifest,
    copy_sources,
    read_sources,
    run_user_terms,
)
from ..tasks._data import ImagePool, load_dataset, split_pools, split_validation
from ..tasks._problem import Problem, evaluate_outcomes
from ..tasks._stats import mean_ci95
from ..tasks._task import AbstractTask, task_class
from ._checkpoint import load_latest, save_checkpoint
from ._config import RunConfig
from ._distributed import process_dir
from ._report import plot_training

#: Stop a gradient run after this many bad (reverted, backed-off) meta-steps in a row: the
#: step size is then 2**-8 of the configured one and the rule is stuck at a cliff.
MAX_BAD_RUN = 8
#: ... or once back-offs have shrunk the step size below this fraction of ``train.lr``.
MIN_LR_SCALE = 1e-3
#: Stop an ES run whose first this-many generations all blew up.
ALL_DIVERGED_PATIENCE = 5


def _backed_off_too_far(state, step: int) -> str | None:
    """Why a gradient run must stop (``None`` if it need not): too many bad meta-steps in
    a row, or back-offs shrank the step size below ``MIN_LR_SCALE`` of ``train.lr``."""
    if not isinstance(state, OuterState):
        return None
    bad_run, scale = int(state.bad_run), float(state.lr_scale)
    if bad_run < MAX_BAD_RUN and scale >= MIN_LR_SCALE:
        return None
    return (
        f"diverged: by meta-step {step} the outer loop had reverted bad steps (non-finite "
        f"meta-gradient or episodes blowing up) until the step size was {scale:.1e} of "
        f"train.lr ({bad_run} bad in a row); the rule sits at the edge of a divergent region: "
        "lower train.lr or the rule's init coefficients"
    )


@dataclass
class Setup:
    """The objects a config resolves to."""

    net: AbstractNetwork
    task: AbstractTask
    meta_train: ImagePool | None
    meta_test: ImagePool | None
    meta_val: ImagePool | None = None

    def problem(self, cfg: RunConfig, pool: str = "train") -> Problem:
        """The meta-learning problem on the ``"train"``, ``"val"`` or ``"test"`` images."""
        pools = {"train": self.meta_train, "val": self.meta_val, "test": self.meta_test}
        return Problem(
            net=self.net,
            feedback=make_pathway(cfg),
            task=self.task,
            pool=pools[pool],
            remat=cfg.train.remat,
        )


_DATA_CACHE: dict[str, Any] = {}


def build_setup(cfg: RunConfig) -> Setup:
    """Task, network and data splits of a run config (``task.kind`` picks the task class
    from :data:`metaplastic.tasks.TASKS`, ``network.kind`` the network class)."""
    cls = task_class(cfg.task.kind)
    task = cls.from_config(cfg.task, cfg.train)
    if not cls.uses_images:
        if cfg.task.kind == "pca":
            if cfg.network.hidden:
                raise MetaplasticError(
                    f"task {cfg.task.name}: a pca task is one linear neuron; set "
                    "network.hidden = []"
                )
            if cfg.network.kind != "mlp":
                raise MetaplasticError(
                    f"task {cfg.task.name}: a pca task is one linear neuron; network.kind = "
                    f"{cfg.network.kind!r} does not apply (remove it)"
                )
            net = Network(sizes=(cfg.task.dim, 1), activation="linear", bias=False)
        else:
            sizes = (cfg.task.dim, *cfg.network.hidden, cfg.network.n_out or cfg.task.n_way)
            net = network_from_config(cfg.network, sizes)
        return Setup(net, task, None, None)
    key = (cfg.task.dataset, cfg.task.data_dir, cfg.task.emnist_split)
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = load_dataset(*key)
    ds = _DATA_CACHE[key]
    meta_train, meta_test = split_pools(ds, cfg.task.test_fraction, cfg.task.split_seed)
    k_q = cfg.task.k_shot + cfg.task.q_query
    meta_train, meta_val = split_validation(meta_train, cfg.task.val_fraction, k_q)
    task.check(meta_train, f"task {cfg.task.name} (meta-train split)")
    task.check(meta_val, f"task {cfg.task.name} (validation split; see task.val_fraction)")
    task.check(meta_test, f"task {cfg.task.name} (meta-test split)")
    n_out = cfg.network.n_out or cfg.task.n_way
    if n_out < cfg.task.n_way:
        raise MetaplasticError(
            f"network.n_out={n_out} is smaller than task.n_way={cfg.task.n_way}; every "
            "episode class needs an output unit (0 = n_way)"
        )
    net = network_from_config(cfg.network, (ds.dim, *cfg.network.hidden, n_out))
    return Setup(net, task, meta_train, meta_test, meta_val)


def build_rule(cfg: RunConfig, n_layers: int) -> AbstractRule:
    """The rule ``cfg.rule`` describes, wrapped with feedback plasticity for
    ``kolen_pollack``."""
    r = cfg.rule
    per_layer = None if r.shared else n_layers
    if r.kind == "taylor":
        rule = TaylorRule.from_monomials(r.monomials, r.init, per_layer)
    elif r.kind == "mlp":
        rule = MLPRule.init(r.mlp_hidden, r.mlp_scale, r.mlp_seed, r.mlp_pseudo_gradient)
    elif r.kind == "equation":
        rule = EquationRule.from_text(list(r.equations), r.state_rate)
        if len(rule.exprs) not in (1, n_layers):
            raise MetaplasticError(
                f"rule {r.name}: {len(rule.exprs)} equations for a {n_layers}-layer network; "
                "give one for all layers or one per layer"
            )
    else:
        init = list(r.init) if r.init else [0.0] * len(r.terms)
        mask = list(r.mask) if r.mask else None
        rule = TermPoolRule.from_names(
            r.terms, init, mask, per_layer, rate=r.state_rate, target=r.scaling_target
        )
    if make_pathway(cfg).plastic:
        rule = PlasticFeedback(rule, jnp.asarray(r.feedback_init, jnp.float32))
    return rule


def make_pathway(cfg: RunConfig) -> AbstractCreditPathway:
    """The credit pathway ``train.feedback`` names, with its settings from ``[train]``."""
    return CREDIT_PATHWAYS[check_mode(cfg.train.feedback)].from_config(cfg.train)


def eval_key(cfg: RunConfig) -> jax.Array:
    """Meta-test episodes depend only on the seed, so methods are compared on the same ones."""
    return jax.random.fold_in(jax.random.key(cfg.train.seed), 2**20)


def units_key(cfg: RunConfig) -> jax.Array:
    """Probe episodes (meta-train images) that measure ``train.units = "episode"``."""
    return jax.random.fold_in(jax.random.key(cfg.train.seed), 2**22)


def validation_key(cfg: RunConfig) -> jax.Array:
    """Episodes for decisions made after training (end-of-run checks, seed selection,
    pruning by effect, distillation): drawn from the validation images (``task.val_fraction``
    of the meta-train side, never used by the outer loop) with their own key."""
    return jax.random.fold_in(jax.random.key(cfg.train.seed), 2**21)


class _StallWatch:
    """Notices a gradient outer loop that stopped moving although its meta-gradients are
    finite: the signature of a gradient so large (> ~1e19) that its square overflows, so
    clipping and Adam turn it into a zero update. Checked on the host, on logged steps, so
    the compiled meta-step is unchanged. Warns once, after ``patience`` such steps in a row.
    """

    def __init__(self, label: str, patience: int = 5):
        self.label, self.patience = label, patience
        self.prev, self.run, self.warned = None, 0, False

    def update(self, state, row) -> str | None:
        if not isinstance(state, OuterState):
            return None
        params = [np.asarray(x) for x in jax.tree_util.tree_leaves(state.params)]
        same = self.prev is not None and all(
            np.array_equal(a, b) for a, b in zip(params, self.prev, strict=True)
        )
        self.prev = params
        if same and row.get("grad_finite", False):
            self.run += 1
        else:
            self.run = 0
        if self.run >= self.patience and not self.warned:
            self.warned = True
            return (
                f"metaplastic: warning: {self.label}: {self.run} meta-steps in a row changed no "
                "coefficient although every meta-gradient was finite; the gradient has "
                "probably overflowed (|g| > 1e19, e.g. an exploding rule). Set "
                "train.grad_limit = 1e12 to rescale such gradients."
            )
        return None


def _to_float(x) -> float | None:
    v = float(x)
    return v if np.isfinite(v) else None


def _scalar(x):
    """A JSON value for a 0-d metric: bool, int, or float (``None`` when not finite)."""
    a = np.asarray(x)
    if a.dtype == bool:
        return bool(a)
    if np.issubdtype(a.dtype, np.integer):
        return int(a)
    return _to_float(a)


def make_trainer(cfg: RunConfig, setup: Setup, rule, trainable=None) -> AbstractTrainer:
    """The outer loop ``cfg.train.outer`` names (an optax optimiser, an evosax strategy, or
    a registered trainer), built by its class from ``[train]``.

    ``trainable`` (gradient outer loops only): a 1/0 pytree like the rule's parameters;
    coefficients at 0 stay frozen (see :class:`~metaplastic.outer.GradientTrainer`)."""
    cls = trainer_for(cfg.train.outer)
    problem = setup.problem(cfg, "train")
    return cls.from_config(cfg.train, problem, rule, units_key=units_key(cfg), trainable=trainable)


def _refuse_native_early(cfg: RunConfig, setup: Setup) -> None:
    """``train.gradient = "native"`` outside its scope: one line before anything is
    written (the trainer would refuse too, but only after the run directory is made)."""
    from ..outer._gradient import GradientTrainer, native_refusal

    if cfg.train.gradient != "native" or not GradientTrainer.accepts(cfg.train.outer):
        return  # evolution strategies do not read train.gradient

    r = cfg.rule
    if r.kind == "term_pool" and any(":" in t for t in r.terms):
        why = "it implements built-in terms only, not user terms"
    else:
        rule = build_rule(cfg, setup.net.n_layers)
        why = native_refusal(setup.problem(cfg, "train"), rule, cfg.train.truncation)
    if why:
        raise MetaplasticError(f"train.gradient = 'native' cannot be used: {why}")


def validate_rule(cfg: RunConfig, setup: Setup, rule) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, diverged)`` of ``rule`` on ``train.val_episodes`` validation episodes
    (the same episodes for every rule of a run, so comparisons are paired)."""
    problem = setup.problem(cfg, "val")
    return evaluate_outcomes(
        problem, rule, validation_key(cfg), cfg.train.val_episodes, metric="score"
    )


def _val_record(scores: np.ndarray, diverged: np.ndarray) -> dict[str, Any]:
    m, lo, hi = mean_ci95(scores)
    return {
        "score": m,
        "ci95": [lo, hi],
        "diverged": int(np.sum(diverged)),
        "episodes": int(scores.size),
    }


def _diverged_status(what: str, diverged: np.ndarray, limit: float) -> str | None:
    k, n = int(np.sum(diverged)), int(diverged.size)
    if k > limit * n:
        return (
            f"diverged: {what} blew up (non-finite weights or outputs) on {k} of {n} "
            f"validation episodes (limit train.max_diverged = {limit:g}); lower the rule's "
            "init coefficients or train.lr"
        )
    return None


def run_status(
    cfg: RunConfig,
    start: tuple[np.ndarray, np.ndarray],
    final: tuple[np.ndarray, np.ndarray],
    skipped: int,
    steps: int,
) -> tuple[str, dict[str, Any]]:
    """``"ok"`` or why the run failed, and the numbers behind it.

    In order: the learned rule diverges on more than ``train.max_diverged`` of the
    validation episodes; more than ``train.max_skipped`` of the meta-steps were bad; or
    (with ``train.require_improvement``) the paired 95% CI of (learned − start) validation
    score does not lie above 0.
    """
    t = cfg.train
    diff = final[0].astype(np.float64) - start[0].astype(np.float64)
    m, lo, hi = mean_ci95(diff)
    info = {"improvement": {"mean": m, "ci95": [lo, hi]}, "skipped_fraction": skipped / steps}
    status = _diverged_status("the learned rule", final[1], t.max_diverged)
    if status is None and skipped > t.max_skipped * steps:
        status = (
            f"skipped: {skipped} of {steps} meta-steps were bad and reverted (limit "
            f"train.max_skipped = {t.max_skipped:g}); lower train.lr or the rule's init "
            "coefficients"
        )
    if status is None and t.require_improvement and not lo > 0:
        status = (
            f"no_improvement: the learned rule is no better than its starting point on "
            f"validation episodes (difference {m:+.4f}, 95% CI [{lo:+.4f}, {hi:+.4f}]); "
            "train longer or with a larger train.lr, or set train.require_improvement = false"
        )
    return status or "ok", info


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; the state was checkpointed at ``step``.

    ``resume`` is the command that continues the work (default: ``metaplastic train
    --resume RUN_DIR``); ``what`` names the interrupted part (e.g. "the fa baseline").
    ``step`` is ``None`` when the signal arrived between two runs (nothing to checkpoint).
    """

    def __init__(
        self, run_dir: Path, step: int | None, *, resume: str | None = None, what: str = ""
    ):
        resume = resume or f"metaplastic train --resume {run_dir}"
        of = f" of {what}" if what else ""
        if step is None:
            head = f"interrupted after {what or 'a run'} finished"
        else:
            head = f"interrupted at meta-step {step}{of}; checkpoint saved"
        super().__init__(f"{head}. Continue with: {resume}")
        self.run_dir, self.step, self.resume = run_dir, step, resume


class _StopFlag:
    """Turns SIGINT/SIGTERM into a flag checked between meta-steps (main thread only).

    Flags nest: a flag entered while another is active (a ``train`` inside ``discover``)
    is also set when the enclosing one caught a signal before the inner one was installed.
    """

    _active: list[_StopFlag] = []  # entered flags, innermost last

    def __init__(self):
        self._set = False
        self._old = {}
        self._parent = None

    @property
    def set(self) -> bool:
        return self._set or (self._parent is not None and self._parent.set)

    @set.setter
    def set(self, value: bool) -> None:
        self._set = bool(value)

    def __enter__(self):
        self._parent = _StopFlag._active[-1] if _StopFlag._active else None
        _StopFlag._active.append(self)
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.set = True

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}
        if _StopFlag._active and _StopFlag._active[-1] is self:
            _StopFlag._active.pop()
        return False


# --- run directories ------------------------------------------------------------------------

#: What a run writes in its directory (``discover`` and the other commands included): a new
#: run (``--force``) deletes exactly these, so no file of an older run survives into it.
RUN_FILES = (
    "config.toml",
    "metrics.jsonl",
    "summary.json",
    "rule.json",
    "rule.tex",
    "meta_loss.png",
    "meta_accuracy.png",
    "coefficients.png",
    "results.md",
    "meta_test.png",
    "discover.json",
    "evaluate.json",
    "export.json",
    "distilled.json",
)
RUN_DIRS = ("checkpoints", "baselines", USER_TERMS_DIR)
#: Any of these marks a directory as a metaplastic run (``--force`` replaces only runs).
RUN_MARKERS = ("config.toml", "metrics.jsonl", "summary.json", "rule.json", "checkpoints")
#: The table of ``config.toml`` that records the run's copied user-term files.
USER_TERMS_TABLE = "user_terms"


def _entries(d: Path) -> list[Path]:
    """What ``d`` holds, less other processes' ``process-<i>`` folders in a multi-process
    run (those belong to the other processes)."""
    multi = jax.process_count() > 1
    return [p for p in d.iterdir() if not (multi and p.name.startswith("process-"))]


def is_run_dir(d: Path) -> bool:
    return any((d / m).exists() for m in RUN_MARKERS)


def clear_run_dir(d: Path) -> None:
    """Delete the files a run writes (:data:`RUN_FILES`, :data:`RUN_DIRS`, half-written
    temporaries, and in a single-process run stale ``process-<i>`` folders); other files
    stay."""
    if not d.is_dir():
        return
    for name in RUN_FILES:
        p = d / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
    stale = [d / name for name in RUN_DIRS]
    stale += list(d.glob(".*.tmp-*"))
    if jax.process_count() == 1:
        stale += list(d.glob("process-*"))
    for p in stale:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def check_new_run_dir(out: Path, *, force: bool, command: str = "train") -> None:
    """Refuse to start a run in a directory that already holds files, unless ``force``
    (then only a run directory is accepted; :func:`train` clears the old run's files)."""
    d = process_dir(out)
    if not d.exists():
        return
    if not d.is_dir():
        raise MetaplasticError(f"--out {d}: exists and is not a directory; pick another --out")
    if not _entries(d):
        return
    if not force:
        raise MetaplasticError(
            f"--out {d} already holds files; continue that run with `metaplastic {command} "
            f"--resume {out}`, replace it with --force, or pick another --out"
        )
    if not is_run_dir(d):
        raise MetaplasticError(
            f"--out {d} is not empty and holds no metaplastic run; --force replaces only run "
            "directories, so pick another --out"
        )


def read_run_config(run_dir: Path) -> tuple[RunConfig, dict[str, dict[str, str]]]:
    """A run's config and the record of its copied user-term files."""
    from ._config import config_from_dict, read_toml

    if not run_dir.is_dir():
        raise MetaplasticError(f"{run_dir}: no such run directory")
    path = run_dir / "config.toml"
    if not path.is_file():
        raise MetaplasticError(
            f"{run_dir}: not a run directory (no config.toml); start a run there with "
            f"metaplastic train --rule RULE --task TASK --out {run_dir}"
        )
    data = read_toml(path)
    manifest = check_manifest(data.pop(USER_TERMS_TABLE, None), f"{path}: [{USER_TERMS_TABLE}]")
    return config_from_dict(data, str(path)), manifest


def start_run_dir(out: Path, cfg: RunConfig) -> dict[str, dict[str, str]]:
    """Make ``out`` a fresh run of ``cfg``: delete an older run's files, copy the rule's
    user-term files into ``out/user_terms/``, write ``config.toml`` (with their SHA-256).
    Returns the user-term record."""
    terms = cfg.rule.terms if cfg.rule.kind == "term_pool" else ()
    sources = read_sources(terms)  # the user's files, read before anything is deleted
    clear_run_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = copy_sources(sources, out)
    data: dict[str, Any] = cfg.to_dict()
    if manifest:
        data[USER_TERMS_TABLE] = manifest
    atomic_write(out / "config.toml", tomli_w.dumps(data).encode())
    return manifest


def _read_metrics(path: Path, n_lines: int) -> list[dict]:
    """The first ``n_lines`` rows of ``metrics.jsonl``; the file is cut back to them."""
    lines = path.read_text().splitlines() if path.exists() else []
    if len(lines) < n_lines:
        raise MetaplasticError(
            f"{path}: has {len(lines)} rows but the checkpoint expects {n_lines}; restore the "
            "file or start the run again"
        )
    keep = lines[:n_lines]
    path.write_text("".join(line + "\n" for line in keep))
    return [json.loads(line) for line in keep]


class _Selection:
    """The best rule on the validation episodes so far (``train.select_every``)."""

    def __init__(self, cfg: RunConfig, rule, val: tuple[np.ndarray, np.ndarray]):
        self.limit = cfg.train.max_diverged
        self.rule, self.step, self.score = rule, 0, self._score(val)

    def _score(self, val) -> float:
        """Mean validation score; ``-inf`` when the rule is not eligible (diverges)."""
        scores, diverged = val
        if int(np.sum(diverged)) > self.limit * diverged.size:
            return float("-inf")
        return float(np.mean(scores, dtype=np.float64))

    def offer(self, rule, step: int, val) -> float:
        """Keep ``rule`` if it beats the best so far; return its score."""
        score = self._score(val)
        if score > self.score:
            self.rule, self.step, self.score = rule, step, score
        return score

    def record(self) -> dict[str, Any]:
        return {"step": self.step, "score": self.score if np.isfinite(self.score) else None}


def train(
    cfg: RunConfig,
    out: Path,
    *,
    progress: bool = True,
    label: str = "learned",
    evaluate: bool = True,
    resume: bool = False,
    trust_user_terms: bool = False,
    fresh_if_no_checkpoint: bool = False,
) -> dict[str, Any]:
    """Meta-train ``cfg``'s rule, evaluate it on held-out episodes, write ``out``.

    A new run (``resume=False``) first deletes the files an older run left in ``out``
    (:func:`clear_run_dir`) and copies the rule's user-term files into ``out/user_terms/``.
    Checkpoints every ``train.checkpoint_every`` steps, at the end, and on SIGINT/SIGTERM
    (then :class:`Interrupted` is raised). ``resume=True`` continues from the newest valid
    checkpoint in ``out`` (``cfg`` must be the run's saved config); the result is
    bit-identical to an uninterrupted run. With no checkpoint that raises, unless
    ``fresh_if_no_checkpoint`` (then the run starts at step 0 with the saved config and
    user-term copies). A resumed run loads its user terms only if ``trust_user_terms``.
    Returns the summary dict (also written to ``out/summary.json``).
    """
    from tqdm.auto import tqdm

    setup = build_setup(cfg)  # validates data and task shapes before anything is written
    _refuse_native_early(cfg, setup)
    out = process_dir(out)
    if resume:
        _, manifest = read_run_config(out)
        trusted = trust_user_terms
    else:
        manifest = start_run_dir(out, cfg)
        trusted = True  # the user named these files for this run; the copies are loaded
    with run_user_terms(out, manifest, trusted=trusted):
        rule = build_rule(cfg, setup.net.n_layers)
    t = cfg.train
    trainer = make_trainer(cfg, setup, rule)
    state = trainer.init(rule, jax.random.key(t.seed))
    n_steps = t.episodes // t.meta_batch
    metrics_path = out / "metrics.jsonl"
    start = 0
    metrics: list[dict] = []
    select = None
    if resume:
        loaded = load_latest(out, (state, rule) if t.select_every else state)
        if loaded is not None:
            state, header = loaded
            if t.select_every:
                (state, best_rule), sel = state, header.get("selection") or {}
                select = (best_rule, int(sel.get("step", 0)), sel.get("score"))
            if header.get("config") != cfg.to_dict():
                raise MetaplasticError(
                    f"{out / 'config.toml'} differs from the config saved in the checkpoint; "
                    "restore it (or start a new run with the changed settings)"
                )
            start = int(header["step"])
            metrics = _read_metrics(metrics_path, int(header["metrics_lines"]))
        elif fresh_if_no_checkpoint:
            metrics_path.unlink(missing_ok=True)
            resume = False  # nothing to continue: a fresh start in the prepared directory
        else:
            raise MetaplasticError(
                f"{out}: no checkpoint to resume from (the run stopped before its first one); "
                f"start it again with `metaplastic train --rule RULE --task TASK --out {out} "
                "--force`"
            )

    start_val = validate_rule(cfg, setup, rule)
    bad_start = _diverged_status("the starting rule", start_val[1], t.max_diverged)
    if bad_start is not None:
        summary = {"status": bad_start, "validation": {"start": _val_record(*start_val)}}
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        raise RunFailed(out, bad_start)

    if t.select_every:
        sel = _Selection(cfg, rule, start_val)
        if select is not None:  # resumed: the best rule so far came with the checkpoint
            sel.rule, sel.step = select[0], select[1]
            sel.score = float("-inf") if select[2] is None else float(select[2])

    def checkpoint(step: int) -> None:
        info = {"metrics_lines": len(metrics), "config": cfg.to_dict()}
        tree = state
        if t.select_every:
            info["selection"] = sel.record()
            tree = (state, sel.rule)
        save_checkpoint(out, tree, step, info, keep=t.keep_checkpoints)

    t0 = time.perf_counter()
    compile_s = None
    bar = tqdm(
        total=n_steps,
        initial=start,
        desc=f"meta-train {label}",
        disable=not progress,
        unit="step",
    )
    stall = _StallWatch(label)
    aborted = None
    with open(metrics_path, "a") as log, _StopFlag() as stop:
        for i in range(start, n_steps):
            state, aux = trainer.step(state)
            if compile_s is None:
                jax.block_until_ready(state)
                compile_s = time.perf_counter() - t0
            step = i + 1
            val_score = None
            if t.select_every and (step % t.select_every == 0 or step == n_steps):
                now = trainer.rule(state)
                val_score = sel.offer(now, step, validate_rule(cfg, setup, now))
            if step % t.log_every == 0 or step == n_steps or val_score is not None:
                row = {"step": step, "episodes": step * t.meta_batch}
                row.update({k: _scalar(v) for k, v in aux.items()})
                if val_score is not None:  # the selection curve (-inf: diverged)
                    row["val_score"] = val_score if np.isfinite(val_score) else None
                row["skipped_total"] = int(state.skipped)
                row["coefficients"] = trainer.rule(state).coefficients()
                frozen = stall.update(state, row)
                metrics.append(row)
                log.write(json.dumps(row) + "\n")
                log.flush()
                bar.set_postfix(loss=row["loss"], acc=row["query_accuracy"], refresh=False)
                if frozen:
                    tqdm.write(frozen, file=sys.stderr)
                # checked on logged steps only: the row above already waited for the step,
                # so this adds no host sync to unlogged steps
                aborted = _backed_off_too_far(state, step)
            bar.update(1)
            if (t.checkpoint_every and step % t.checkpoint_every == 0) or step == n_steps:
                checkpoint(step)
            if stop.set:
                checkpoint(step)
                bar.close()
                raise Interrupted(out, step)
            es_state = not isinstance(state, OuterState)
            if es_state and step == ALL_DIVERGED_PATIENCE and int(state.skipped) == step:
                aborted = (
                    f"diverged: every one of the first {step} generations blew up (every ES "
                    "member non-finite); lower the rule's init coefficients or train.sigma"
                )
            if aborted:
                checkpoint(step)
                break
    bar.close()
    train_s = time.perf_counter() - t0
    # host copy of the learned rule: the last one, or the best on validation
    learned = jax.tree_util.tree_map(
        np.asarray, sel.rule if t.select_every else trainer.rule(state)
    )
    rule_data = write_rule_files(out, learned, t.prune_threshold)
    plot_training(metrics, out, title=f"{label}: {cfg.rule.name} on {cfg.task.name}")
    final_val = validate_rule(cfg, setup, learned)
    done = int(state.step)
    status, checks = run_status(cfg, start_val, final_val, int(state.skipped), max(done, 1))
    if aborted:
        status = aborted
    summary: dict[str, Any] = {
        "status": status,
        "validation": {
            "start": _val_record(*start_val),
            "learned": _val_record(*final_val),
            **checks,
        },
        "rule_equation": rule_data["equation"],
        "rule_latex": rule_data["latex"],
        "coefficients": learned.coefficients(),
        "meta_test": {},
        "train": {
            "steps": n_steps,
            "episodes": n_steps * t.meta_batch,
            "meta_batch": t.meta_batch,
            "gradient_mode": trainer.mode,
            "steps_done": done,
            "skipped_steps": int(state.skipped),
            "resumed_from_step": start if resume else None,
            "compile_s": round(compile_s or 0.0, 2),
            "train_s": round(train_s, 2),
            "seed": t.seed,
            "feedback": t.feedback,
        },
    }
    if t.select_every:  # the learned rule is the one selected on validation
        summary["train"]["selected_step"] = sel.step
        summary["train"]["select_every"] = t.select_every
        if sel.step == 0:
            summary["train"]["selected_note"] = "no scored rule beat the starting rule"
    units = getattr(trainer, "units", None)
    if units is not None:  # train.units = "episode": the measured unit of each coefficient
        summary["train"]["units"] = dict(
            zip(learned.coefficients(), units_record(units), strict=True)
        )
    if evaluate:
        summary["meta_test"][label] = evaluate_run(cfg, learned, setup)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if status != "ok":
        raise RunFailed(out, status)
    return summary


def check_run_usable(run_dir: Path) -> None:
    """Refuse (one line) a run that failed or never finished: its rule is not a result."""
    path = run_dir / "summary.json"
    if not path.is_file():
        raise MetaplasticError(
            f"{run_dir}: no summary.json, so the run did not finish; finish it with "
            f"'metaplastic train --resume {run_dir}' (or pass --allow-failed)"
        )
    try:
        status = json.loads(path.read_text()).get("status", "ok")
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
        raise MetaplasticError(f"{path}: not a valid summary file; re-run or restore it") from None
    if status != "ok":
        raise MetaplasticError(
            f"{run_dir}: the run failed ({status.split(':')[0]}), so its rule is not a result; "
            "pass --allow-failed to export it anyway"
        )


def resume_run(
    run_dir: Path, *, progress: bool = True, trust_user_terms: bool = False
) -> dict[str, Any]:
    """Continue the run in ``run_dir`` from its newest valid checkpoint."""
    cfg, _ = read_run_config(run_dir)
    return train(cfg, run_dir, progress=progress, resume=True, trust_user_terms=trust_user_terms)


def evaluate_run(
    cfg: RunConfig, rule, setup: Setup | None = None, episodes: int | None = None
) -> dict[str, Any]:
    """Held-out accuracy of ``rule``: mean, 95% CI, on meta-test images."""
    setup = setup or build_setup(cfg)
    n = episodes or cfg.train.eval_episodes
    accs, diverged = evaluate_outcomes(setup.problem(cfg, "test"), rule, eval_key(cfg), n)
    m, lo, hi = mean_ci95(accs)
    return {"accuracy": m, "ci95": [lo, hi], "episodes": int(n), "diverged": int(diverged.sum())}


DISCOVER_TASK = "digits"
#: (label, rule preset, feedback) of the methods ``discover`` meta-trains and compares.
DISCOVER_METHODS = (
    ("learned", "pool", "fa"),
    ("fa", "pseudo_gradient", "fa"),
    ("backprop", "pseudo_gradient", "backprop"),
)


#: Written by ``discover`` in its directory: the labels of its runs, so ``--resume`` can
#: finish them (each run's config is in its own directory).
DISCOVER_FILE = "discover.json"
_LABEL = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")


def discover_run_dir(out: Path, label: str) -> Path:
    """Where ``discover`` puts the run of ``label``: ``out`` or ``out/baselines/<label>``."""
    return out if label == "learned" else out / "baselines" / label


def _check_labels(labels: list[Any], where: str) -> list[str]:
    ok = (
        bool(labels)
        and all(isinstance(x, str) and _LABEL.fullmatch(x) for x in labels)
        and len(set(labels)) == len(labels)
        and "learned" in labels
    )
    if not ok:
        raise MetaplasticError(
            f"{where}: method labels must be distinct plain names (letters, digits, _ . + -) "
            "and include 'learned'"
        )
    return list(labels)


def _same_start(baseline: RunConfig, learned: RunConfig) -> RunConfig:
    """A pseudo-gradient-only baseline starts at the learned rule's pseudo-gradient
    coefficient, when the learned rule has one (the reference pool starts it at 1e-3, the
    digits pool at 0.03; for a Taylor rule it is minus the ``x*e`` monomial's, since the
    pseudo-gradient term is ``-e x^T``): both methods then begin from the same rule."""
    b, r = baseline.rule, learned.rule
    if b.kind != "term_pool" or tuple(b.terms) != ("pseudo_gradient",):
        return baseline
    start = _pseudo_gradient_start(r)
    if start is None:
        return baseline
    return baseline.replace(rule=dataclasses.replace(b, init=(start,)))


def _pseudo_gradient_start(r) -> float | None:
    """The learned rule's initial pseudo-gradient coefficient, or None if it has none set."""
    if r.kind == "term_pool":
        if "pseudo_gradient" not in r.terms or len(r.init) != len(r.terms):
            return None
        return r.init[list(r.terms).index("pseudo_gradient")]
    if r.kind == "taylor" and r.init:
        from ..rules._rule_kinds import monomial_index

        live = [monomial_index(m) for m in r.monomials] if r.monomials else list(range(81))
        pg = monomial_index("x*e")
        if pg in live and r.init[live.index(pg)] != 0:
            return -float(r.init[live.index(pg)])
    return None


def discover_configs(
    train_table: dict[str, Any], task: str, methods, overrides=(), rule: str | None = None
) -> dict[str, RunConfig]:
    """The config of each method of a discover run. ``rule`` replaces the learned method's
    rule; ``overrides`` (``section.key=value``) apply to every method, except ``rule.*``
    ones, which apply to the learned rule only. ``train.feedback`` is set per method and
    cannot be overridden."""
    from ._config import build_config, parse_override

    sections = [parse_override(o)[:2] for o in overrides]
    if ("train", "feedback") in sections:
        raise MetaplasticError(
            "discover sets train.feedback per method (the learned rule and FA use fa, the "
            "backprop baseline backprop); drop --set train.feedback, or use metaplastic train"
        )
    rule_over = [o for o, (sec, _) in zip(overrides, sections, strict=True) if sec == "rule"]
    other = [o for o, (sec, _) in zip(overrides, sections, strict=True) if sec != "rule"]
    _check_labels([m[0] for m in methods], "discover")
    methods = sorted(methods, key=lambda m: m[0] != "learned")  # the learned rule first
    cfgs: dict[str, RunConfig] = {}
    for label, method_rule, feedback in methods:
        table = dict(train_table, feedback=feedback)
        if label == "learned":
            cfgs[label] = build_config(rule or method_rule, task, table, other + rule_over)
        else:  # a baseline is reported whether or not it improved
            table.setdefault("require_improvement", False)
            cfg = build_config(method_rule, task, table, other)
            cfgs[label] = _same_start(cfg, cfgs["learned"])
    return cfgs


def _start_discover(
    out: Path, train_table: dict[str, Any], task: str, methods, overrides=(), rule=None
) -> list[str]:
    """Check every config, clear ``out``, prepare each run's directory, write the plan."""
    labels = _check_labels([m[0] for m in methods], "discover")
    cfgs = discover_configs(train_table, task, methods, overrides, rule)
    for cfg in cfgs.values():
        build_setup(cfg)  # data and task shapes, before anything is deleted
    clear_run_dir(out)
    for label in sorted(labels, key=lambda x: x != "learned"):  # out first: it holds the rest
        start_run_dir(discover_run_dir(out, label), cfgs[label])
    plan = {
        "format": "metaplastic-discover",
        "version": 1,
        "methods": labels,
        "rule": str(rule or dict((m[0], m[1]) for m in methods)["learned"]),
        "task": str(task),
        "train": {k: v for k, v in train_table.items() if v is not None},
        "overrides": list(overrides),
    }
    atomic_write(out / DISCOVER_FILE, (json.dumps(plan, indent=2) + "\n").encode())
    return labels


def _read_discover_plan(out: Path) -> list[str]:
    if not out.is_dir():
        raise MetaplasticError(f"{out}: no such run directory")
    path = out / DISCOVER_FILE
    if not path.is_file():
        raise MetaplasticError(
            f"{out}: not a discover run directory (no {DISCOVER_FILE}); a train run continues "
            f"with metaplastic train --resume {out}"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise MetaplasticError(
            f"{path}: unreadable ({err}); start again with metaplastic discover --out {out} --force"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("methods"), list):
        raise MetaplasticError(f"{path}: malformed; start again with --force")
    return _check_labels(data["methods"], str(path))


def finished_summary(run_dir: Path, label: str) -> dict[str, Any] | None:
    """The summary of a run that finished (evaluated as ``label``), else ``None``."""
    try:
        s = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if isinstance(s, dict) and isinstance(s.get("meta_test"), dict) and label in s["meta_test"]:
        return s
    return None


def discover(
    out: Path,
    train_table: dict[str, Any],
    *,
    progress: bool = True,
    task: str = DISCOVER_TASK,
    methods=DISCOVER_METHODS,
    resume: bool = False,
    trust_user_terms: bool = False,
    rule: str | None = None,
    overrides=(),
) -> dict[str, Any]:
    """Meta-train a rule (default: the pool) under FA and the two baselines with the same
    budget.

    The learned rule's run is ``out``; the baselines' runs are ``out/baselines/{fa,backprop}``.
    All three are evaluated on the same held-out episodes. Writes ``summary.json`` (with
    ``meta_test`` for ``learned``, ``fa`` and ``backprop``), ``results.md`` and
    ``meta_test.png`` in ``out``; ``discover.json`` lists the runs.

    A new discover run first deletes an older run's files in ``out`` and prepares every
    run's directory (config, user-term copies). SIGINT/SIGTERM stops it with
    :class:`Interrupted` (the running run checkpoints). ``resume=True`` finishes what is
    missing: runs that finished are read back, the interrupted one continues from its
    checkpoint, the others start (``train_table``, ``task``, ``methods``, ``rule`` and
    ``overrides`` are then ignored: every run's config is in its directory), then the table
    and files are written. ``rule`` and ``overrides`` are as in :func:`discover_configs`.
    """
    from ._report import plot_meta_test, results_table

    t0 = time.perf_counter()
    again = f"metaplastic discover --resume {out}"
    failed: dict[str, str] = {}
    with _StopFlag() as stop:
        if resume:
            labels = _read_discover_plan(out)
        else:
            labels = _start_discover(out, train_table, task, methods, overrides, rule)
        summaries = {}
        for i, label in enumerate(labels):
            run_dir = discover_run_dir(out, label)
            what = "the learned run" if label == "learned" else f"the {label} baseline"
            done = finished_summary(run_dir, label) if resume else None
            if done is None:
                cfg, _ = read_run_config(run_dir)
                try:
                    # a failed run is read back (its status kept): the table shows the cost
                    done = keep_failed(
                        train,
                        cfg,
                        run_dir,
                        progress=progress,
                        label=label,
                        resume=True,
                        fresh_if_no_checkpoint=True,
                        trust_user_terms=trust_user_terms or not resume,
                    )
                except Interrupted as err:
                    raise Interrupted(out, err.step, resume=again, what=what) from None
                if label == "learned" and "rule_equation" not in done:
                    raise RunFailed(out, done["status"])  # the start diverged: no comparison
            done.setdefault("meta_test", {})
            if done.get("status", "ok") != "ok":
                failed[label] = done["status"]
            summaries[label] = done
            if stop.set and i + 1 < len(labels):
                raise Interrupted(out, None, resume=again, what=what)
    cfg, _ = read_run_config(out)
    summary = dict(summaries["learned"])
    summary["meta_test"] = {
        k: s["meta_test"][k] for k, s in summaries.items() if k in s["meta_test"]
    }
    summary["baselines"] = {
        k: {
            "coefficients": s.get("coefficients"),
            "run_dir": str(discover_run_dir(out, k)),
            "status": s.get("status", "ok"),
        }
        for k, s in summaries.items()
        if k != "learned"
    }
    summary["discover_s"] = round(time.perf_counter() - t0, 1)
    # the run fails with the learned rule; a failed baseline is reported, not fatal
    summary["status"] = failed.get("learned", "ok")
    summary["test"] = {
        k: [summary["meta_test"][k]["accuracy"]] if k in summary["meta_test"] else []
        for k in summaries
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "results.md").write_text(results_table(summary["meta_test"]) + "\n")
    plot_meta_test(summary["meta_test"], out, chance=1.0 / cfg.task.n_way)
    if summary["status"] != "ok":
        raise RunFailed(out, summary["status"])
    return summary


def _seed_stats(values: list[float]) -> dict[str, Any]:
    v = np.asarray([x for x in values if x is not None], np.float64)
    if v.size == 0:
        return {"mean": None, "sd": None, "ci95": [None, None], "n": 0}
    m, lo, hi = mean_ci95(v)
    sd = float(v.std(ddof=1)) if v.size > 1 else 0.0
    return {"mean": m, "sd": sd, "ci95": [lo, hi], "n": int(v.size)}


def sign_agreement(coefficients: list[dict[str, Any]]) -> dict[str, float]:
    """For each coefficient: the fraction of seeds whose sign matches the majority sign
    (1.0 = every seed agrees; per-layer coefficients are compared entry by entry and the
    lowest agreement is kept)."""
    out: dict[str, float] = {}
    if not coefficients:
        return out
    for name in coefficients[0]:
        vals = np.stack([np.ravel(np.asarray(c[name], np.float64)) for c in coefficients])
        signs = np.sign(vals)
        pos, neg = np.sum(signs > 0, axis=0), np.sum(signs < 0, axis=0)
        out[name] = float(np.min(np.maximum(pos, neg)) / len(coefficients))
    return out


def aggregate_seeds(
    out: Path, seeds: list[int], summaries: dict[int, dict], failed: dict[int, str]
) -> dict[str, Any]:
    """Combine per-seed run summaries (``out/seed-<s>/summary.json``) into one: meta-test
    accuracy per seed and method, mean ± sd and Student-t 95% CI across seeds, FA→backprop
    gap closure, sign agreement of the coefficients, and the seed selected on the
    validation split (never on meta-test)."""
    from ._report import seeds_table

    methods: list[str] = []
    for s in seeds:
        for k in summaries.get(s, {}).get("meta_test", {}):
            if k not in methods:
                methods.append(k)
    test = {
        k: [summaries.get(s, {}).get("meta_test", {}).get(k, {}).get("accuracy") for s in seeds]
        for k in methods
    }
    val = [
        summaries.get(s, {}).get("validation", {}).get("learned", {}).get("score") for s in seeds
    ]
    ok_val = [(v, s) for v, s in zip(val, seeds, strict=True) if v is not None and s not in failed]
    agg: dict[str, Any] = {
        "status": "ok"
        if not failed
        else "; ".join(f"seed {s}: {failed[s]}" for s in seeds if s in failed),
        "seeds": seeds,
        "runs": [str(out / f"seed-{s}") for s in seeds],
        "test": test,
        "test_stats": {k: _seed_stats(v) for k, v in test.items()},
        "validation": {"learned": val},
        "selected_seed": max(ok_val)[1] if ok_val else None,
    }
    if {"learned", "fa", "backprop"} <= set(test):
        gaps = []
        for a, f, b in zip(test["learned"], test["fa"], test["backprop"], strict=True):
            ok = None not in (a, f, b) and b - f > 1e-9
            gaps.append((a - f) / (b - f) if ok else None)
        agg["gap_closure"] = gaps
        agg["gap_closure_stats"] = _seed_stats(gaps)
    coefs = [
        summaries[s]["coefficients"] for s in seeds if summaries.get(s, {}).get("coefficients")
    ]
    agg["coefficients"] = {str(s): summaries.get(s, {}).get("coefficients") for s in seeds}
    agg["sign_agreement"] = sign_agreement(coefs)
    (out / "summary.json").write_text(json.dumps(agg, indent=2) + "\n")
    (out / "results.md").write_text(seeds_table(agg) + "\n")
    return agg


def run_seeds(out: Path, seeds: int, base_seed: int, run_one) -> dict[str, Any]:
    """Run ``run_one(seed, run_dir)`` (a train or discover) for ``seeds`` meta-training
    seeds ``base_seed, base_seed + 1, ...`` one after another into ``out/seed-<s>`` and
    aggregate them (:func:`aggregate_seeds`). A failed seed is recorded and the others
    still run; then :class:`RunFailed` is raised after the aggregate is written."""
    if seeds < 1:
        raise MetaplasticError(f"--seeds must be at least 1, got {seeds}")
    if not (0 <= base_seed and base_seed + seeds <= 2**32):
        raise MetaplasticError(f"seeds {base_seed}..{base_seed + seeds - 1} leave [0, 2**32)")
    out.mkdir(parents=True, exist_ok=True)
    ids = list(range(base_seed, base_seed + seeds))
    summaries: dict[int, dict] = {}
    failed: dict[int, str] = {}
    for s in ids:
        summaries[s] = keep_failed(run_one, s, out / f"seed-{s}")
        if summaries[s].get("status", "ok") != "ok":
            failed[s] = summaries[s]["status"]
    agg = aggregate_seeds(out, ids, summaries, failed)
    if failed:
        raise RunFailed(out, agg["status"])
    return agg


def keep_failed(fn, *args, **kwargs) -> dict[str, Any]:
    """Call ``fn`` (:func:`train` or :func:`discover`); when the run fails, return the
    summary it wrote instead of raising, so a study can report the failure (its
    ``status``) next to the other rows."""
    try:
        return fn(*args, **kwargs)
    except RunFailed as err:
        return json.loads((Path(err.run_dir) / "summary.json").read_text())
