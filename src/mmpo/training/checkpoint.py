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


def verify(folder: Path, *, checksums: bool = True) -> str | None:
    """``None`` if the checkpoint is complete and intact, else the reason it is not."""
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
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


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
    return final


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
    if keep <= 0:
        return
    steps = [p for p in list_checkpoints(run_dir) if p.name.startswith("step-")]
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
