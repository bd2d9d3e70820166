"""The paper's training settings (SPEC.md "Training protocol", Table 3) as presets.

A preset fills every setting that is still at its default; whatever you set yourself (in YAML or
on the command line) wins. Learning rate and SimPO's gamma depend on the objective.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from mmpo.config import ConfigError, TrainConfig

PAPER_TRAIN_DATA = ("HuggingFaceH4/orca_dpo_pairs:train_prefs", "HuggingFaceH4/ultrafeedback_binarized:train_prefs")
PAPER_EVAL_DATA = ("HuggingFaceH4/orca_dpo_pairs:test_prefs", "HuggingFaceH4/ultrafeedback_binarized:test_prefs")

_COMMON: dict[str, Any] = {
    "dataset": PAPER_TRAIN_DATA,
    "eval_dataset": PAPER_EVAL_DATA,
    "epochs": 5,
    # Global batch 128 = 2 per device x 16 accumulation x 4 GPUs (adjust accumulation to your GPUs).
    "per_device_batch_size": 2,
    "gradient_accumulation_steps": 16,
    "max_prompt_length": 1800,
    "max_completion_length": 512,
    "warmup_ratio": 0.1,
    "dtype": "bfloat16",
    "logging_steps": 10,
}

PRESETS: dict[str, dict[str, Any]] = {
    "smollm2-135m": {
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "learning_rate": {"mmpo": 5e-4, "dpo": 5e-4, "simpo": 1e-4},
        "gamma": {"simpo": 1.6},
    },
    "smollm2-360m": {
        "model": "HuggingFaceTB/SmolLM2-360M-Instruct",
        "learning_rate": {"mmpo": 5e-4, "dpo": 5e-5, "simpo": 1e-4},
        "gamma": {"simpo": 1.6},
    },
    "llama3.2-1b": {
        "model": "meta-llama/Llama-3.2-1B-Instruct",
        "learning_rate": {"mmpo": 5e-4, "dpo": 5e-4, "simpo": 5e-4},
        "gamma": {"simpo": 1.0},
        "lora": True, "lora_r": 64, "lora_alpha": 64, "lora_dropout": 0.01,
        "lora_target_modules": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        "optimizer": "adamw_8bit",
    },
    "llama3-8b": {
        "model": "meta-llama/Meta-Llama-3-8B-Instruct",
        "learning_rate": {"mmpo": 1e-4, "dpo": 1e-5, "simpo": 1e-4},
        "gamma": {"simpo": 1.0},
        "lora": True, "lora_r": 64, "lora_alpha": 64, "lora_dropout": 0.01,
        "lora_target_modules": ("q_proj", "k_proj", "v_proj", "o_proj"),
        "optimizer": "adamw_8bit",
    },
}


def preset_values(name: str, objective: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}'; presets are: {', '.join(PRESETS)}")
    values = {**_COMMON}
    for key, value in PRESETS[name].items():
        if isinstance(value, dict):  # per-objective setting
            if objective in value:
                values[key] = value[objective]
        else:
            values[key] = value
    return values


def with_preset(values: dict[str, Any]) -> dict[str, Any]:
    """TrainConfig values given as a mapping (a sweep's YAML) with their ``preset`` expanded beneath them.

    Unlike :func:`apply_preset`, every key present in ``values`` wins, even one equal to its
    TrainConfig default (a config object cannot tell such a value from "unset")."""
    values = dict(values)
    name = values.pop("preset", None)
    if not name:
        return values
    return {**preset_values(name, values.get("objective", TrainConfig.objective)), **values}


def apply_preset(cfg: TrainConfig) -> TrainConfig:
    """Fill the settings of ``cfg.preset`` that ``cfg`` leaves at their defaults."""
    if not cfg.preset:
        return cfg
    defaults = TrainConfig()
    updates = {k: v for k, v in preset_values(cfg.preset, cfg.objective).items()
               if getattr(cfg, k) == getattr(defaults, k)}
    return dataclasses.replace(cfg, **updates)
