"""The one top-level error handler of the ``mmpo`` command.

``run_command(command, argv)`` runs one command. A failure the user can fix (a bad config or
dataset, a full disk, a folder without write permission, broken YAML, a missing optional
package, a judge without its API key or endpoint) ends in one line naming the problem and a hint,
exit code 2. Anything else is a bug: one line saying so, exit code 1. The full traceback is shown
only with ``--debug`` (or ``MMPO_DEBUG=1``). Ctrl-C exits with 130 and ``SIGTERM`` with 143; during
training both first write a checkpoint (``mmpo.training.interrupt``).
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.text import Text

EXIT_KNOWN = 2
EXIT_BUG = 1
DEBUG_FLAG = "--debug"

DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
PERMISSION_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS}


@dataclass(frozen=True)
class Failure:
    """A failure the user can fix: what went wrong (one line) and what to do about it."""

    message: str
    hint: str = ""


class Terminated(BaseException):
    """``SIGTERM`` outside the training loop (which handles it itself)."""


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _config_file(argv: Sequence[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def _os_failure(error: OSError) -> Failure | None:
    where = f" ({error.filename})" if error.filename else ""
    if error.errno in DISK_FULL_ERRNOS:
        system = error.strerror in (None, os.strerror(error.errno))  # else our own words (mmpo.training.checkpoint)
        text = f"no space left on the device{where}" if system else f"{error.strerror}{where}"
        return Failure(
            text, "free some space, or choose an --output-dir on a disk with room (partial files were removed)"
        )
    if error.errno in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR):
        return Failure(f"{error.strerror or error}{where}", "check the path")
    if error.errno in PERMISSION_ERRNOS:
        what = "read-only file system" if error.errno == errno.EROFS else "permission denied"
        return Failure(
            f"{what}{where}",
            "choose an --output-dir (or cache folder) you can write to, or fix the folder's permissions",
        )
    return None


def _judge_failure(error: BaseException) -> Failure | None:
    judges = sys.modules.get("mmpo.evaluation.judges")  # only loaded when a judge ran
    if judges is None or not isinstance(error, judges.JudgeError):
        return None
    if isinstance(error, judges.MissingAPIKeyError):
        return Failure(
            _first_line(error),
            "export the variable in this shell (keys are read from the environment only), or use --judge programmatic",
        )
    if isinstance(error, judges.EndpointUnreachableError):
        return Failure(
            _first_line(error),
            "check the network and the endpoint (OPENAI_BASE_URL for OpenAI-compatible "
            "servers); the judge cache keeps answers already received",
        )
    return Failure(_first_line(error), "check the judge's model name and API key; answers received so far are cached")


def _import_failure(error: ImportError) -> Failure | None:
    from mmpo.training.preflight import OPTIONAL_PACKAGES

    name = (error.name or "").split(".")[0]
    if name not in OPTIONAL_PACKAGES:  # transformers words it its own way, e.g. "FlashAttention2 ..."
        text = str(error)
        name = next((n for n, (words, _) in OPTIONAL_PACKAGES.items() if any(w in text for w in words)), "")
    if not name:
        return None
    return Failure(f"missing optional package '{name}': {_first_line(error)}", OPTIONAL_PACKAGES[name][1])


def _yaml_failure(error: BaseException, argv: Sequence[str]) -> Failure:
    source = _config_file(argv) or "the YAML file"
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(error, "problem", None) or _first_line(error)
    return Failure(
        f"{source} is not valid YAML{where}: {problem}",
        "write one 'key: value' per line (mmpo train --help lists the keys)",
    )


def _decode_failure(error: UnicodeDecodeError, argv: Sequence[str]) -> Failure:
    source = _config_file(argv)
    head = b""
    if source:
        try:
            head = Path(source).read_bytes()[:2]
        except OSError:
            pass
    kind = " (it is UTF-16)" if head in (b"\xff\xfe", b"\xfe\xff") else ""
    what = f"{source} is not UTF-8 text{kind}" if source else f"a file is not UTF-8 text ({error})"
    return Failure(what, "save it as UTF-8")


def explain(error: BaseException, argv: Sequence[str] = ()) -> Failure | None:
    """One line and a hint for a failure the user can fix; ``None`` for anything else (a bug)."""
    import yaml

    from mmpo.config import ConfigError
    from mmpo.data import DataError

    loop = sys.modules.get("mmpo.training.loop")  # loaded whenever training ran (no torch import otherwise)
    if isinstance(error, DataError):
        hint = "pass --on-bad-rows skip to skip and count such rows (see data_report.json)" if error.skippable else ""
        return Failure(str(error), hint)
    if isinstance(error, ConfigError):
        return Failure(str(error))
    if loop is not None and isinstance(error, loop.TrainingError):
        return Failure(str(error), "lower the learning rate, or look for the rows named in metrics.jsonl")
    for link in _chain(error):  # disk full and permissions hide inside other libraries' errors
        if isinstance(link, OSError) and (failure := _os_failure(link)):
            return failure
        if "no space left on device" in str(link).lower():
            return _os_failure(OSError(errno.ENOSPC, _first_line(link)))
    if isinstance(error, yaml.YAMLError):
        return _yaml_failure(error, argv)
    if isinstance(error, UnicodeDecodeError):
        return _decode_failure(error, argv)
    if isinstance(error, ImportError):
        return _import_failure(error)
    if (failure := _judge_failure(error)) is not None:
        return failure
    datasets = sys.modules.get("datasets")
    if datasets is not None and isinstance(error, datasets.exceptions.DatasetsError):
        return Failure(f"dataset: {_first_line(error)}", "check the --dataset path or Hub id and its files")
    return None


def _say(console: Console, label: str, text: str, style: str) -> None:
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    # Text: user text is never markup; soft_wrap: one line whatever the width (paths stay whole, greppable)
    console.print(Text(prefix) + Text(label, style=style) + Text(text), soft_wrap=True)


@contextmanager
def sigterm_as_exception() -> Iterator[None]:
    """Outside the training loop, ``SIGTERM`` raises :class:`Terminated` (exit 143) instead of
    killing the process mid-write; the loop installs its own handler while it runs."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_terminated(signum, frame) -> None:
    raise Terminated


def run_command(command: Callable[[list[str]], int], argv: Sequence[str], console: Console | None = None) -> int:
    """Run ``command(argv)`` (a CLI command: argv in, exit code out) under the error handler."""
    console = console or Console(stderr=True, highlight=False, soft_wrap=True)
    debug = DEBUG_FLAG in argv or os.environ.get("MMPO_DEBUG", "") not in ("", "0")
    argv = [arg for arg in argv if arg != DEBUG_FLAG]
    try:
        with sigterm_as_exception():
            return command(argv)
    except KeyboardInterrupt as stop:
        if hasattr(stop, "exit_code"):  # TrainingInterrupted: the loop said where its checkpoint is and how to resume
            return stop.exit_code
        _say(
            console,
            "interrupted",
            " (Ctrl-C): checkpoints written before are kept (continue with --resume)",
            "bold yellow",
        )
        return 128 + signal.SIGINT
    except Terminated:
        _say(
            console,
            "terminated",
            " (SIGTERM): checkpoints written before are kept (continue with --resume)",
            "bold yellow",
        )
        return 128 + signal.SIGTERM
    except SystemExit:
        raise  # argparse/tyro usage errors and --help
    except Exception as error:
        failure = explain(error, argv)
        if debug:
            traceback.print_exc()
        if failure is None:
            _say(console, "internal error: ", f"{type(error).__name__}: {_first_line(error)}", "bold red")
            if not debug:
                _say(console, "hint: ", "rerun with --debug for the traceback, and please report it", "dim")
            return EXIT_BUG
        _say(console, "error: ", failure.message, "bold red")
        if failure.hint:
            _say(console, "hint: ", failure.hint, "dim")
        return EXIT_KNOWN
