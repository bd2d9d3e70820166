"""Shared by the reliability tests: a small run's config, and training attempts as real processes
(forked from a server that imported torch once) that a test kills or signals."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from helpers import TESTS_DIR, write_prefs
from mmpo.config import TrainConfig
from mmpo.training import run_dir

WORKER = TESTS_DIR / "training" / "train_worker.py"


def run_config(tmp_path: Path, model_dir: Path, **overrides) -> dict:
    """Plain values of a small MMPO run: 32 pairs, global batch 8 (4 x accumulation 2), 4 steps per epoch."""
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    train_file, eval_file = data / "train.jsonl", data / "eval.jsonl"
    if not train_file.exists():
        write_prefs(train_file, 32)
        write_prefs(eval_file, 8, seed=1)
    values = dict(
        model=str(model_dir),
        dataset=[str(train_file)],
        eval_dataset=[str(eval_file)],
        output_dir=str(tmp_path / "run"),
        per_device_batch_size=4,
        gradient_accumulation_steps=2,
        epochs=1,
        learning_rate=1e-3,
        progress=False,
        cache_dir=str(tmp_path / "cache"),
        logging_steps=1,
    )
    values.update(overrides)
    return values


def make_config(values: dict) -> TrainConfig:
    return TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def weights(run: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / name / "model" / "model.safetensors")


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def train_records(run: Path) -> list[dict]:
    return [r for r in run_dir.read_metrics(run / "metrics.jsonl") if "loss" in r]


# --------------------------------------------------------------------------------------------
# Training attempts as real processes


def forkserver():
    """Training processes forked from a server that imported torch and mmpo once: each attempt is a
    real, separate process (killed with a real SIGKILL) that starts in milliseconds."""
    context = multiprocessing.get_context("forkserver")
    if str(WORKER.parent) not in sys.path:
        sys.path.insert(0, str(WORKER.parent))
    context.set_forkserver_preload(["train_worker", "mmpo.training", "mmpo.errors"])
    return context


class Attempt:
    """One training process of the kill/resume test, its output in a log file."""

    def __init__(self, job: Path, log: Path):
        context = forkserver()
        import train_worker

        self.log = log
        log.touch()
        self.proc = context.Process(target=train_worker.run_job, args=(str(job), str(log)))
        self.proc.start()

    def output(self) -> str:
        return self.log.read_text()

    def kill_when(self, condition, *, delay: float = 0.0, timeout: float = 120) -> bool:
        """SIGKILL once ``condition()`` holds (polled every millisecond); False if the process ended first."""
        deadline = time.monotonic() + timeout
        while not condition():
            if not self.proc.is_alive():
                return False
            assert time.monotonic() < deadline, f"timed out; log:\n{self.output()[-3000:]}"
            time.sleep(0.001)
        time.sleep(delay)
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join()
        assert self.proc.exitcode == -signal.SIGKILL
        return True

    def wait_until(self, condition, *, timeout: float = 120) -> None:
        """Return once ``condition()`` holds (polled every millisecond) while the process still runs."""
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.proc.is_alive(), f"ended before that; log:\n{self.output()[-3000:]}"
            assert time.monotonic() < deadline, f"timed out; log:\n{self.output()[-3000:]}"
            time.sleep(0.001)

    def signal_when(self, condition, signum: int, *, timeout: float = 120) -> None:
        """Send ``signum`` once ``condition()`` holds (the process must still be running then)."""
        self.wait_until(condition, timeout=timeout)
        os.kill(self.proc.pid, signum)

    def exit_code(self, timeout: float = 180) -> int:
        self.proc.join(timeout=timeout)
        assert self.proc.exitcode is not None, f"still running; log:\n{self.output()[-3000:]}"
        return self.proc.exitcode

    def finish(self, timeout: float = 180) -> str:
        assert self.exit_code(timeout) == 0, self.output()[-3000:]
        return self.output()


def write_job(path: Path, *runs: dict, guarded: bool = True) -> Path:
    """A job file for ``train_worker``; ``guarded``: under the CLI's error handler (``mmpo.errors``)."""
    path.write_text(json.dumps({"runs": list(runs), "guarded": guarded}))
    return path
