"""Interruptions done for real: SIGINT/SIGTERM mid-training, two runs into one folder, a run killed
during start-up, a full disk and a read-only folder. Training runs in real processes under the
CLI's error handler (``train_worker`` with ``guarded``), so exit codes and output are the user's."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from training.attempts import WORKER, Attempt, assert_bitwise_equal, run_config, train_records, weights, write_job

from helpers import REPO
from mmpo.training import checkpoint


def logged_step(run: Path, step: int):
    return lambda: any(r["step"] >= step for r in train_records(run))


def test_sigterm_then_sigint_write_a_checkpoint_print_the_resume_command_and_exit_143_then_130(
    tmp_path, tiny_model_dir
):
    # 2 epochs x 4 steps, checkpoints only at the epoch ends, a metrics line every 3 steps.
    values = run_config(tmp_path, tiny_model_dir, epochs=2, logging_steps=3, eval_dataset=[])
    reference = tmp_path / "reference"
    Attempt(
        write_job(tmp_path / "reference.json", dict(values, output_dir=str(reference))), tmp_path / "reference.log"
    ).finish()
    run = Path(values["output_dir"])
    resume_command = f"resume with: mmpo train --config {run / 'config.yaml'} --resume"

    first = Attempt(write_job(tmp_path / "job.json", values), tmp_path / "first.log")
    first.signal_when(logged_step(run, 3), signal.SIGTERM)
    assert first.exit_code() == 128 + signal.SIGTERM == 143, first.output()[-3000:]
    out = first.output()
    assert "SIGTERM received: finishing the current step and writing a checkpoint" in out
    assert resume_command in out and "Traceback" not in out
    stopped = int(out.split("stopped by SIGTERM after step ")[1].split(";")[0])
    assert stopped in (3, 4)  # the step running when the signal came (never one more)
    saved = checkpoint.latest_valid(run)
    assert checkpoint.read_trainer_state(saved)["global_step"] == stopped

    second = Attempt(write_job(tmp_path / "resume.json", dict(values, resume=True)), tmp_path / "second.log")
    second.signal_when(logged_step(run, 6), signal.SIGINT)
    assert second.exit_code() == 128 + signal.SIGINT == 130, second.output()[-3000:]
    assert f"resumed from {saved}" in second.output() and resume_command in second.output()

    # The printed command, run as printed (through the real CLI), finishes the run.
    command = resume_command.removeprefix("resume with: mmpo ").split()
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "mmpo.cli", *command], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("epoch-1", "epoch-2"):
        assert_bitwise_equal(weights(reference, name), weights(run, name))
    got, want = train_records(run), train_records(reference)
    assert [r["step"] for r in got] == [r["step"] for r in want] == [3, 4, 6, 8]
    for a, b in zip(got, want):
        assert (a["loss"], a["grad_norm"], a["learning_rate"]) == (b["loss"], b["grad_norm"], b["learning_rate"])


def lock_holder(run: Path) -> int | None:
    try:
        return json.loads((run / ".lock").read_text()).get("pid")
    except (OSError, ValueError):
        return None


def test_a_second_run_into_a_held_folder_fails_fast_naming_the_holder_and_a_dead_holder_is_taken_over(
    tmp_path, tiny_model_dir
):
    values = run_config(tmp_path, tiny_model_dir, epochs=2, eval_dataset=[])
    run = Path(values["output_dir"])
    job = write_job(tmp_path / "job.json", values)
    holder = Attempt(job, tmp_path / "holder.log")
    holder.wait_until(lambda: lock_holder(run) == holder.proc.pid)

    intruder = Attempt(job, tmp_path / "intruder.log")
    assert intruder.exit_code(timeout=60) == 2
    out = intruder.output()
    assert f"error: {run} is in use by another run (process {holder.proc.pid}" in out, out
    assert "Traceback" not in out and "train data" not in out  # refused before loading any data
    holder.finish()
    assert [r["step"] for r in train_records(run)] == list(range(1, 9))  # the holder's run, untouched

    # A run killed during start-up leaves a stale lock (and maybe a half-started folder): taken over.
    resume = write_job(tmp_path / "resume.json", dict(values, resume=True))
    killed = Attempt(resume, tmp_path / "killed.log")
    assert killed.kill_when(lambda: lock_holder(run) == killed.proc.pid)
    after = Attempt(resume, tmp_path / "after.log")
    out = after.finish()
    assert f"taking over {run / '.lock'} from process {killed.proc.pid}, which is no longer running" in out
    assert "resumed from" in out
    assert [r["step"] for r in train_records(run)] == list(range(1, 9))


# --------------------------------------------------------------------------------------------
# A full disk, a read-only folder: real file systems, mounted in a private mount namespace


def namespace_prefix(probe_dir: Path) -> list[str]:
    """A command prefix that runs its command in a private mount namespace where it may mount a
    tmpfs (root, or user namespaces); the test is skipped, with the reason, where neither works."""
    probe_dir.mkdir(exist_ok=True)
    tried = []
    for prefix in (["unshare", "--mount"], ["unshare", "--mount", "--map-root-user"]):
        if shutil.which(prefix[0]) is None:
            tried.append(f"{prefix[0]} not installed")
            continue
        probe = subprocess.run(
            [*prefix, "sh", "-c", f"mount -t tmpfs -o size=64k none {probe_dir}"], capture_output=True, text=True
        )
        if probe.returncode == 0:
            return prefix
        tried.append(f"{' '.join(prefix)}: {probe.stderr.strip()[:100]}")
    pytest.skip(f"cannot mount a small file system here (needs root or user namespaces): {'; '.join(tried)}")


def run_on_small_filesystem(tmp_path: Path, values: dict, mount: str) -> tuple[int, str, str]:
    """Train with ``output_dir`` under a tmpfs mounted with ``mount`` options; returns the exit code,
    the output, and what the file system held afterwards (``ls`` and ``df`` inside the namespace)."""
    prefix = namespace_prefix(tmp_path / "probe")
    small = tmp_path / "small"
    small.mkdir()
    job = write_job(tmp_path / "job.json", dict(values, output_dir=str(small / "run")))
    after = tmp_path / "after.txt"
    script = (
        f"mount -t tmpfs -o {mount} none {small} || exit 99\n"
        f"{sys.executable} {WORKER} {job}\ncode=$?\n"
        f"(ls -A {small}/run {small}/run/checkpoints; df -k {small}) > {after} 2>&1\nexit $code\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    done = subprocess.run([*prefix, "sh", "-c", script], capture_output=True, text=True, env=env, timeout=600)
    return done.returncode, done.stdout + done.stderr, after.read_text() if after.exists() else ""


def test_a_full_disk_is_one_clear_error_and_the_partial_checkpoint_is_removed(tmp_path, tiny_model_dir):
    # 256 KiB: room for config, data report and metrics, not for a checkpoint (~0.5 MB).
    values = run_config(tmp_path, tiny_model_dir, max_steps=1, eval_dataset=[])
    code, out, after = run_on_small_filesystem(tmp_path, values, "size=256k")
    assert code == 2, out[-3000:]
    assert "error: no space left on the device while writing checkpoint step-0000001" in out, out[-3000:]
    assert "hint: free some space, or choose an --output-dir" in out and "Traceback" not in out
    assert ".tmp-step" not in after and "metrics.jsonl" in after  # the staging folder is gone
    used_kib = int(after.strip().splitlines()[-1].split()[2])
    assert used_kib < 64, after  # the space is free again


def test_a_read_only_output_folder_is_one_clear_error(tmp_path, tiny_model_dir):
    values = run_config(tmp_path, tiny_model_dir, max_steps=1, eval_dataset=[])
    if os.geteuid() != 0:  # permissions stop a normal user; root needs a read-only mount
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        job = write_job(tmp_path / "job.json", dict(values, output_dir=str(locked / "run")))
        env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
        done = subprocess.run([sys.executable, str(WORKER), str(job)], capture_output=True, text=True, env=env)
        code, out = done.returncode, done.stdout + done.stderr
        expected = f"error: permission denied ({locked / 'run'})"
    else:
        code, out, _ = run_on_small_filesystem(tmp_path, values, "ro,size=64k")
        expected = f"error: read-only file system ({tmp_path / 'small' / 'run'})"
    assert code == 2, out[-3000:]
    assert expected in out and "hint: choose an --output-dir" in out and "Traceback" not in out
