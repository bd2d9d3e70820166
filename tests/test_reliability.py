"""Reliability: SIGKILL and resume, exact mid-epoch resume, damaged checkpoints, the non-finite guard,
and the security defaults. Every test does the bad thing for real (docs/reliability.md)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
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


class Attempt:
    """One training process of the kill/resume test, with its output in a log file."""

    def __init__(self, job: Path, log: Path):
        self.log = log
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.handle = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, str(WORKER), str(job)], stdout=self.handle,
                                     stderr=subprocess.STDOUT, env=env)

    def kill_when(self, condition, *, delay: float = 0.0, timeout: float = 120) -> bool:
        """SIGKILL once ``condition()`` holds (polled every millisecond); False if the process ended first."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                return False
            assert time.monotonic() < deadline, f"timed out; log:\n{self.log.read_text()[-3000:]}"
            time.sleep(0.001)
        time.sleep(delay)
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.handle.close()
        return True

    def finish(self, timeout: float = 180) -> str:
        self.proc.wait(timeout=timeout)
        self.handle.close()
        output = self.log.read_text()
        assert self.proc.returncode == 0, output[-3000:]
        return output


def staging_folders(run: Path) -> list[str]:
    root = checkpoint.checkpoints_dir(run)
    try:
        return [name for name in os.listdir(root) if name.startswith(".tmp-")]
    except FileNotFoundError:
        return []


def test_sigkill_at_random_points_then_resume_is_bitwise_identical(tmp_path, tiny_model_dir):
    seed = int(os.environ.get("MMPO_KILL_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    note = f"(MMPO_KILL_SEED={seed} reproduces the kill points)"
    # 3 epochs x 4 steps, a step checkpoint after every step, only the newest 2 step checkpoints kept.
    values = run_config(tmp_path, tiny_model_dir, epochs=3, save_steps=1, save_total_limit=2)

    reference = dict(values, output_dir=str(tmp_path / "reference"))
    with deterministic_torch():
        train(make_config(reference))
    reference_run = Path(reference["output_dir"])

    run = Path(values["output_dir"])
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"runs": [values]}))
    resume_job = tmp_path / "resume.json"
    resume_job.write_text(json.dumps({"runs": [dict(values, resume=True)]}))

    # 1. Killed while writing its n-th checkpoint.
    writes_to_skip = rng.randrange(3)
    seen = []

    def nth_checkpoint_write():
        staged = staging_folders(run)
        if staged and staged[0] not in seen:
            seen.append(staged[0])
        return len(seen) > writes_to_skip and bool(staged)

    first = Attempt(job, tmp_path / "attempt1.log")
    assert first.kill_when(nth_checkpoint_write), f"run ended before the kill {note}"
    assert staging_folders(run), f"the kill did not land inside a checkpoint write {note}"
    assert_run_folder_usable(run)

    # 2. Resumed (removes the staging folder), then killed at a random moment of training.
    second = Attempt(resume_job, tmp_path / "attempt2.log")
    second.kill_when(lambda: "resumed from" in second.log.read_text(), delay=rng.uniform(0.0, 0.4))
    assert "removed leftover" in second.log.read_text(), note
    assert_run_folder_usable(run)

    # 3. Resumed again, killed during the checkpoint write after the next one.
    third = Attempt(resume_job, tmp_path / "attempt3.log")
    start = set()

    def second_write_after_resume():
        if "resumed from" not in third.log.read_text():
            return False
        staged = staging_folders(run)
        start.update(staged)
        return len(start) >= 2 and bool(staged)

    third.kill_when(second_write_after_resume)
    assert_run_folder_usable(run)

    # 4. Resumed to the end.
    output = Attempt(resume_job, tmp_path / "attempt4.log").finish()
    assert "resumed from" in output, note

    assert_bitwise_equal(weights(reference_run, "epoch-3"), weights(run, "epoch-3"))
    for name in ("epoch-1", "epoch-2"):
        assert_bitwise_equal(weights(reference_run, name), weights(run, name))
    assert not [p.name for p in checkpoint.checkpoints_dir(run).iterdir() if p.name.startswith(".")], note
    names = sorted(p.name for p in checkpoint.list_checkpoints(run))
    assert names == ["epoch-1", "epoch-2", "epoch-3", "step-0000011"], names  # save_total_limit=2 held
    # Every step logged exactly once, with the uninterrupted run's numbers.
    got, want = train_records(run), train_records(reference_run)
    assert [r["step"] for r in got] == list(range(1, 13)), note
    for a, b in zip(got, want):
        for key in ("loss", "grad_norm", "learning_rate", "rewards/margins"):
            assert a[key] == b[key], (a["step"], key, note)
    evals = [r["step"] for r in checkpoint.read_metrics(run / "metrics.jsonl") if "eval_loss" in r]
    assert evals == [0, 4, 8, 12], note
