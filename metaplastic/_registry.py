"""The mechanics shared by every extension point's registry and config section."""

from __future__ import annotations

import dataclasses
from typing import Any

from ._errors import MetaplasticError


def register(registry: dict[str, type], cls: type, base: type, what: str) -> type:
    """Add ``cls`` (a subclass of ``base`` with a class attribute ``name``) to ``registry``
    under that name; ``what`` names the kind of thing in errors ("network kind", ...)."""
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise TypeError(f"{cls!r} is not an {base.__name__} subclass")
    if not isinstance(cls.name, str) or not cls.name:
        raise TypeError(f"{cls.__name__} needs a class attribute name (a non-empty string)")
    if registry.get(cls.name, cls) is not cls:
        raise ValueError(f"{what} {cls.name!r} is already registered")
    registry[cls.name] = cls
    return cls


def refuse_unread_keys(
    section: Any, kind: str, options: tuple[str, ...], shared: tuple[str, ...], where: str
) -> None:
    """Refuse keys of a config section (a dataclass) that the chosen ``kind`` does not read
    (neither in ``options`` nor ``shared``), set away from their defaults: they would
    otherwise be ignored silently."""
    defaults = type(section)()
    for f in dataclasses.fields(section):
        if f.name in shared or f.name in options:
            continue
        if getattr(section, f.name) != getattr(defaults, f.name):
            raise MetaplasticError(
                f"{where}.{f.name} does not apply to {where}.kind = {kind!r} (it reads "
                f"{', '.join(options) or 'no other keys'}); remove it or change {where}.kind"
            )
