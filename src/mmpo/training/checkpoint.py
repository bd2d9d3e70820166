"""Checkpoints: written to a temporary folder, completed with a manifest, renamed into place.

A checkpoint folder ``<run>/checkpoints/<name>/`` holds ``model/`` (a loadable model or LoRA
adapter with its tokenizer), ``state/`` (Accelerate's state: weights, optimizer, RNG; scheduler),
``trainer_state.json`` and ``manifest.json`` (sizes and sha256 of every file). A folder without a
valid manifest is incomplete or damaged and is never resumed from.

Crash safety (docs/reliability.md): a process killed at any instant leaves the run folder
resumable. Staging folders (``.tmp-<name>``), checkpoints set aside while being replaced
(``.old-<name>``) and checkpoints being pruned (``.trash-<name>``) are dot-folders that are never
taken for checkpoints; :func:`recover` tidies them up on ``--resume``. Files are flushed to disk
before the manifest is written and the folder renamed, so a power cut cannot leave a manifest that
vouches for data that never reached the disk. File names: ``mmpo.training.run_dir``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from mmpo.training.run_dir import (
    CHECKPOINTS_DIR,
    MANIFEST_FILE,
    TRAINER_STATE_FILE,
    atomic_write_text,
    fsync_dir,
)

# Checkpoints known to verify in this process, by path: (manifest inode, size, mtime). Pruning
# ranks only verified checkpoints, and this keeps it from hashing every kept one at every save.
_verified: dict[str, tuple[int, int, int]] = {}


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def _sha256(path: Path, *, flush: bool = False) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
        if flush:  # fsync works on a read-only descriptor too: the file's dirty pages reach the disk
            os.fsync(handle.fileno())
    return digest.hexdigest()


def write_manifest(folder: Path, trainer_state: dict) -> None:
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != MANIFEST_FILE:
            rel = path.relative_to(folder).as_posix()
            files[rel] = {"size": path.stat().st_size, "sha256": _sha256(path, flush=True)}
    manifest = {"created": time.time(), "trainer_state": trainer_state, "files": files}
    atomic_write_text(folder / MANIFEST_FILE, json.dumps(manifest, indent=1))


def _manifest_stat(folder: Path) -> tuple[int, int, int] | None:
    try:
        stat = (folder / MANIFEST_FILE).stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def is_verified(folder: Path) -> bool:
    """Whether the checkpoint verifies (checksums included); remembered while its manifest is unchanged."""
    key = os.path.realpath(folder)
    stat = _manifest_stat(folder)
    if stat is not None and _verified.get(key) == stat:
        return True
    return verify(folder) is None


def verify(folder: Path, *, checksums: bool = True) -> str | None:
    """``None`` if the checkpoint is complete and intact, else the reason it is not."""
    problem = _check(folder, checksums)
    key = os.path.realpath(folder)
    if problem is not None:
        _verified.pop(key, None)
    elif checksums and (stat := _manifest_stat(folder)) is not None:
        _verified[key] = stat
    return problem


def _check(folder: Path, checksums: bool) -> str | None:
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.is_file():
        return "no manifest (the write did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        entries = [(rel, int(info["size"]), str(info["sha256"])) for rel, info in files.items()]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError):
        return "manifest is damaged (not the JSON this module writes)"
    if not entries:
        return "manifest lists no files"
    for rel, size, sha256 in entries:
        path = folder / rel
        if not path.is_file():
            return f"missing file {rel}"
        if path.stat().st_size != size:
            return f"file {rel} has the wrong size"
        if checksums and _sha256(path) != sha256:
            return f"file {rel} fails its checksum"
    return None


def staging_dir(run_dir: str | Path, name: str) -> Path:
    path = checkpoints_dir(run_dir) / f".tmp-{name}"
    discard(path)
    path.mkdir(parents=True)
    return path


def discard(path: Path) -> None:
    """Remove a staging folder (e.g. after a failed write: a disk-full one would keep the disk full).
    A symlink is unlinked, never followed."""
    if path.is_symlink():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def finalize(staging: Path, name: str, trainer_state: dict) -> Path:
    """Write the manifest and move the staging folder into place atomically."""
    (staging / TRAINER_STATE_FILE).write_text(json.dumps(trainer_state, indent=1))
    write_manifest(staging, trainer_state)
    final = staging.parent / name
    if final.exists():
        # Same name from an earlier, interrupted attempt: keep it aside until the new one is in place.
        aside = staging.parent / f".old-{name}"
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(final, aside)
        os.replace(staging, final)
        shutil.rmtree(aside)
    else:
        os.replace(staging, final)
    fsync_dir(final.parent)
    stat = _manifest_stat(final)
    if stat is not None:  # every file was just hashed for the manifest
        _verified[os.path.realpath(final)] = stat
    return final


DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# What torch's and safetensors' writers say when the disk fills (they lose the errno).
DISK_FULL_WORDS = ("no space left", "disk quota", "file write failed", "unexpected pos", "file too large")
LOW_SPACE_BYTES = 64 << 20


def write_error(error: BaseException, name: str, run_dir: Path) -> OSError | None:
    """A clear ``OSError(ENOSPC)`` when writing checkpoint ``name`` failed because the disk is full
    (torch reports it as a chain of ``RuntimeError``s that never say so), else ``None``."""
    chain, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        chain.append(error)
        error = error.__cause__ or error.__context__
    by_errno = any(isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS for e in chain)
    by_words = any(word in str(e).lower() for e in chain for word in DISK_FULL_WORDS)
    try:
        low = shutil.disk_usage(checkpoints_dir(run_dir) if checkpoints_dir(run_dir).is_dir() else run_dir).free
        low = low < LOW_SPACE_BYTES
    except OSError:
        low = False
    if not (by_errno or (by_words and low)):
        return None
    return OSError(
        errno.ENOSPC, f"no space left on the device while writing checkpoint {name} in {checkpoints_dir(run_dir)}"
    )


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint folders (complete or not), oldest first by global step."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if path.is_dir() and not path.name.startswith("."):
            found.append((_global_step(path), path.name, path))
    return [p for _, _, p in sorted(found)]


def _global_step(folder: Path) -> int:
    """The checkpoint's step, or -1 when its trainer state is missing or unreadable (damaged)."""
    try:
        step = json.loads((folder / TRAINER_STATE_FILE).read_text()).get("global_step", -1)
    except (OSError, ValueError, AttributeError):
        return -1
    return step if isinstance(step, int) else -1


def latest_valid(run_dir: str | Path, log=print) -> Path | None:
    """Newest checkpoint that verifies; damaged ones are reported and skipped."""
    for path in reversed(list_checkpoints(run_dir)):
        problem = verify(path)
        if problem is None:
            return path
        log(f"skipping checkpoint {path}: {problem}")
    return None


def read_trainer_state(folder: Path) -> dict:
    return json.loads((folder / TRAINER_STATE_FILE).read_text())


def prune_step_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` step checkpoints that verify.

    Only verified checkpoints are ranked and counted: damaged ones (e.g. left by an earlier attempt
    at a later step) would otherwise rank as newer and get fresh good checkpoints deleted. Damaged
    ones are left alone; a resume skips them, and the run overwrites them when it reaches their step.
    """
    if keep <= 0:
        return
    steps = [p for p in list_checkpoints(run_dir) if p.name.startswith("step-") and is_verified(p)]
    for path in steps[:-keep]:
        # Renamed first, so a kill during the deletion leaves a dot-folder, not a half checkpoint.
        trash = path.parent / f".trash-{path.name}"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)


def recover(run_dir: str | Path, log=print) -> None:
    """Tidy the leftovers of a run that was killed, before resuming it (main process only).

    A ``.old-<name>`` whose replacement never arrived (killed between the two renames of
    :func:`finalize`) is the last complete copy of that checkpoint and is moved back; every other
    dot-folder (staging, set-aside, pruned) is deleted.
    """
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return
    for path in sorted(root.iterdir()):
        if path.is_symlink() and path.name.startswith("."):  # planted: unlinked, never followed
            path.unlink()
            log(f"removed the symlink {path} (run files are never written through links)")
            continue
        if not path.is_dir() or not path.name.startswith("."):
            continue
        name = path.name.split("-", 1)[1] if "-" in path.name else ""
        if path.name.startswith(".old-") and name and not (root / name).exists() and verify(path) is None:
            os.replace(path, root / name)
            log(f"restored checkpoint {root / name} (its replacement was interrupted)")
            continue
        shutil.rmtree(path, ignore_errors=True)
        log(f"removed leftover {path} from an interrupted run")
    for path in Path(run_dir).glob(".*.tmp*"):  # an interrupted atomic_write_text
        path.unlink(missing_ok=True)
    fsync_dir(root)
