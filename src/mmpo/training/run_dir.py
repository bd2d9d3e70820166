"""The run folder: every file name in it, atomic writes, the metrics log and the resume check.

Layout of ``<output_dir>/``::

    config.yaml            the resolved config of the run (compared on --resume)
    metrics.jsonl          one JSON record per logging step / evaluation / event
    data_report.json       rows kept, truncated and dropped, per split
    summary.json           the run's headline numbers, written at the end
    checkpoints/<name>/    model/, state/, config.yaml, trainer_state.json, manifest.json
    checkpoints/<name>/eval/results.json    what ``mmpo eval`` measured on that checkpoint
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from mmpo.config import ConfigError, resume_mismatches, to_dict

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
DATA_REPORT_FILE = "data_report.json"
SUMMARY_FILE = "summary.json"
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


def atomic_write_text(path: Path, text: str) -> None:
    """Readers (and a resumed run after a kill) see the old content or the new one, never half."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


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
    if write and path.is_file():
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
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")


class RunDir:
    """One run's output folder (``output_dir``)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    config = property(lambda self: self.path / CONFIG_FILE)
    metrics = property(lambda self: self.path / METRICS_FILE)
    data_report = property(lambda self: self.path / DATA_REPORT_FILE)
    summary = property(lambda self: self.path / SUMMARY_FILE)
    checkpoints = property(lambda self: self.path / CHECKPOINTS_DIR)

    def check_start(self, cfg: Any) -> None:
        """Refuse a fresh start over an earlier run's checkpoints, and a resume with other settings."""
        from mmpo.training import checkpoint

        if cfg.resume and self.config.is_file():
            mismatched = resume_mismatches(yaml.safe_load(self.config.read_text()), cfg)
            if mismatched:
                raise ConfigError(
                    f"--resume: {self.path} was made with a different config; keys that differ: "
                    f"{', '.join(mismatched)} (use another output_dir, or the same settings)"
                )
        elif not cfg.resume and checkpoint.list_checkpoints(self.path):
            raise ConfigError(
                f"{self.path} already holds checkpoints: pass --resume to continue that run, "
                "or choose another --output-dir"
            )

    def start(self, cfg: Any) -> None:
        """Create the folder and write the run's config (main process only); a fresh run's old metrics go."""
        self.path.mkdir(parents=True, exist_ok=True)
        write_config(cfg, self.config)
        if not cfg.resume and self.metrics.exists():
            self.metrics.unlink()

    def write_json(self, path: Path, value: Any) -> None:
        atomic_write_text(path, json.dumps(value, indent=1))


def write_config(cfg: Any, path: Path) -> None:
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
