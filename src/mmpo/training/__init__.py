"""Training: the loop (``loop``), its two recipes (``preference``, ``sft``), the run folder
(``run_dir``), checkpoints (``checkpoint``) and the reference log-prob cache (``refcache``)."""

from mmpo.training.loop import RunResult, TrainingError
from mmpo.training.preference import train
from mmpo.training.sft import sft

__all__ = ["RunResult", "TrainingError", "sft", "train"]
