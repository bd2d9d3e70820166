"""Training: the loop (``loop``), its two recipes (``preference``, ``sft``), the run folder
(``run_dir``, locked by ``run_lock``), checkpoints (``checkpoint``), the reference log-prob cache
(``refcache``), stopping on a signal (``interrupt``) and checks before any data is read (``preflight``)."""

from mmpo.training.interrupt import TrainingInterrupted
from mmpo.training.loop import RunResult, TrainingError
from mmpo.training.preference import train
from mmpo.training.sft import sft

__all__ = ["RunResult", "TrainingError", "TrainingInterrupted", "sft", "train"]
