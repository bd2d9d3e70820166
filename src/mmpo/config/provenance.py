"""Where every setting came from: the default, a preset, a YAML file, a command-line flag, a keyword
of the Python API, or a rule (an objective's default, the authors'-code variant).

A config records the fields it was *given* (keywords to its constructor, ``from_dict`` values,
flags); a preset then fills only the others. ``dataclasses.replace`` cannot tell given fields from
copied ones, so it marks every field as given (your values win over a preset, never the reverse);
use ``with_values`` to change a config while keeping its record.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, TypeVar

DEFAULT = "default"
API = "api"
FLAG = "flag"
PRESET = "preset"
#: Sources that mean "the user chose this value".
USER_SOURCES = (API, FLAG)  # plus "file:<path>", see ``is_user_set``

T = TypeVar("T")


def records_sources(cls: type[T]) -> type[T]:
    """Class decorator (after ``@dataclass``): remember which fields the constructor was given."""
    generated = cls.__init__

    @functools.wraps(generated)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        generated(self, *args, **kwargs)
        names = [f.name for f in dataclasses.fields(self) if f.init]
        object.__setattr__(self, "_sources", {name: API for name in [*names[: len(args)], *kwargs]})

    cls.__init__ = __init__
    return cls


def sources(cfg: Any) -> dict[str, str]:
    """Every field's source (``default`` for fields nobody set)."""
    given = getattr(cfg, "_sources", {})
    return {f.name: given.get(f.name, DEFAULT) for f in dataclasses.fields(cfg)}


def is_user_set(cfg: Any, name: str) -> bool:
    source = getattr(cfg, "_sources", {}).get(name, DEFAULT)
    return source in USER_SOURCES or source.startswith("file:")


def with_values(cfg: T, source: str, **changes: Any) -> T:
    """``cfg`` with ``changes``, recorded as coming from ``source``; other fields keep their record."""
    new = dataclasses.replace(cfg, **changes)
    object.__setattr__(new, "_sources", {**getattr(cfg, "_sources", {}), **dict.fromkeys(changes, source)})
    return new


def with_sources(cfg: T, recorded: dict[str, str]) -> T:
    """``cfg`` with the given fields' sources replaced (e.g. after parsing a file and flags)."""
    object.__setattr__(cfg, "_sources", {**getattr(cfg, "_sources", {}), **recorded})
    return cfg


def given_sources(cfg: Any) -> dict[str, str]:
    """The fields somebody set, with their sources (no ``default`` entries)."""
    return dict(getattr(cfg, "_sources", {}))


def set_sources(cfg: T, recorded: dict[str, str]) -> T:
    """``cfg`` with exactly ``recorded`` as its record (e.g. a parser built it from every field)."""
    object.__setattr__(cfg, "_sources", dict(recorded))
    return cfg


def flags_in_argv(cls: type, argv: Sequence[str]) -> set[str]:
    """Config fields named by ``--flag`` options in ``argv`` (dashes or underscores, ``--no-flag`` too)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    found = set()
    for token in argv:
        if not token.startswith("--"):
            continue
        name = token[2:].split("=", 1)[0].replace("-", "_")
        if name in fields:
            found.add(name)
        elif name.startswith("no_") and name[3:] in fields:
            found.add(name[3:])
    return found
