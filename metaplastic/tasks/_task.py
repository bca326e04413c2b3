"""The task interface: what every task family (classification, PCA, your own) provides,
and the registry that maps ``task.kind`` to a task class."""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, ClassVar

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray

from .._errors import MetaplasticError, unknown_name
from .._registry import refuse_unread_keys, register
from ..inner._episode import InnerResult
from ..rules._rules import AbstractRule


class AbstractTask(eqx.Module):
    """A family of episodes a rule is meta-learned on (an extension point: subclass, set
    ``name``, implement :meth:`run`, :meth:`score` and :meth:`diverged_score`, then
    :func:`register_task`; ``task.kind = "<name>"`` selects it).

    :meth:`run` samples one episode from ``key`` and learns it online through
    :func:`metaplastic.inner.scan_episode` (classification does so via
    :func:`metaplastic.inner.run_episode`), returning an :class:`InnerResult` whose
    ``query_loss`` is the meta-loss. Settings are static fields, so a task is hashable and
    is compiled into the meta-step.
    """

    #: the name ``task.kind`` selects it by
    name: ClassVar[str] = ""
    #: ``True``: episodes are drawn from an image pool (``pool`` in :meth:`run`), so the run
    #: loads ``task.dataset`` and splits it; ``False``: the task generates its inputs
    uses_images: ClassVar[bool] = True
    #: the ``[task]`` keys this kind reads besides ``name``, ``kind`` and ``description``
    #: (a key it does not read, set away from its default, is refused)
    options: ClassVar[tuple[str, ...]] = ()

    @abc.abstractmethod
    def run(
        self,
        rule: AbstractRule,
        net: Any,
        feedback: Any,
        key: PRNGKeyArray,
        pool: Any = None,
        remat: bool = False,
        record: Callable | None = None,
    ) -> InnerResult:
        """Sample one episode and learn it online; ``record`` as in ``scan_episode``."""

    @abc.abstractmethod
    def score(self, result: InnerResult) -> Array:
        """What decisions after training maximise (higher is better)."""

    @abc.abstractmethod
    def diverged_score(self) -> float:
        """The score a diverged episode gets (the worst a working network can do)."""

    def segments(self, rule, net, feedback, key: PRNGKeyArray, pool: Any, length: int):
        """Truncated meta-gradients (``train.truncation``), optional: the episode
        :meth:`run` would learn from ``key`` as ``(carry0, xs, context)``, its start carry,
        its stream with a leading axis of segments of ``length`` updates, and what
        :meth:`run_segment` needs besides. Tasks without it refuse truncation."""
        self.check_segments(length)

    def check_segments(self, length: int) -> None:
        """Refuse, in one line, a truncation to segments of ``length`` updates that this
        task cannot run."""
        if not self.supports_segments():
            raise MetaplasticError(
                f"task.kind = {self.name!r} cannot cut its episodes into segments, so it "
                "cannot use train.truncation; set train.truncation = 0 (tasks that can: "
                f"{', '.join(k for k, c in TASKS.items() if c.supports_segments())})"
            )
        T = self.episode_length()
        if length < 1 or (T and T % length):
            raise MetaplasticError(
                f"train.truncation = {length} does not divide the episode's {T} updates; "
                "pick a divisor of the episode length"
            )

    def run_segment(self, rule, net, feedback, carry, stopped, seg, index, context, remat=False):
        """Learn segment ``index`` (``seg``, one entry of :meth:`segments`' ``xs``) from
        ``carry``; returns ``(carry, stopped, loss, accuracy, diverged)`` with the segment's
        loss, the one truncated meta-gradients differentiate."""
        raise NotImplementedError

    @classmethod
    def supports_segments(cls) -> bool:
        """Whether the task implements :meth:`segments` and :meth:`run_segment`."""
        return cls.segments is not AbstractTask.segments

    def reconstruction_drift(self, rule, net, feedback, key: PRNGKeyArray, pool: Any, remat):
        """How far ``train.gradient = "reconstruct"`` (anchors as ``remat``) rebuilds the
        carries of the episode :meth:`run` would learn from ``key``: the largest relative
        error at an anchor (``inf`` where a step does not invert; see
        :func:`~metaplastic.inner.episode_reconstruction_drift`). The gradient trainer logs
        it every meta-step in reconstruct mode. Default: NaN, not measured for this task."""
        return jnp.asarray(jnp.nan, jnp.float32)

    def episode_length(self) -> int:
        """Online updates per episode (0: unknown until sampled)."""
        return 0

    def check(self, pool: Any, where: str = "task") -> None:
        """Raise a clear error when ``pool`` cannot supply this task (default: no check)."""

    @classmethod
    def from_config(cls, task: Any, train: Any) -> AbstractTask:
        """The task ``task`` (a ``[task]`` config) and ``train`` (``[train]``) describe."""
        return cls()


#: Name -> task class (``task.kind``). :func:`register_task` adds one.
TASKS: dict[str, type[AbstractTask]] = {}


def register_task(cls: type[AbstractTask]) -> type[AbstractTask]:
    """Add a task class to :data:`TASKS` under its ``name`` (a decorator)."""
    return register(TASKS, cls, AbstractTask, "task kind")


def task_class(kind: str) -> type[AbstractTask]:
    """The class ``task.kind = kind`` names (one line naming the choices otherwise)."""
    if kind not in TASKS:
        raise unknown_name("task kind", kind, tuple(TASKS), "task.kind")
    return TASKS[kind]


#: ``[task]`` keys every kind accepts (the others are listed in each class's ``options``)
SHARED_TASK_OPTIONS = ("name", "kind", "description")


def check_task_keys(task: Any, where: str = "task") -> None:
    """Refuse ``[task]`` keys (a dataclass) that ``task.kind`` does not read, set away from
    their defaults: they would otherwise be ignored silently."""
    cls = task_class(task.kind)
    refuse_unread_keys(task, task.kind, cls.options, SHARED_TASK_OPTIONS, where)
