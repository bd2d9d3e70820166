"""Checkpoints: written to a temporary folder, completed with a manifest, renamed into place.

A checkpoint folder ``<run>/checkpoints/<name>/`` holds ``model/`` (a loadable model or LoRA
adapter with its tokenizer), ``state/`` (Accelerate's state: weights, optimizer, RNG; scheduler),
``trainer_state.json`` and ``manifest.json`` (sizes and sha256 of every file). A folder without a
valid manifest is incomplete or damaged and is never resumed from.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

MANIFEST = "manifest.json"


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path, trainer_state: dict) -> None:
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            rel = path.relative_to(folder).as_posix()
            files[rel] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    manifest = {"created": time.time(), "trainer_state": trainer_state, "files": files}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, folder / MANIFEST)


def verify(folder: Path, *, checksums: bool = True) -> str | None:
    """``None`` if the checkpoint is complete and intact, else the reason it is not."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return "no manifest (the write did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        return "manifest is not valid JSON"
    for rel, info in manifest["files"].items():
        path = folder / rel
        if not path.is_file():
            return f"missing file {rel}"
        if path.stat().st_size != info["size"]:
            return f"file {rel} has the wrong size"
        if checksums and _sha256(path) != info["sha256"]:
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
    (staging / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
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
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint folders (complete or not), oldest first by global step."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if path.is_dir() and not path.name.startswith("."):
            state = path / "trainer_state.json"
            step = json.loads(state.read_text()).get("global_step", -1) if state.is_file() else -1
            found.append((step, path.name, path))
    return [p for _, _, p in sorted(found)]


def latest_valid(run_dir: str | Path, log=print) -> Path | None:
    """Newest checkpoint that verifies; damaged ones are reported and skipped."""
    for path in reversed(list_checkpoints(run_dir)):
        problem = verify(path)
        if problem is None:
            return path
        log(f"skipping checkpoint {path}: {problem}")
    return None


def read_trainer_state(folder: Path) -> dict:
    return json.loads((folder / "trainer_state.json").read_text())


def prune_step_checkpoints(run_dir: str | Path, keep: int) -> None:
    if keep <= 0:
        return
    steps = [p for p in list_checkpoints(run_dir) if p.name.startswith("step-")]
    for path in steps[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
