"""The paper's training settings (docs/objectives.md "Training protocol", Table 3) as presets.

A preset fills only the settings you did not set yourself (keywords, YAML keys or flags; see
``mmpo.config.provenance``): yours always win, even when they equal a built-in default.
Learning rate and SimPO's gamma depend on the objective.

Two stages, as in the paper: ``mmpo sft --preset smollm2-135m`` instruction-tunes the *base* model
into ``runs/sft-smollm2-135m``, and ``mmpo train --preset smollm2-135m`` starts from that folder.
The ``-instruct`` presets start from the published ``-Instruct`` model instead (which its model
card says was already DPO-trained on UltraFeedback, one of the preference sets): a labelled
shortcut, not the paper's protocol.
"""

from __future__ import annotations

from typing import Any

from mmpo.config.defaults import LORA_ALL_PROJECTIONS, bundled_path
from mmpo.config.provenance import PRESET, is_user_set, with_values
from mmpo.config.training import CommonConfig, ConfigError, SFTConfig

PAPER_TRAIN_DATA = ("HuggingFaceH4/orca_dpo_pairs:train_prefs", "HuggingFaceH4/ultrafeedback_binarized:train_prefs")
PAPER_EVAL_DATA = ("HuggingFaceH4/orca_dpo_pairs:test_prefs", "HuggingFaceH4/ultrafeedback_binarized:test_prefs")
#: A plain ChatML template for base models that ship none (as alignment-handbook's SmolLM2 recipe does).
CHATML_TEMPLATE = str(bundled_path("../templates/chatml.jinja").resolve())

_COMMON: dict[str, Any] = {
    "dataset": PAPER_TRAIN_DATA,
    "eval_dataset": PAPER_EVAL_DATA,
    "epochs": 5,
    # Global batch 128 pairs; the paper ran 2 per device x 16 accumulation x 4 GPUs. Accumulation is
    # derived from the global batch at start-up, so the same preset keeps 128 on 1, 4 or 8 GPUs.
    "global_batch_size": 128,
    "per_device_batch_size": 2,
    "max_prompt_length": 1800,
    "max_completion_length": 512,
    "warmup_ratio": 0.1,
    "logging_steps": 10,
}
_LORA_1B = {"lora": True, "lora_r": 64, "lora_alpha": 64, "lora_dropout": 0.01, "optimizer": "adamw_8bit"}

PRESETS: dict[str, dict[str, Any]] = {
    "smollm2-135m": {
        "model": "runs/sft-smollm2-135m",
        "learning_rate": {"mmpo": 5e-4, "dpo": 5e-4, "simpo": 1e-4},
        "gamma": {"simpo": 1.6},
    },
    "smollm2-360m": {
        "model": "runs/sft-smollm2-360m",
        "learning_rate": {"mmpo": 5e-4, "dpo": 5e-5, "simpo": 1e-4},
        "gamma": {"simpo": 1.6},
    },
    "llama3.2-1b": {
        "model": "runs/sft-llama3.2-1b",
        "learning_rate": {"mmpo": 5e-4, "dpo": 5e-4, "simpo": 5e-4},
        "gamma": {"simpo": 1.0},
        **_LORA_1B,
        "lora_target_modules": LORA_ALL_PROJECTIONS,
    },
    "llama3-8b": {  # the paper runs no SFT stage of its own for the 8B model
        "model": "meta-llama/Meta-Llama-3-8B-Instruct",
        "learning_rate": {"mmpo": 1e-4, "dpo": 1e-5, "simpo": 1e-4},
        "gamma": {"simpo": 1.0},
        **_LORA_1B,
        "lora_target_modules": ("q_proj", "k_proj", "v_proj", "o_proj"),
    },
}
_INSTRUCT_MODELS = {
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "smollm2-360m": "HuggingFaceTB/SmolLM2-360M-Instruct",
    "llama3.2-1b": "meta-llama/Llama-3.2-1B-Instruct",
}
for _name, _model in _INSTRUCT_MODELS.items():
    PRESETS[f"{_name}-instruct"] = {**PRESETS[_name], "model": _model}

# The SFT stage. Where the paper gives no value, the numbers are those of alignment-handbook's
# recipes: recipes/smollm2/sft/config_smol.yaml for SmolLM2 (lr 1e-3, cosine, 10% warm-up, global
# batch 128 = 4 x 4 accumulation x 8 GPUs, ChatML template) and recipes/zephyr-7b-beta/sft/
# config_full.yaml for Llama (lr 2e-5, global batch 128, max length 2048).
_SFT_SMOLLM2 = {
    "dataset": ("HuggingFaceTB/smol-smoltalk:train",),
    "eval_dataset": ("HuggingFaceTB/smol-smoltalk:test",),
    "epochs": 2,
    "learning_rate": 1e-3,
    "warmup_ratio": 0.1,
    "global_batch_size": 128,
    "per_device_batch_size": 4,
    "max_length": 8192,
    "chat_template_path": CHATML_TEMPLATE,
    "logging_steps": 10,
}
SFT_PRESETS: dict[str, dict[str, Any]] = {
    "smollm2-135m": {**_SFT_SMOLLM2, "model": "HuggingFaceTB/SmolLM2-135M", "output_dir": "runs/sft-smollm2-135m"},
    "smollm2-360m": {**_SFT_SMOLLM2, "model": "HuggingFaceTB/SmolLM2-360M", "output_dir": "runs/sft-smollm2-360m"},
    "llama3.2-1b": {
        "model": "meta-llama/Llama-3.2-1B",
        # The paper adds the authors' own SFT mixture, which is not public: pass it with --dataset.
        "dataset": ("HuggingFaceH4/ultrachat_200k:train_sft",),
        "eval_dataset": ("HuggingFaceH4/ultrachat_200k:test_sft",),
        "epochs": 3,
        "learning_rate": 2e-5,
        "warmup_ratio": 0.1,
        "global_batch_size": 128,
        "per_device_batch_size": 4,
        "max_length": 2048,
        "chat_template_path": CHATML_TEMPLATE,
        "logging_steps": 10,
        "output_dir": "runs/sft-llama3.2-1b",
    },
}


def preset_values(name: str, objective: str | None = None, *, stage: str = "train") -> dict[str, Any]:
    """The settings of preset ``name`` for ``objective`` (``stage="sft"``: the SFT stage's)."""
    table = SFT_PRESETS if stage == "sft" else PRESETS
    if name not in table:
        raise ConfigError(f"unknown {stage} preset '{name}'; presets are: {', '.join(table)}")
    values = {} if stage == "sft" else {**_COMMON}
    for key, value in table[name].items():
        if isinstance(value, dict):  # per-objective setting
            if objective in value:
                values[key] = value[objective]
        else:
            values[key] = value
    return values


def apply_preset(cfg: CommonConfig) -> CommonConfig:
    """Fill the settings of ``cfg.preset`` that the user did not set (any source but the default)."""
    if not cfg.preset:
        return cfg
    stage = "sft" if isinstance(cfg, SFTConfig) else "train"
    values = preset_values(cfg.preset, getattr(cfg, "objective", None), stage=stage)
    updates = {k: v for k, v in values.items() if not is_user_set(cfg, k)}
    if is_user_set(cfg, "gradient_accumulation_steps"):
        updates.pop("global_batch_size", None)  # your accumulation wins; the start-up line says so
    return with_values(cfg, PRESET, **updates)


def preset_global_batch(cfg: CommonConfig) -> int | None:
    """The global batch the config's preset states (None without a preset)."""
    if not cfg.preset:
        return None
    stage = "sft" if isinstance(cfg, SFTConfig) else "train"
    return preset_values(cfg.preset, getattr(cfg, "objective", None), stage=stage).get("global_batch_size")
