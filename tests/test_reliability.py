"""Reliability: SIGKILL and resume, exact mid-epoch resume, damaged checkpoints, the non-finite guard,
and the security defaults. Every test does the bad thing for real (docs/reliability.md)."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmpo import checkpoint
from mmpo.config import SFTConfig, TrainConfig
from mmpo.engine import TrainingError, sft, train

WORKER = Path(__file__).parent / "scripts" / "train_worker.py"
WORDS = ["banop", "zorbat", "mipo", "tuvalak", "fox", "dog", "quick", "lazy", "brown", "hello"]


def write_prefs(path: Path, count: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for _ in range(count):
            word = rng.choice(WORDS) + rng.choice(WORDS)
            row = {"prompt": f"Repeat the word {word}.", "chosen": word,
                   "rejected": rng.choice(["I am not sure about that, sorry.", f"{word} {word} {word}"])}
            handle.write(json.dumps(row) + "\n")
    return path


def run_config(tmp_path: Path, model_dir: Path, **overrides) -> dict:
    """Plain values of a small MMPO run: 32 pairs, global batch 8 (4 x accumulation 2), 4 steps per epoch."""
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    train_file, eval_file = data / "train.jsonl", data / "eval.jsonl"
    if not train_file.exists():
        write_prefs(train_file, 32)
        write_prefs(eval_file, 8, seed=1)
    values = dict(model=str(model_dir), dataset=[str(train_file)], eval_dataset=[str(eval_file)],
                  output_dir=str(tmp_path / "run"), per_device_batch_size=4, gradient_accumulation_steps=2,
                  epochs=1, learning_rate=1e-3, progress=False, cache_dir=str(tmp_path / "cache"),
                  logging_steps=1)
    values.update(overrides)
    return values


def make_config(values: dict) -> TrainConfig:
    return TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


@contextmanager
def deterministic_torch():
    """The worker script's settings, in this process: one thread, deterministic algorithms."""
    threads, strict = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(strict)


def weights(run: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / name / "model" / "model.safetensors")


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def train_records(run: Path) -> list[dict]:
    return [r for r in checkpoint.read_metrics(run / "metrics.jsonl") if "loss" in r]


def assert_run_folder_usable(run: Path) -> None:
    """What a resume needs: readable metrics, and only complete checkpoints or dot-folders."""
    checkpoint.read_metrics(run / "metrics.jsonl")
    for path in checkpoint.list_checkpoints(run):
        assert checkpoint.verify(path) is None, f"{path} is a visible but damaged checkpoint"


# --------------------------------------------------------------------------------------------
# SIGKILL at random points, then --resume


def forkserver():
    """Training processes forked from a server that imported torch and mmpo once: each attempt is a
    real, separate process (killed with a real SIGKILL) that starts in milliseconds."""
    context = multiprocessing.get_context("forkserver")
    if str(WORKER.parent) not in sys.path:
        sys.path.insert(0, str(WORKER.parent))
    context.set_forkserver_preload(["train_worker", "mmpo.engine"])
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

    def finish(self, timeout: float = 180) -> str:
        self.proc.join(timeout=timeout)
        assert self.proc.exitcode == 0, self.output()[-3000:]
        return self.output()


def staging_folders(run: Path) -> list[str]:
    root = checkpoint.checkpoints_dir(run)
    try:
        return [name for name in os.listdir(root) if name.startswith(".tmp-")]
    except FileNotFoundError:
        return []


def test_sigkill_at_random_points_then_resume_is_bitwise_identical(tmp_path, tiny_model_dir):
    seed = int(os.environ.get("MMPO_KILL_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    note = f"(MMPO_KILL_SEED={seed} reproduces these kill points)"
    # 3 epochs x 4 steps, a step checkpoint after every step, only the newest 2 step checkpoints kept.
    values = run_config(tmp_path, tiny_model_dir, epochs=3, save_steps=1, save_total_limit=2)

    reference_run = tmp_path / "reference"
    reference_job = tmp_path / "reference.json"
    reference_job.write_text(json.dumps({"runs": [dict(values, output_dir=str(reference_run))]}))
    Attempt(reference_job, tmp_path / "reference.log").finish()

    run = Path(values["output_dir"])
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"runs": [values]}))
    resume_job = tmp_path / "resume.json"
    resume_job.write_text(json.dumps({"runs": [dict(values, resume=True)]}))

    # 1. Killed while writing the checkpoint of step n (n = 1: before any checkpoint exists).
    n = rng.randint(1, 3)
    first = Attempt(job, tmp_path / "attempt1.log")
    assert first.kill_when(lambda: f".tmp-step-{n:07d}" in staging_folders(run)), note
    assert_run_folder_usable(run)

    # 2. Resumed (removes the staging folder), killed at a random moment after step t2 was logged:
    #    inside a step, a metrics write or a checkpoint write.
    t2 = rng.randint(n + 1, 7)
    second = Attempt(resume_job, tmp_path / "attempt2.log")
    assert second.kill_when(lambda: any(r["step"] >= t2 for r in train_records(run)),
                            delay=rng.uniform(0.0, 0.03)), note
    assert f"removed leftover {run / 'checkpoints' / f'.tmp-step-{n:07d}'}" in second.output(), note
    assert_run_folder_usable(run)

    # 3. Resumed again, killed while writing the checkpoint of a later step t3.
    t3 = rng.randint(t2 + 3, 11)
    staged = f".tmp-epoch-{t3 // 4}" if t3 % 4 == 0 else f".tmp-step-{t3:07d}"
    third = Attempt(resume_job, tmp_path / "attempt3.log")
    assert third.kill_when(lambda: staged in staging_folders(run)), note
    assert "resumed from" in third.output(), note
    assert_run_folder_usable(run)

    # 4. Resumed to the end.
    output = Attempt(resume_job, tmp_path / "attempt4.log").finish()
    assert "resumed from" in output, note

    assert_bitwise_equal(weights(reference_run, "epoch-3"), weights(run, "epoch-3"))
    for name in ("epoch-1", "epoch-2"):
        assert_bitwise_equal(weights(reference_run, name), weights(run, name))
    assert not [p.name for p in checkpoint.checkpoints_dir(run).iterdir() if p.name.startswith(".")], note
    names = sorted(p.name for p in checkpoint.list_checkpoints(run))
    assert names == ["epoch-1", "epoch-2", "epoch-3", "step-0000010", "step-0000011"], names  # save_total_limit=2
    # Every step logged exactly once, with the uninterrupted run's numbers.
    got, want = train_records(run), train_records(reference_run)
    assert [r["step"] for r in got] == list(range(1, 13)), note
    for a, b in zip(got, want):
        for key in ("loss", "grad_norm", "learning_rate", "rewards/margins"):
            assert a[key] == b[key], (a["step"], key, note)
    evals = [r["step"] for r in checkpoint.read_metrics(run / "metrics.jsonl") if "eval_loss" in r]
    assert evals == [0, 4, 8, 12], note
