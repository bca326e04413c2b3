"""The outer-loop interface: what every trainer (gradient, evolution strategy, your own)
provides, and the registry that maps ``train.outer`` to a trainer class."""

from __future__ import annotations

import abc
from typing import Any

import equinox as eqx
from jaxtyping import PRNGKeyArray

from ..rules._rules import AbstractRule
from ..tasks._problem import Problem


class AbstractTrainer(eqx.Module):
    """An outer loop that meta-learns a rule's coefficients on a :class:`Problem`.

    Pure functions of an explicit state: ``init(rule, key) -> state``, ``step(state) ->
    (state, metrics)`` (one jitted meta-step or generation; ``metrics`` holds at least
    ``loss``, ``query_accuracy`` and ``diverged``), ``rule(state) -> rule`` (the current
    rule). ``mode`` names what runs (``"forward"``, ``"es:CMA_ES"``, ...). A trainer class
    says which ``train.outer`` names it serves (:meth:`accepts`) and builds itself from the
    ``[train]`` config (:meth:`from_config`).
    """

    mode: eqx.AbstractVar[str]

    @abc.abstractmethod
    def init(self, rule: AbstractRule, key: PRNGKeyArray) -> Any:
        """The outer-loop state at the start, for ``rule``."""

    @abc.abstractmethod
    def step(self, state: Any) -> tuple[Any, dict]:
        """One meta-step: the new state and its metrics."""

    @abc.abstractmethod
    def rule(self, state: Any) -> AbstractRule:
        """The rule the state holds."""

    @classmethod
    @abc.abstractmethod
    def accepts(cls, outer: str) -> bool:
        """Whether this trainer serves ``train.outer = outer``."""

    @classmethod
    def check_config(cls, train: Any, where: str = "train") -> None:
        """Refuse bad values of the ``[train]`` keys this trainer owns (one line each).
        Every registered trainer checks its keys on every config, so a value is checked
        whichever outer loop the run uses (default: nothing to check)."""

    @classmethod
    @abc.abstractmethod
    def from_config(
        cls,
        train: Any,
        problem: Problem,
        rule: AbstractRule,
        *,
        units_key=None,
        trainable=None,
    ) -> AbstractTrainer:
        """The trainer ``train`` (a ``[train]`` config) describes, for ``problem`` and
        ``rule``. ``units_key``: probe key for ``train.units = "episode"``; ``trainable``:
        a 1/0 pytree freezing coefficients (refused by trainers that cannot freeze)."""


#: Name -> trainer class. The gradient trainer is registered with the package; the
#: evolution-strategy trainer on first use (evosax runs JAX code when imported, which must
#: wait for jax.distributed.initialize()). :func:`register_trainer` adds your own.
TRAINERS: dict[str, type[AbstractTrainer]] = {}


def register_trainer(name: str, cls: type[AbstractTrainer]) -> type[AbstractTrainer]:
    """Add a trainer class under ``name`` (it serves the ``train.outer`` values its
    :meth:`~AbstractTrainer.accepts` accepts)."""
    if not (isinstance(cls, type) and issubclass(cls, AbstractTrainer)):
        raise TypeError(f"{cls!r} is not an AbstractTrainer subclass")
    if TRAINERS.get(name, cls) is not cls:
        raise ValueError(f"trainer {name!r} is already registered")
    TRAINERS[name] = cls
    return cls
