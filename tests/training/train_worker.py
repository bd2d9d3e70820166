"""Run ``mmpo.training.train`` from a JSON job file, deterministically, for the subprocess tests.

    python tests/scripts/train_worker.py JOB.json            # one process
    torchrun --nproc_per_node 2 tests/scripts/train_worker.py JOB.json

or as the target of a ``multiprocessing`` forkserver process (``run_job(job, log)``), which
starts a fresh training process in milliseconds instead of re-importing torch each time.

JOB.json: ``{"runs": [TrainConfig fields, ...], "report_dir": "...", "watch": ["dir", ...], "guarded": bool}``.
With ``guarded``, the runs go through the CLI's error handler (``mmpo.errors.run_command``) and
the process exits with its exit code (2 for a known failure, 130/143 on SIGINT/SIGTERM).
Each run's config is given as plain values (lists for tuple fields). Settings that make CPU
training bitwise reproducible are set first (one thread, deterministic algorithms). With
``report_dir``, each rank writes ``rank<k>.json`` there: the world size Accelerate saw and every
file write, rename or deletion this rank made under the ``watch`` folders (Python-level writes
through an audit hook, plus ``torch.save`` calls), so a test can check that only rank 0 writes.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
MUTATING_EVENTS = {"os.rename", "os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree", "os.truncate"}


def deterministic() -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


class WriteRecorder:
    """Every path under ``roots`` this process opens for writing, renames, creates or deletes."""

    def __init__(self, roots: list[str]):
        self.roots = [os.path.realpath(r) for r in roots]
        self.paths: list[str] = []

    def _note(self, path) -> None:
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if not isinstance(path, str | os.PathLike):
            return
        full = os.path.realpath(os.fspath(path))
        if any(full == root or full.startswith(root + os.sep) for root in self.roots):
            self.paths.append(full)

    def audit(self, event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                mode is None and isinstance(flags, int) and flags & WRITE_FLAGS
            )
            if writing:
                self._note(path)
        elif event in MUTATING_EVENTS and args:
            self._note(args[0])

    def install(self) -> None:
        sys.addaudithook(self.audit)
        real_save = torch.save

        def recording_save(obj, f, *args, **kwargs):  # torch.save writes from C++, unseen by the hook
            if isinstance(f, str | os.PathLike):
                self._note(f)
            return real_save(obj, f, *args, **kwargs)

        torch.save = recording_save


def run_job(job_path: str, log_path: str | None = None) -> None:
    """Run a job in this process, its output going to ``log_path`` (line-buffered) when given."""
    if log_path is not None:
        log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(log, 1)
        os.dup2(log, 2)
        sys.stdout.reconfigure(line_buffering=True)
        sys.stderr.reconfigure(line_buffering=True)
    main(job_path)


def main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    if job.get("guarded"):
        from mmpo.errors import run_command

        sys.exit(run_command(lambda argv: run_all(job) or 0, []))
    run_all(job)


def run_all(job: dict) -> None:
    deterministic()
    rank = int(os.environ.get("RANK", "0"))
    recorder = WriteRecorder(job.get("watch", []))
    if job.get("report_dir") and rank != 0:
        recorder.install()

    from accelerate import PartialState

    from mmpo.config import TrainConfig
    from mmpo.training import train

    results = []
    world_sizes = []
    real_destroy = PartialState.destroy_process_group
    for index, values in enumerate(job["runs"]):
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        # train() ends with Accelerator.end_training(), which destroys the process group (and gloo
        # cannot form a new one in the same processes): keep it alive until the last run.
        last = index == len(job["runs"]) - 1
        PartialState.destroy_process_group = real_destroy if last else (lambda self, group=None: None)
        result = train(TrainConfig(**values))
        results.append({"output_dir": str(result.output_dir), "global_step": result.global_step})
        world_sizes.append(PartialState().num_processes)  # the group the engine's Accelerator formed
    if job.get("report_dir"):
        world_size = min(world_sizes)
        report = {"rank": rank, "world_size": world_size, "writes": sorted(set(recorder.paths)), "results": results}
        out = Path(job["report_dir"]) / f"rank{rank}.json"
        out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
