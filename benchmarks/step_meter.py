"""Step times and memory of a training run, measured the same way for any trainer.

torch calls a global hook after every optimizer step (``register_optimizer_step_post_hook``),
whichever trainer drives the optimizer (TRL through HF Trainer and Accelerate, our engine through
Accelerate), so both sides of the comparison are timed at the same point: right after
``optimizer.step()``, with the GPU's queue drained first. On CUDA the meter also takes the memory
allocated after the first optimizer step (weights, gradients and optimizer state: what every
method pays) and the peak allocated over the later steps; their difference is the memory the
method itself needs for a step (activations and temporaries).
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field

import torch


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class StepMeter:
    device: str = "cpu"
    ends: list[tuple[float, float]] = field(default_factory=list)  # (wall, process CPU) time at each step end
    peaks: list[int] = field(default_factory=list)  # peak RSS (CPU) or peak CUDA allocation since step 1 (CUDA)
    after_first_step: int | None = None  # CUDA bytes allocated right after the first optimizer step
    _handle: object = None

    def __enter__(self) -> StepMeter:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self._handle = register_optimizer_step_post_hook(self._step_ended)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def _step_ended(self, optimizer, args, kwargs) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.ends.append((time.perf_counter(), time.process_time()))
        if self.device != "cuda":
            self.peaks.append(peak_rss())
            return
        if self.after_first_step is None:
            self.after_first_step = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        self.peaks.append(torch.cuda.max_memory_allocated())
