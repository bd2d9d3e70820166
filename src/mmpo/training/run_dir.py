"""The run folder: every file name in it, atomic writes, the metrics log and the resume checks.

Layout of ``<output_dir>/``::

    config.yaml            the resolved config of the run (compared on --resume)
    metrics.jsonl          one JSON record per logging step / evaluation / event
    data_report.json       rows kept, truncated and dropped, per split
    data_fingerprint.json  what the training data was (compared on --resume)
    summary.json           the run's headline numbers, written at the end
    .lock                  who holds the folder (``mmpo.training.run_lock``)
    checkpoints/<name>/    model/, state/, config.yaml, trainer_state.json, manifest.json
    checkpoints/<name>/eval/results.json    what ``mmpo eval`` measured on that checkpoint

Every file is replaced atomically (a temporary file, then ``os.replace``) or appended to through
a descriptor opened with ``O_NOFOLLOW``: a kill never leaves half a file, and a symlink planted
in the folder is replaced, never written through.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmpo.config import ConfigError, resume_mismatches, to_dict

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
DATA_REPORT_FILE = "data_report.json"
DATA_FINGERPRINT_FILE = "data_fingerprint.json"
SUMMARY_FILE = "summary.json"
LOCK_FILE = ".lock"
CHECKPOINTS_DIR = "checkpoints"
# inside a checkpoint folder
MODEL_DIR = "model"
STATE_DIR = "state"
TRAINER_STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
EVAL_DIR = "eval"
RESULTS_FILE = "results.json"


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Readers (and a resumed run after a kill) see the old content or the new one, never half.

    The temporary file is created exclusively (``mkstemp``), so nothing planted under its name is
    followed; ``os.replace`` swaps the directory entry, so a symlink at ``path`` is replaced, not
    written through. Its name matches ``.<name>.tmp*``, which ``checkpoint.recover`` removes.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)  # e.g. disk full: leave no partial file behind
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def append_line(path: Path, line: str) -> None:
    """Append one line; refuses (``ELOOP``) to write through a symlink at ``path``."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, 0o644)
    try:
        os.write(fd, line.encode("utf-8"))
    finally:
        os.close(fd)


def read_metrics(path: str | Path) -> list[dict]:
    """Records of a ``metrics.jsonl``; a last line torn by a kill mid-write is ignored."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # only ever the torn tail of an interrupted append
        if isinstance(record, dict):
            records.append(record)
    return records


def trim_metrics(path: str | Path, global_step: int, *, write: bool = True) -> list[dict]:
    """Keep the records up to ``global_step`` (those of the checkpoint a run resumes from).

    Anything logged after that checkpoint will be logged again by the resumed run, so it is
    dropped here: the file never holds a step twice. Rewritten atomically when ``write``.
    """
    path = Path(path)
    kept = [r for r in read_metrics(path) if isinstance(r.get("step", 0), int) and r.get("step", 0) <= global_step]
    if write and (path.is_file() or path.is_symlink()):
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


class MetricsLog:
    """Appends one JSON line per record to ``metrics.jsonl`` (only where ``enabled``: the main process)."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled
        self.records: list[dict] = []

    def write(self, record: dict) -> None:
        self.records.append(record)
        if self.enabled:
            append_line(self.path, json.dumps(record) + "\n")


@dataclass
class LogWindow:
    """The per-step metrics since the last metrics line, averaged into the next one.

    Saved in each checkpoint's trainer state and restored on resume, so a run resumed between two
    logging steps writes the same metrics line as one that was never interrupted.
    """

    values: dict[str, list[float]] = field(default_factory=dict)
    tokens: int = 0
    started: float = field(default_factory=time.perf_counter)

    def add(self, metrics: dict[str, float], tokens: int) -> None:
        self.tokens += tokens
        for key, value in metrics.items():
            self.values.setdefault(key, []).append(value)

    def seconds(self) -> float:
        return max(time.perf_counter() - self.started, 1e-9)

    def means(self) -> dict[str, float]:
        return {key: sum(values) / len(values) for key, values in self.values.items()}

    def state(self) -> dict[str, Any]:
        return {"values": self.values, "tokens": self.tokens, "seconds": self.seconds()}

    @classmethod
    def restore(cls, state: dict[str, Any] | None) -> LogWindow:
        if not state:
            return cls()
        # Time already spent in the window counts, so tokens/s stays a rate over the whole window.
        return cls(
            values={k: list(v) for k, v in state["values"].items()},
            tokens=int(state["tokens"]),
            started=time.perf_counter() - float(state["seconds"]),
        )


class RunDir:
    """One run's output folder (``output_dir``)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    config = property(lambda self: self.path / CONFIG_FILE)
    metrics = property(lambda self: self.path / METRICS_FILE)
    data_report = property(lambda self: self.path / DATA_REPORT_FILE)
    data_fingerprint = property(lambda self: self.path / DATA_FINGERPRINT_FILE)
    summary = property(lambda self: self.path / SUMMARY_FILE)
    checkpoints = property(lambda self: self.path / CHECKPOINTS_DIR)

    def check_start(self, cfg: Any) -> None:
        """Refuse a fresh start over an earlier run's checkpoints, and a resume with other settings."""
        from mmpo.training import checkpoint

        if cfg.resume:
            saved, source = self.stored_config()
            mismatched = resume_mismatches(saved, cfg) if saved is not None else []
            if mismatched:
                raise ConfigError(
                    f"--resume: {self.path} was made with a different config ({source}); keys that differ: "
                    f"{', '.join(mismatched)} (use another output_dir, or the same settings)"
                )
        elif checkpoint.list_checkpoints(self.path):
            raise ConfigError(
                f"{self.path} already holds checkpoints: pass --resume to continue that run, "
                "or choose another --output-dir"
            )

    def stored_config(self) -> tuple[dict | None, str]:
        """The config the run was made with: ``config.yaml``, or, when that is damaged, the copy in
        the newest checkpoint that has a readable one. ``(None, reasons)`` when there is none."""
        from mmpo.training import checkpoint

        candidates = [self.config] + [p / CONFIG_FILE for p in reversed(checkpoint.list_checkpoints(self.path))]
        problems = []
        for path in candidates:
            if not path.is_file():
                continue
            try:
                saved = yaml.safe_load(path.read_text(encoding="utf-8"))
            except (yaml.YAMLError, UnicodeDecodeError, OSError) as error:
                problems.append(f"{path} is damaged ({type(error).__name__})")
                continue
            if isinstance(saved, dict):
                return saved, str(path)
            problems.append(f"{path} is damaged (not a mapping)")
        if problems and checkpoint.list_checkpoints(self.path):
            raise ConfigError(
                f"--resume: cannot tell which settings {self.path} was made with: {'; '.join(problems)}. "
                "Restore the file, or start a new run in another output_dir"
            )
        return None, "; ".join(problems)

    def start(self, cfg: Any) -> None:
        """Create the folder and write the run's config (main process only); a fresh run's old metrics go."""
        self.path.mkdir(parents=True, exist_ok=True)
        write_config(cfg, self.config)
        if not cfg.resume and (self.metrics.exists() or self.metrics.is_symlink()):
            self.metrics.unlink()

    def write_json(self, path: Path, value: Any) -> None:
        atomic_write_text(path, json.dumps(value, indent=1))

    def check_data(self, cfg: Any, examples: list[dict], global_batch: int, *, write: bool) -> str | None:
        """Compare the training data with the data the run was started on (``--resume``).

        Raises ``ConfigError`` naming what changed, unless ``cfg.resume_allow_data_change``; then
        returns that description (to print) and records the new data. ``write``: main process only.
        """
        now = data_record(cfg, examples, global_batch)
        before = None
        if cfg.resume and self.data_fingerprint.is_file():
            try:
                before = json.loads(self.data_fingerprint.read_text(encoding="utf-8"))
            except (ValueError, OSError):
                before = None  # damaged: nothing to compare with; rewritten below
        change = None
        if isinstance(before, dict) and before.get("fingerprint") != now["fingerprint"]:
            change = describe_data_change(before, now)
            if not getattr(cfg, "resume_allow_data_change", False):
                raise ConfigError(
                    f"--resume: the training data changed since {self.path} was started: {change}. Resuming would "
                    "train on other data than the checkpoints saw (and change the data order); restore the data, "
                    "use another output_dir, or pass --resume-allow-data-change to go on with the new data"
                )
        if write and (before is None or change is not None):
            atomic_write_text(self.data_fingerprint, json.dumps(now, indent=1))
        return change


def data_record(cfg: Any, examples: list[dict], global_batch: int) -> dict[str, Any]:
    """What the training data is: a content hash, the row ids, and the source files' size and time."""
    from mmpo.data import DatasetSpec, examples_fingerprint

    ids = hashlib.sha256("\n".join(sorted(str(ex.get("id")) for ex in examples)).encode()).hexdigest()
    sources = {}
    for spec in cfg.dataset:
        local = Path(DatasetSpec.parse(spec).path).expanduser()
        if local.is_file():
            stat = local.stat()
            sources[spec] = {"bytes": stat.st_size, "modified_ns": stat.st_mtime_ns}
    return {
        "examples": len(examples),
        "steps_per_epoch": len(examples) // max(global_batch, 1),
        "fingerprint": examples_fingerprint(examples),
        "ids": ids,
        "sources": sources,
    }


def describe_data_change(before: dict[str, Any], now: dict[str, Any]) -> str:
    parts = []
    if before.get("examples") != now["examples"]:
        parts.append(
            f"{before.get('examples')} training examples then, {now['examples']} now "
            f"(steps per epoch {before.get('steps_per_epoch')} -> {now['steps_per_epoch']})"
        )
    if before.get("ids") == now["ids"]:
        parts.append(
            "the same row ids, but their tokens differ (the rows' text, the chat template or the tokenizer changed)"
        )
    else:
        parts.append("rows were added, removed or renumbered")
    old_sources = before.get("sources") if isinstance(before.get("sources"), dict) else {}
    for spec, stat in now["sources"].items():
        old = old_sources.get(spec)
        if isinstance(old, dict) and old.get("bytes") != stat["bytes"]:
            parts.append(f"dataset {spec!r} is {stat['bytes']} bytes, was {old.get('bytes')}")
        elif isinstance(old, dict) and old.get("modified_ns") != stat["modified_ns"]:
            parts.append(f"dataset {spec!r} was modified since")
    return "; ".join(parts)


def write_config(cfg: Any, path: Path) -> None:
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
