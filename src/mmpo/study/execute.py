"""Running the plan: one run under its lock, in this process or as worker subprocesses.

A run is trained with a checkpoint per epoch (``resume=True``: a killed run continues from its
last checkpoint), then every epoch checkpoint is evaluated by
:func:`mmpo.evaluation.checkpoint_eval.evaluate_checkpoint` into
``checkpoints/epoch-K/eval/results.json``; parts already there are never recomputed.

``run_sweep`` trains the ready runs in this process (``workers=1``) or as ``workers``
subprocesses ``mmpo sweep run-one`` (one per GPU when there are GPUs, else one thread each).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mmpo.config import ConfigError, resume_mismatches
from mmpo.evaluation.checkpoint_eval import EvalSettings
from mmpo.study.plan import EVENTS_FILE, PlannedRun, make_plan, write_plan
from mmpo.study.spec import SweepConfig
from mmpo.study.status import (
    baseline_dir,
    baseline_missing,
    epoch_checkpoints,
    eval_settings,
    missing_eval_parts,
    read_results,
    results_file,
    run_status,
    training_finished,
)

Say = Callable[[str], Any]


def log_event(sweep_dir: Path, run: str, event: str, **extra: Any) -> None:
    """Append to ``events.jsonl`` (one short line per write: safe from concurrent workers)."""
    line = json.dumps({"time": round(time.time(), 3), "run": run, "event": event, "pid": os.getpid(), **extra})
    with open(sweep_dir / EVENTS_FILE, "a") as handle:
        handle.write(line + "\n")


# --------------------------------------------------------------------------------------------
# One run (the unit a worker, a SLURM array task or a Ray task executes)


def _check_run_folder(run: PlannedRun) -> None:
    """The folder must hold this run, not one of another sweep with the same name: checked before
    its checkpoints are taken as finished work (the engine checks again when it resumes)."""
    saved = Path(run.config.output_dir) / "config.yaml"
    if not saved.is_file():
        return
    mismatched = resume_mismatches(yaml.safe_load(saved.read_text()), run.config)
    if mismatched:
        raise ConfigError(
            f"run folder {saved.parent} holds a run with other settings ({', '.join(mismatched)}); "
            "move it away or use another sweep output_dir"
        )


def execute_run(run: PlannedRun, sweep_dir: Path, say: Say = print) -> None:
    """Train (or resume) one run, then evaluate each of its checkpoints that lacks results."""
    if run.kind == "baseline":
        return _execute_baseline(run, sweep_dir, say)
    from mmpo.training import train

    run_dir = Path(run.config.output_dir)
    _check_run_folder(run)
    if not training_finished(run_dir):
        log_event(sweep_dir, run.name, "train_start")
        train(run.config)
        log_event(sweep_dir, run.name, "train_done")
    if not run.evaluate:
        return
    settings = eval_settings(run.eval_settings)
    for ckpt in epoch_checkpoints(run_dir):
        evaluate_missing(ckpt, settings, sweep_dir, run.name, say)


def evaluate_missing(ckpt: Path, settings: EvalSettings, sweep_dir: Path, run_name: str, say: Say) -> None:
    from mmpo.evaluation.checkpoint_eval import evaluate_checkpoint

    path = results_file(ckpt)
    results = read_results(path)
    missing = missing_eval_parts(results, settings)
    if not missing:
        return
    if path.is_file() and not results:
        path.unlink()  # cut short by a kill: start this checkpoint's results afresh
    if "winrate" in missing:
        _ensure_baseline_generations(settings, sweep_dir, say)
    only_missing = dataclasses.replace(
        settings,
        rewards="rewards" in missing,
        winrate="winrate" in missing,
        harness=settings.harness if "harness" in missing else (),
    )
    log_event(sweep_dir, run_name, "eval_start", checkpoint=ckpt.name, parts=missing)
    evaluate_checkpoint(ckpt, only_missing, say=say)
    log_event(sweep_dir, run_name, "eval_done", checkpoint=ckpt.name, parts=missing)


def _ensure_baseline_generations(settings: EvalSettings, sweep_dir: Path, say: Say) -> None:
    """Generate the baseline's answers once, under a file lock, before parallel runs need them."""
    from filelock import FileLock

    from mmpo.evaluation.checkpoint_eval import baseline_outputs
    from mmpo.evaluation.generate import load_instructions

    prompts = load_instructions(settings.prompts)
    if settings.limit:
        prompts = prompts[: settings.limit]
    (sweep_dir / "cache").mkdir(parents=True, exist_ok=True)
    with FileLock(str(sweep_dir / "cache" / "baseline_generations.lock")):
        baseline_outputs(settings, prompts, say)


def _execute_baseline(run: PlannedRun, sweep_dir: Path, say: Say) -> None:
    """The starting (SFT) model's retention, the sweep's zero point; and its generations, once."""
    from mmpo.evaluation.checkpoint_eval import evaluate_checkpoint

    settings = eval_settings(run.eval_settings)
    if settings.winrate:
        _ensure_baseline_generations(settings, sweep_dir, say)
    if baseline_missing(run, sweep_dir):
        log_event(sweep_dir, run.name, "eval_start", checkpoint="baseline", parts=["harness"])
        evaluate_checkpoint(
            run.model,
            dataclasses.replace(settings, rewards=False, winrate=False, output=str(baseline_dir(run, sweep_dir))),
            say=say,
        )
        log_event(sweep_dir, run.name, "eval_done", checkpoint="baseline", parts=["harness"])


class RunBusy(RuntimeError):
    """Another process holds the run's lock (e.g. a duplicate array task); this one leaves it alone."""


def run_locked(run: PlannedRun, sweep_dir: Path, say: Say = print) -> None:
    """:func:`execute_run` under a per-run file lock, so two processes never work on one run folder.

    The lock is an OS file lock: it is released when its holder dies, even by SIGKILL.
    """
    from filelock import FileLock, Timeout

    (sweep_dir / "locks").mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(sweep_dir / "locks" / f"{run.name}.lock"), timeout=0):
            execute_run(run, sweep_dir, say)
    except Timeout:
        raise RunBusy(f"run {run.name} is being worked on by another process") from None


# --------------------------------------------------------------------------------------------
# The sweep here: in this process, or as worker subprocesses (one per GPU)


@dataclass
class SweepOutcome:
    done: list[str]
    failed: dict[str, str]
    waiting: list[str]


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: the worker gets SIGKILL when the sweep process dies, so a killed sweep leaves no orphans."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker_env(slot: int, workers: int, gpus: int) -> dict[str, str]:
    env = dict(os.environ)
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
    else:  # share the cores instead of oversubscribing them
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    return env


def _run_subprocess(run: PlannedRun, sweep_dir: Path, slot: int, workers: int, gpus: int) -> str | None:
    """Run ``mmpo sweep run-one`` for ``run``; its output goes to ``logs/<run>.log``. None on success."""
    log_dir = sweep_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "mmpo.cli", "sweep", "run-one", str(sweep_dir), "--name", run.name]
    with open(log_dir / f"{run.name}.log", "a") as log:
        proc = subprocess.run(
            command,
            check=False,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_worker_env(slot, workers, gpus),
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
    if proc.returncode == 0:
        return None
    return f"exit code {proc.returncode}; see {log_dir / (run.name + '.log')}"


def _run_here(run: PlannedRun, sweep_dir: Path, say: Say) -> str | None:
    """Run in this process; the problem as text when it fails (one failing run must not stop the others)."""
    say(f"sweep: {run.name}")
    try:
        run_locked(run, sweep_dir, say)
    except RunBusy as err:
        return str(err)
    except Exception as err:  # noqa: BLE001 - reported and recorded; the other runs go on
        problem = f"{type(err).__name__}: {err}"
        log_event(sweep_dir, run.name, "failed", error=problem)
        say(f"sweep: {run.name} failed: {problem}")
        return problem
    return None


def run_sweep(
    sweep: SweepConfig, *, sweep_dir: str | Path | None = None, workers: int = 1, say: Say = print
) -> SweepOutcome:
    """Run everything not yet done: in this process (``workers=1``) or as ``workers`` subprocesses.

    The plan is made again whenever a run ends, so a finished tuning stage makes the next stage's
    runs ready at once. Entries run in plan order. Failed runs are
    reported, not retried in the same call; calling again retries them.
    """
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1 (got {workers})")
    sweep_dir = Path(sweep_dir or sweep.output_dir)
    failed: dict[str, str] = {}
    gpus = gpu_count() if workers > 1 else 0
    free_slots = list(range(workers))
    running: dict[Future, tuple[str, int]] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        while True:
            plan = make_plan(sweep, sweep_dir)
            write_plan(plan, sweep)
            busy = {name for name, _ in running.values()}
            todo = [
                r
                for r in plan.runs
                if r.name not in failed and r.name not in busy and run_status(r, sweep_dir) != "done"
            ]
            if workers <= 1:
                if not todo:
                    break
                problem = _run_here(todo[0], sweep_dir, say)
                if problem:
                    failed[todo[0].name] = problem
                continue
            for run in todo[: len(free_slots)]:
                slot = free_slots.pop(0)
                say(f"sweep: {run.name} (worker {slot}" + (f", GPU {slot % gpus})" if gpus else ")"))
                running[pool.submit(_run_subprocess, run, sweep_dir, slot, workers, gpus)] = (run.name, slot)
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                name, slot = running.pop(future)
                free_slots.append(slot)
                problem = future.result()
                if problem:
                    failed[name] = problem
                    say(f"sweep: {name} failed: {problem}")
    done = [r.name for r in plan.runs if run_status(r, sweep_dir) == "done"]
    return SweepOutcome(done, failed, plan.waiting)
