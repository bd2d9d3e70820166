"""One run per folder: an exclusive lock on ``<output_dir>/.lock`` for as long as a run uses it.

Two runs writing one folder interleave ``metrics.jsonl`` and replace each other's checkpoints,
so the second one is refused at once, naming the holder (its PID, host and command, which the
holder writes into the lock file). The lock is a ``flock`` on that file: the kernel drops it when
the holder exits in any way, ``SIGKILL`` included, so a stale lock left by a dead run is simply
taken over (with a message naming the dead process). Only the main process of a launch takes it.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from pathlib import Path

from mmpo.config import ConfigError
from mmpo.training.run_dir import LOCK_FILE

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock; runs are not locked there
    fcntl = None


class RunFolderBusy(ConfigError):
    """Another live process holds the run folder."""


# Locks this process holds, by folder: a second train() on the same folder in one process (the
# Python API, tests) re-enters instead of deadlocking on its own flock.
_held: dict[str, int] = {}


def acquire(folder: str | Path, say=print) -> None:
    """Take the folder's lock or raise :class:`RunFolderBusy` naming the process that holds it."""
    folder = Path(folder)
    key = os.path.realpath(folder)
    if fcntl is None or key in _held:
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    if path.is_symlink():  # never followed: a planted link would make us write elsewhere
        path.unlink()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        holder = _read_holder(fd)
        os.close(fd)
        if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        raise RunFolderBusy(
            f"{folder} is in use by another run ({describe(holder)}); wait for it to finish or stop it, "
            "or choose another --output-dir"
        ) from None
    previous = _read_holder(fd)
    if previous.get("pid") and not _alive(previous):
        say(f"taking over {path} from process {previous['pid']}, which is no longer running")
    me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(sys.argv)[:500],
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    _held[key] = fd


def release(folder: str | Path) -> None:
    fd = _held.pop(os.path.realpath(Path(folder)), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor drops the flock


def describe(holder: dict) -> str:
    if not holder.get("pid"):
        return "a process that has not written its PID yet"
    where = f" on {holder['host']}" if holder.get("host") and holder["host"] != socket.gethostname() else ""
    since = f", started {holder['started']}" if holder.get("started") else ""
    command = f": {holder['command']}" if holder.get("command") else ""
    return f"process {holder['pid']}{where}{since}{command}"


def _read_holder(fd: int) -> dict:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _alive(holder: dict) -> bool:
    if holder.get("host") not in (None, socket.gethostname()):
        return True  # another machine's process: cannot tell, and it no longer holds the lock anyway
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError):
        return True
    return True
