"""One table of defaults: per-objective hyper-parameters and where the bundled world lives.

The objective functions' own defaults (``mmpo.objectives.OBJECTIVE_DEFAULTS``) are the paper's;
the learning rates here are those the embedded world was calibrated with.
"""

from __future__ import annotations

from pathlib import Path

from mmpo.objectives import OBJECTIVE_DEFAULTS as LOSS_DEFAULTS

#: Learning rates the embedded world was calibrated with (presets carry the paper's Table 3 values).
WORLD_LEARNING_RATES = {"mmpo": 5e-4, "dpo": 5e-4, "simpo": 1e-4, "sft": 5e-4}
SFT_LEARNING_RATE = 1e-3

#: Every objective's defaults: its loss hyper-parameters plus the learning rate.
OBJECTIVE_DEFAULTS: dict[str, dict[str, float]] = {
    name: {**values, "learning_rate": WORLD_LEARNING_RATES[name]} for name, values in LOSS_DEFAULTS.items()
}

LORA_ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

#: The embedded offline world shipped inside the package (``mmpo world build`` makes it).
WORLD_DIR = Path(__file__).resolve().parent.parent / "assets" / "world"


def bundled_path(relative: str) -> Path:
    """Path of a shipped world artifact, e.g. ``bundled_path("sft_model")``."""
    return WORLD_DIR / relative


#: Experiment trackers Accelerate integrates (``report_to``), plus ``all`` and ``none``.
TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio", "comet_ml", "aim", "clearml", "dvclive", "swanlab")

#: What ``variant="authors-code"`` changes (the authors' May-2025 trainer): an entropy bonus whose
#: coefficient is beta, and their default eps_w.
AUTHORS_CODE_VARIANT = {"entropy_coef": "beta", "chosen_reward": 1.0}
