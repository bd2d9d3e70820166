"""Ctrl-C and ``SIGTERM`` during training: finish the current step, write a checkpoint, stop.

While :class:`StopOnSignal` is active, the first ``SIGINT``/``SIGTERM`` only sets a flag; the loop
looks at it after each optimizer step, writes a checkpoint and raises :class:`TrainingInterrupted`,
whose ``exit_code`` is the shell's convention (130 for SIGINT, 143 for SIGTERM). A second signal
stops at once, without a checkpoint (the last one written stays valid). Schedulers (SLURM,
Kubernetes) send ``SIGTERM`` and wait a grace period, so a step plus a checkpoint must fit in it.
"""

from __future__ import annotations

import shlex
import signal
import threading
from pathlib import Path
from types import FrameType

import torch

HANDLED = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on a signal after writing a checkpoint; ``str()`` says how to resume.

    A ``KeyboardInterrupt`` so that ``except Exception`` in user code does not swallow it.
    """

    def __init__(self, message: str, signum: int, checkpoint: Path | None):
        super().__init__(message)
        self.signum, self.checkpoint = signum, checkpoint
        self.exit_code = 128 + signum

    def __str__(self) -> str:
        return str(self.args[0])


class StopOnSignal:
    """Context manager: records the first SIGINT/SIGTERM instead of dying mid-step."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # signal handlers only work there
            for signum in HANDLED:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # second signal: stop now
            self.__exit__()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self.signum = signum
        print(
            f"\n{signal.Signals(signum).name} received: finishing the current step and writing a checkpoint "
            "(send it again to stop at once)",
            flush=True,
        )

    def requested(self, accelerator) -> int | None:
        """The signal to stop on, agreed by every process (any one that got one stops them all)."""
        signum = self.signum or 0
        if accelerator.num_processes > 1:
            flag = torch.tensor(float(signum), device=accelerator.device)
            signum = int(accelerator.reduce(flag, "max"))
        return signum or None


def resume_command(cfg, output_dir: str | Path, num_processes: int) -> str:
    """A command that resumes the run: its own ``config.yaml`` holds every resolved setting."""
    from mmpo.config import SFTConfig

    command = "sft" if isinstance(cfg, SFTConfig) else "train"
    text = f"mmpo {command} --config {shlex.quote(str(Path(output_dir) / 'config.yaml'))} --resume"
    if num_processes > 1:
        text += f"  (under the same launcher, with {num_processes} processes)"
    return text
