"""TOML configuration -> typed, validated, frozen config objects.

A run is described by four tables: ``[rule]`` (from a rule file in ``rules/``), ``[task]``
and ``[network]`` (from a task file in ``tasks/``; a task file may also carry ``[train]``
defaults), and ``[train]``. Every user error raises :class:`MetaplasticError` with one
line naming the file, the key and the fix.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._errors import MetaplasticError, unknown_name

PRESET_KINDS = ("rules", "tasks")


def preset_dir(kind: str) -> Path:
    """Folder holding the shipped presets of ``kind`` (``rules`` or ``tasks``)."""
    package = Path(__file__).resolve().parent.parent  # metaplastic/
    installed = package / "presets" / kind
    if installed.is_dir():
        return installed
    return package.parent / kind  # source checkout / editable install


def list_presets(kind: str) -> list[str]:
    return sorted(p.stem for p in preset_dir(kind).glob("*.toml"))


@dataclass(frozen=True)
class RuleConfig:
    """``[rule]``: which search space and where its coefficients start.

    ``kind`` picks the family: ``term_pool`` (``terms``, ``init``, ``mask``), ``taylor``
    (``monomials``, ``init``), ``mlp`` (``mlp_hidden``, ``mlp_scale``, ``mlp_seed``) or
    ``equation`` (``equations``: one for all layers or one per layer). ``state_rate`` and
    ``scaling_target`` set the per-neuron state of stateful terms; ``feedback_init`` starts
    the two feedback-plasticity coefficients used with ``train.feedback = "kolen_pollack"``.
    """

    name: str = "rule"
    kind: str = "term_pool"
    terms: tuple[str, ...] = ("pseudo_gradient",)
    init: tuple[float, ...] = ()
    mask: tuple[bool, ...] = ()
    shared: bool = True
    monomials: tuple[str, ...] = ()
    mlp_hidden: tuple[int, ...] = (16,)
    mlp_scale: float = 0.01
    mlp_seed: int = 0
    mlp_pseudo_gradient: float = 0.0
    equations: tuple[str, ...] = ()
    state_rate: float = 0.1
    scaling_target: float = 0.1
    feedback_init: tuple[float, ...] = (0.03, 0.0)
    description: str = ""


@dataclass(frozen=True)
class TaskConfig:
    """``[task]``: N-way K-shot online classification on a data set (``kind =
    "classification"``), class-incremental learning over a long stream (``kind =
    "continual"``: ``stages`` groups of classes, ``stage_steps`` updates each), or
    principal-component extraction by one linear neuron (``kind =
    "pca"``: ``dim`` inputs, ``steps`` online samples, covariance eigenvalues
    ``eig_decay**k``, every input multiplied by ``input_scale``)."""

    name: str = "task"
    kind: str = "classification"
    dim: int = 5
    steps: int = 300
    eig_decay: float = 0.5
    #: pca: every input is multiplied by this (covariance ``input_scale**2 * C``)
    input_scale: float = 1.0
    dataset: str = "digits"
    #: classification: each image's pixels shift by one U(-eps, eps) offset, then clip to
    #: [0, 1] (0 = off)
    luminosity_shift: float = 0.0
    n_way: int = 5
    k_shot: int = 20
    q_query: int = 10
    #: continual: the n_way classes are taught in this many equal groups, one after another,
    #: each for stage_steps online updates (episode length stages * stage_steps)
    stages: int = 5
    stage_steps: int = 1000
    test_fraction: float = 0.5
    #: of each class's meta-train images, this fraction is held out as the validation split
    #: (checks at the end of a run, seed selection, pruning by effect, distillation)
    val_fraction: float = 0.4
    split_seed: int = 0
    data_dir: str = ""
    emnist_split: str = "balanced"
    description: str = ""


@dataclass(frozen=True)
class NetworkConfig:
    """``[network]``: hidden widths (the input width comes from the data). ``n_out`` is the
    number of output units: 0 means ``task.n_way``; more (e.g. 47, the class count of EMNIST
    balanced, as in Shervani-Tabar & Rosenbaum's code) leaves output units that no episode's
    labels use, so a network that learns nothing pays ``ln n_out``, not ``ln n_way``."""

    #: the network class (a name in metaplastic.inner.NETWORKS): "mlp" or "ei" (Dale's law)
    kind: str = "mlp"
    hidden: tuple[int, ...] = (50, 40, 30, 20)
    n_out: int = 0
    activation: str = "softplus"
    beta: float = 10.0
    bias: bool = False
    init_scale: float = 1.0
    #: kind = "ei" only: inhibitory units per excitatory unit of a layer; "none" or "inorm"
    #: (I-Norm hidden layers); the error transform "none", "gradnorm" or "center"; the step
    #: size of I-Norm's local loss on the inhibitory weights (0 = fixed inhibition) and the
    #: loss's weight; the start of W_IX and B_IX: "random" (lognormal) or "exact" (I-Norm
    #: equal to layer norm at the start, as in Eyono et al.'s code)
    inhibitory_fraction: float = 0.1
    norm: str = "none"
    error_norm: str = "none"
    inhibitory_rate: float = 0.0
    local_weight: float = 100.0
    inhibition_init: str = "random"


@dataclass(frozen=True)
class TrainConfig:
    """``[train]``: outer loop. ``episodes`` counts meta-training episodes in total; the
    outer loop takes ``episodes // meta_batch`` steps."""

    #: the credit pathway (a name in metaplastic.inner.CREDIT_PATHWAYS)
    feedback: str = "fa"
    #: feedback = "predictive_coding": "fixed_prediction" (equals backprop with pc_rate 1
    #: and enough steps) or "strict"; inference steps (0 = the number of layers for
    #: fixed_prediction, 20 for strict) and step size (0 = 1 for fixed_prediction, 0.1 for
    #: strict)
    pc_variant: str = "fixed_prediction"
    pc_steps: int = 0
    pc_rate: float = 0.0
    outer: str = "adam"
    lr: float = 0.003
    #: gradient outer loops: the step size decays (cosine) from lr to lr * lr_end over the
    #: run (1 = constant)
    lr_end: float = 1.0
    clip: float = 1.0
    #: > 0: meta-gradients whose largest entry exceeds this are rescaled to it before the
    #: optimiser (1e12 recommended where rules can explode; 0 = off, the default, which keeps
    #: the published numbers bit-for-bit: any change to the compiled step reorders sums)
    grad_limit: float = 0.0
    #: the coordinates the gradient outer loop steps in: "none" (the raw coefficients) or
    #: "episode" (each coefficient in units of the weight change its term makes over one
    #: episode at the starting rule, measured before step 1; lr, clip and l1 then mean the
    #: same for any input scale, input size, unroll length or term degree; see
    #: metaplastic.outer._units)
    units: str = "none"
    #: > 0: an episode stops (and counts as diverged) when a weight exceeds this multiple of
    #: its layer's largest initial weight; it keeps a finite loss and meta-gradient that
    #: point away from the blow-up instead of NaN (metaplastic.inner._episode.guard). 0 = off
    weight_limit: float = 0.0
    meta_batch: int = 16
    episodes: int = 4800
    l1: float = 0.0
    gradient: str = "auto"
    remat: bool = False
    #: > 0: truncated meta-gradients: the episode is cut into segments of this many updates
    #: and each segment's loss (the task's query loss at the segment's end) is differentiated
    #: through that segment only, the carry passed on without gradient; memory is that of one
    #: segment, whatever the episode's length (tasks with segments: "continual"). With
    #: train.outer = "persistent_es" / "noise_reuse_es": one ES generation per segment,
    #: each member's network state carried across segments. 0 = off
    truncation: int = 0
    seed: int = 0
    eval_episodes: int = 500
    log_every: int = 1
    prune_threshold: float = 1e-4
    prune_effect: float = 0.0
    prune_episodes: int = 200
    #: > 0: pruning by effect may also drop a coefficient whose removal alone costs more
    #: than prune_effect, if after refitting the remaining coefficients for this many
    #: meta-steps on meta-train episodes (gradient outer loop, same lr schedule) the score is
    #: back within prune_effect; 0 = plain removal only
    prune_refit: int = 0
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    population: int = 16
    sigma: float = 0.01
    sigma_decay: float = 1.0
    antithetic: bool = True
    fitness_shaping: str = "default"
    penalty: float = -1.0
    #: ES only (like population, sigma, ...): what members are ranked by, "error" (query
    #: error rate + L1) or "loss" (meta-loss). Gradient outer loops ignore it: they always
    #: descend the meta-loss (the error rate has no gradient).
    es_fitness: str = "error"
    #: devices the meta-batch (gradient) or population (ES) is split over; 0 = as many as
    #: divide it evenly
    devices: int = 0
    #: entries each device vmaps at a time (lax.map over chunks of that many): 0 = auto (1:
    #: bit-identical for any ``devices``), -1 = a device's whole share at once (faster for
    #: small networks on CPU, but the last bits then depend on the device count)
    vmap_width: int = 0
    #: what the outer loop minimises on the query set: "cross_entropy" or "prob_error"
    #: (1 - mean probability of the right class); see metaplastic.inner._episode.query_metrics
    objective: str = "cross_entropy"
    #: query logits are divided by this before the objective's softmax
    query_temperature: float = 1.0
    #: validation episodes (images disjoint from meta-training and meta-test) on which the
    #: starting and the learned rule are compared at the end of a run
    val_episodes: int = 200
    #: > 0: every this many meta-steps (and at the last) the current rule is scored on the
    #: validation episodes, and the run's learned rule is the best one scored (the starting
    #: rule included; a rule diverging on more than max_diverged of them is not eligible):
    #: early stopping on the validation split, so a late blow-up of the outer loop does not
    #: spoil the result. 0 = off: the learned rule is the last one
    select_every: int = 0
    #: a run fails (non-zero exit) when the learned rule diverges on more than this fraction
    #: of validation episodes (the starting rule too: then the run stops before step 1)
    max_diverged: float = 0.05
    #: a meta-step is bad (reverted, step size halved) when its meta-gradient is not finite
    #: or more than this fraction of its episodes diverged
    max_step_diverged: float = 0.25
    #: ... or when more than this fraction of meta-steps were bad (reverted)
    max_skipped: float = 0.25
    #: ... or when the learned rule is not better than the starting rule on validation
    #: episodes (paired 95% CI of the difference above 0); off for fixed baselines
    require_improvement: bool = True


SECTIONS: dict[str, type] = {
    "rule": RuleConfig,
    "task": TaskConfig,
    "network": NetworkConfig,
    "train": TrainConfig,
}


@dataclass(frozen=True)
class RunConfig:
    rule: RuleConfig = field(default_factory=RuleConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        out = {}
        for name in SECTIONS:
            sec = dataclasses.asdict(getattr(self, name))
            out[name] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in sec.items()}
        return out

    def replace(self, **sections) -> RunConfig:
        return dataclasses.replace(self, **sections)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is tuple:
        (elem, _) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise MetaplasticError(f"{where}: expected a list of {_type_name(elem)}, got {value!r}")
        return tuple(_coerce(v, elem, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise MetaplasticError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise MetaplasticError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise MetaplasticError(f"{where}: expected a number, got {value!r}")
        try:
            value = float(value)
        except OverflowError:
            raise MetaplasticError(
                f"{where}: expected a finite number, got a huge integer"
            ) from None
        if value != value or value in (float("inf"), float("-inf")):
            raise MetaplasticError(f"{where}: expected a finite number, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise MetaplasticError(f"{where}: expected a string, got {value!r}")
        try:  # a lone surrogate (a non-UTF-8 byte in a command-line argument) cannot be saved
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise MetaplasticError(f"{where}: {value!r} is not valid UTF-8 text") from None
        return value
    raise TypeError(f"unsupported config type {tp}")  # pragma: no cover - programming error


def parse_section(cls: type, data: Any, where: str, base=None):
    """Build ``cls`` from a TOML table, starting from ``base`` (or the defaults)."""
    if not isinstance(data, dict):
        raise MetaplasticError(f"{where}: expected a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in data.items():
        if key not in names:
            raise unknown_name("key", key, names, where)
        values[key] = _coerce(value, hints[key], f"{where}.{key}")
    obj = dataclasses.replace(base, **values) if base is not None else cls(**values)
    _validate(obj, where)
    return obj


def _positive(obj, where: str, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        if not v > 0:
            raise MetaplasticError(f"{where}.{n} must be positive, got {v}")


def _validate(obj, where: str) -> None:
    from ..inner._feedback import CREDIT_PATHWAYS, PC_VARIANTS
    from ..inner._network import network_from_config
    from ..outer import check_train_config

    if isinstance(obj, RuleConfig):
        _validate_rule(obj, where)
    elif isinstance(obj, TaskConfig):
        from ..tasks._data import DATASETS
        from ..tasks._task import check_task_keys

        try:  # one line naming the registered kinds when unknown; keys of other kinds refused
            check_task_keys(obj)
        except MetaplasticError as err:
            raise MetaplasticError(f"{where}: {err}") from None
        if not 0.0 <= obj.luminosity_shift <= 1.0:
            raise MetaplasticError(
                f"{where}.luminosity_shift must lie in [0, 1], got {obj.luminosity_shift}"
            )
        _positive(obj, where, "dim", "steps", "eig_decay", "input_scale")
        if obj.eig_decay >= 1.0:
            raise MetaplasticError(
                f"{where}.eig_decay must be below 1 (a unique top component), got {obj.eig_decay}"
            )
        if obj.dataset not in DATASETS:
            raise unknown_name("data set", obj.dataset, DATASETS, f"{where}.dataset")
        _positive(obj, where, "n_way", "k_shot", "q_query")
        if obj.n_way < 2:
            raise MetaplasticError(f"{where}.n_way must be at least 2, got {obj.n_way}")
        if not 0.0 < obj.val_fraction < 1.0:
            raise MetaplasticError(
                f"{where}.val_fraction must be strictly between 0 and 1, got {obj.val_fraction}"
            )
        if not 0.0 < obj.test_fraction < 1.0:
            raise MetaplasticError(
                f"{where}.test_fraction must be strictly between 0 and 1, got {obj.test_fraction}"
            )
    elif isinstance(obj, NetworkConfig):
        if any(h < 1 for h in obj.hidden):
            raise MetaplasticError(f"{where}.hidden: widths must be positive, got {obj.hidden}")
        if obj.n_out < 0:
            raise MetaplasticError(f"{where}.n_out must be >= 0 (0 = task.n_way), got {obj.n_out}")
        # the network kind validates its own keys (building a stand-in of the same depth)
        try:
            network_from_config(obj, (1, *obj.hidden, 2))
        except MetaplasticError as err:
            raise MetaplasticError(f"{where}: {err}") from None
    elif isinstance(obj, TrainConfig):
        if obj.feedback not in CREDIT_PATHWAYS:
            raise unknown_name(
                "feedback mode", obj.feedback, tuple(CREDIT_PATHWAYS), f"{where}.feedback"
            )
        if obj.pc_variant not in PC_VARIANTS:
            raise unknown_name(
                "predictive-coding variant", obj.pc_variant, PC_VARIANTS, f"{where}.pc_variant"
            )
        if not 0.0 <= obj.pc_rate <= 1.0:
            raise MetaplasticError(
                f"{where}.pc_rate must lie in [0, 1] (0 = the variant's default), got {obj.pc_rate}"
            )
        try:  # the pathway checks its own settings
            CREDIT_PATHWAYS[obj.feedback].from_config(obj)
        except MetaplasticError as err:
            raise MetaplasticError(f"{where}: {err}") from None
        check_train_config(obj, where)  # each trainer checks the keys it owns
        from ..inner._episode import OBJECTIVES

        if obj.objective not in OBJECTIVES:
            raise unknown_name("objective", obj.objective, OBJECTIVES, f"{where}.objective")
        _positive(obj, where, "query_temperature")
        if obj.vmap_width < -1:
            raise MetaplasticError(
                f"{where}.vmap_width must be >= -1 (0 = auto: one entry at a time, "
                f"bit-identical for any device count; -1 = all at once), got {obj.vmap_width}"
            )
        if obj.devices < 0:
            raise MetaplasticError(f"{where}.devices must be >= 0 (0 = all), got {obj.devices}")
        _positive(
            obj,
            where,
            "lr",
            "meta_batch",
            "episodes",
            "eval_episodes",
            "log_every",
            "keep_checkpoints",
            "prune_episodes",
            "val_episodes",
        )
        for n in ("max_diverged", "max_skipped", "max_step_diverged"):
            if not 0.0 <= getattr(obj, n) <= 1.0:
                raise MetaplasticError(
                    f"{where}.{n} must be a fraction between 0 and 1, got {getattr(obj, n)}"
                )
        if not (obj.weight_limit == 0 or 1.0 < obj.weight_limit < float("inf")):
            raise MetaplasticError(
                f"{where}.weight_limit must be 0 (off) or a finite factor above 1, "
                f"got {obj.weight_limit}"
            )
        if not 0 <= obj.seed < 2**32:
            raise MetaplasticError(
                f"{where}.seed must be an integer in [0, 2**32), got {obj.seed} (larger seeds "
                "would wrap around onto smaller ones)"
            )
        if obj.episodes < obj.meta_batch:
            raise MetaplasticError(
                f"{where}.episodes ({obj.episodes}) is smaller than {where}.meta_batch "
                f"({obj.meta_batch}); raise episodes or lower meta_batch"
            )
        for n in (
            "l1",
            "prune_threshold",
            "prune_effect",
            "prune_refit",
            "checkpoint_every",
            "select_every",
            "pc_steps",
        ):
            if getattr(obj, n) < 0:
                raise MetaplasticError(f"{where}.{n} must be >= 0, got {getattr(obj, n)}")


def _validate_rule(obj: RuleConfig, where: str) -> None:
    from ..rules._rule_kinds import monomial_index
    from ..rules._rules import RULE_KINDS
    from ..rules._terms import TERMS

    kinds = [k for k in RULE_KINDS if k != "plastic_feedback"]
    if obj.kind not in kinds:
        raise unknown_name("rule kind", obj.kind, kinds, f"{where}.kind")
    _positive(obj, where, "state_rate")
    if obj.state_rate > 1.0:
        raise MetaplasticError(f"{where}.state_rate must be at most 1, got {obj.state_rate}")
    if len(obj.feedback_init) != 2:
        raise MetaplasticError(
            f"{where}.feedback_init needs 2 numbers (step, decay), got {len(obj.feedback_init)}"
        )
    if obj.kind == "term_pool":
        if not obj.terms:
            raise MetaplasticError(f"{where}.terms: give at least one term name")
        for t in obj.terms:
            if t not in TERMS and ":" not in t:
                raise unknown_name("term", t, TERMS, f"{where}.terms")
        if len(set(obj.terms)) != len(obj.terms):
            raise MetaplasticError(f"{where}.terms: a term is listed twice; list each once")
        for key in ("init", "mask"):
            n = len(getattr(obj, key))
            if n not in (0, len(obj.terms)):
                raise MetaplasticError(
                    f"{where}.{key} has {n} entries for {len(obj.terms)} terms; give one per term"
                )
    elif obj.kind == "taylor":
        try:
            idx = [monomial_index(m) for m in obj.monomials]
        except MetaplasticError as err:
            raise MetaplasticError(f"{where}: {err}") from None
        if len(set(idx)) != len(idx):
            raise MetaplasticError(f"{where}.monomials: a monomial is listed twice")
        n = len(idx) or 81
        if len(obj.init) not in (0, n):
            raise MetaplasticError(
                f"{where}.init has {len(obj.init)} entries for {n} monomials; give one each"
            )
    elif obj.kind == "mlp":
        if not obj.mlp_hidden or any(h < 1 for h in obj.mlp_hidden):
            raise MetaplasticError(f"{where}.mlp_hidden: give positive widths, e.g. [16]")
        _positive(obj, where, "mlp_scale")
    elif obj.kind == "equation":
        from ..rules._symbolic import parse_equation

        if not obj.equations:
            raise MetaplasticError(f"{where}.equations: give at least one equation")
        for eq in obj.equations:
            try:
                parse_equation(eq)
            except MetaplasticError as err:
                raise MetaplasticError(f"{where}.equations: {err}") from None


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise MetaplasticError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise MetaplasticError(f"{path}: cannot read ({err})") from None
    except ValueError as err:  # TOMLDecodeError, or an integer of over 4300 digits
        raise MetaplasticError(f"{path}: invalid TOML ({err}); fix the syntax") from None


def is_path_spec(spec: str) -> bool:
    """Whether a ``--rule``/``--task`` spec names a file: it contains a path separator or
    ends in ``.toml``. Anything else is a preset name, even if a file or folder of that name
    exists in the working directory (so ``digits/`` there never shadows the preset)."""
    seps = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return spec.endswith(".toml") or any(s in spec for s in seps)


def resolve_preset(kind: str, spec: str) -> Path:
    """A preset name (file stem in ``rules/`` or ``tasks/``) or a path to a TOML file (a
    spec with a path separator or a ``.toml`` suffix, see :func:`is_path_spec`)."""
    if is_path_spec(spec):
        p = Path(spec)
        if not p.is_file():
            raise MetaplasticError(
                f"{spec}: no such {kind[:-1]} file; give a preset name or a path"
            )
        return p
    names = list_presets(kind)
    if spec not in names:
        err = unknown_name(f"{kind[:-1]} preset", spec, names, f"--{kind[:-1]}")
        if Path(spec).exists():
            err = MetaplasticError(f"{err} (for the file {spec!r} here, write ./{spec})")
        raise err
    return preset_dir(kind) / f"{spec}.toml"


def _check_tables(data: dict, allowed: tuple[str, ...], path: Path) -> None:
    for key in data:
        if key not in allowed:
            raise unknown_name("table", key, allowed, str(path))
    if allowed[0] not in data:
        raise MetaplasticError(f"{path}: missing the [{allowed[0]}] table")


def load_rule(spec: str) -> RuleConfig:
    path = resolve_preset("rules", spec)
    data = read_toml(path)
    _check_tables(data, ("rule",), path)
    base = RuleConfig(name=path.stem)
    return parse_section(RuleConfig, data["rule"], f"{path}: rule", base)


def load_task(spec: str) -> tuple[TaskConfig, NetworkConfig, dict[str, Any]]:
    """Task, network and the task file's ``[train]`` defaults (a raw table, parsed later)."""
    path = resolve_preset("tasks", spec)
    data = read_toml(path)
    _check_tables(data, ("task", "network", "train"), path)
    task = parse_section(TaskConfig, data["task"], f"{path}: task", TaskConfig(name=path.stem))
    net = parse_section(NetworkConfig, data.get("network", {}), f"{path}: network")
    train = data.get("train", {})
    parse_section(TrainConfig, train, f"{path}: train")  # validate early
    return task, net, train


def parse_override(text: str) -> tuple[str, str, Any]:
    """``section.key=value`` (value in TOML syntax; bare words are strings)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise MetaplasticError(f"--set {text!r}: write section.key=value, e.g. --set train.lr=0.01")
    lhs, rhs = text.split("=", 1)
    section, key = lhs.strip().split(".", 1)
    if section not in SECTIONS:
        raise unknown_name("config table", section, SECTIONS, f"--set {text}")
    try:
        value = tomllib.loads(f"v = {rhs.strip()}")["v"]
    except ValueError:  # TOMLDecodeError, or an integer of over 4300 digits
        value = rhs.strip()
    return section, key.strip(), value


def build_config(
    rule: str,
    task: str,
    train: dict[str, Any] | None = None,
    overrides: list[str] = (),
) -> RunConfig:
    """Assemble a run config from a rule spec, a task spec, train settings and overrides.

    Precedence (last wins): built-in defaults < task file ``[train]`` < ``train`` < overrides.
    """
    rule_cfg = load_rule(rule)
    task_cfg, net_cfg, task_train = load_task(task)
    train_table = dict(task_train)
    train_table.update({k: v for k, v in (train or {}).items() if v is not None})
    cfg = RunConfig(rule=rule_cfg, task=task_cfg, network=net_cfg)
    cfg = cfg.replace(train=parse_section(TrainConfig, train_table, "train"))
    return apply_overrides(cfg, overrides)


def apply_overrides(cfg: RunConfig, overrides) -> RunConfig:
    """Apply ``section.key=value`` overrides (the last one of a key wins). Each table is
    validated once, with all its overrides in place, so their order does not matter and
    keys that depend on each other change together (``rule.terms`` with ``rule.init``)."""
    tables: dict[str, dict[str, Any]] = {}
    for text in overrides:
        section, key, value = parse_override(text)
        tables.setdefault(section, {})[key] = value
    for section, values in tables.items():
        cls = SECTIONS[section]
        new = parse_section(cls, values, f"--set {section}", getattr(cfg, section))
        cfg = cfg.replace(**{section: new})
    check_across(cfg)
    return cfg


def check_across(cfg: RunConfig) -> None:
    """Checks that need two tables: a ``train.truncation`` the task can run (before any
    run directory is made)."""
    if cfg.train.truncation:
        from ..tasks._task import task_class

        task = task_class(cfg.task.kind).from_config(cfg.task, cfg.train)
        task.check_segments(cfg.train.truncation)


def config_from_dict(data: dict[str, Any], where: str) -> RunConfig:
    """Parse a resolved run config (as written to ``config.toml`` in a run directory)."""
    for key in data:
        if key not in SECTIONS:
            raise unknown_name("table", key, SECTIONS, where)
    parts = {}
    for name, cls in SECTIONS.items():
        if name not in data:
            raise MetaplasticError(f"{where}: missing the [{name}] table")
        parts[name] = parse_section(cls, data[name], f"{where}: {name}")
    return RunConfig(**parts)
