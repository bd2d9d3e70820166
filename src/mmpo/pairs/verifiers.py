"""Programmatic verifiers: ``verifier(example, completion) -> score`` in [0, 1] (1 = right, 0 = wrong).

``example`` is the prompt row (its ``instruction`` plus whatever metadata the row carries: the
answer, operands, accepted spellings), ``completion`` the model's reply. ``bool`` results count as
1/0. Built-in verifiers are named; anything else is ``module:function``, imported as given (the
current folder is importable, so ``my_checks:grade`` finds ``./my_checks.py``).
"""

from __future__ import annotations

import importlib
import math
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from mmpo.config import ConfigError
from mmpo.smolworld.families import FAMILIES
from mmpo.world.tasks import FACT_TASK, WORD_TASKS
from mmpo.world.tasks import grade as world_grade

Verifier = Callable[[Mapping, str], float]
WORLD_TASK_NAMES = (*WORD_TASKS, FACT_TASK)


def verify_world(example: Mapping, completion: str) -> float:
    """The bundled world's grade: 1 for exactly the concise answer, 0.5 for the answer inside other text."""
    return world_grade(example, completion) / 2


KNOWN_TASKS = (*FAMILIES, *WORLD_TASK_NAMES)


def task_verifier(example: Mapping) -> Verifier | None:
    """The verifier for the row's ``task``: a real-model family (add, multiply, capital) or a world
    task; a row with an ``answer`` and no ``task`` gets the world's rule (exact 1, contained 0.5).
    None when the row names no known task."""
    task = example.get("task")
    if task in FAMILIES:
        return FAMILIES[task].verify
    if task in WORLD_TASK_NAMES or (task is None and "answer" in example):
        return verify_world
    return None


def verify_by_task(example: Mapping, completion: str) -> float:
    """Grade with :func:`task_verifier`'s choice for the row."""
    verify = task_verifier(example)
    if verify is None:
        raise ValueError(
            f"no built-in verifier for task {example.get('task')!r} (known tasks: {', '.join(KNOWN_TASKS)})"
        )
    return verify(example, completion)


BUILTIN_VERIFIERS: dict[str, Verifier] = {
    "task": verify_by_task,
    "world": verify_world,
    **{name: fam.verify for name, fam in FAMILIES.items()},
}


def resolve_verifier(spec: str) -> Verifier:
    """A built-in verifier's name, or ``module:function``; a clear error when neither works."""
    if spec in BUILTIN_VERIFIERS:
        return BUILTIN_VERIFIERS[spec]
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(
            f"unknown verifier {spec!r}: use a built-in ({', '.join(BUILTIN_VERIFIERS)}) or module:function"
        )
    if str(Path.cwd()) not in sys.path and "" not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"verifier {spec!r}: cannot import module {module_name!r} ({err})") from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise ConfigError(f"verifier {spec!r}: module {module_name!r} has no function {attr!r}")
    return function


def score(verifier: Verifier, example: Mapping, completion: str, where: str) -> float:
    """The verifier's score as a float in [0, 1]; anything else is an error naming ``where``."""
    try:
        value = verifier(example, completion)
    except Exception as err:  # a user's verifier may fail in any way: say where, keep the cause
        raise ValueError(f"{where}: the verifier failed: {err.__class__.__name__}: {err}") from err
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value <= 1:
        raise ValueError(f"{where}: the verifier returned {value!r}; it must return a number in [0, 1] or a bool")
    return float(value)
