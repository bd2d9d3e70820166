"""Configuration: the run dataclasses (``training``), the paper's presets (``presets``) and the one
table of defaults (``defaults``)."""

from mmpo.config.defaults import LORA_ALL_PROJECTIONS, OBJECTIVE_DEFAULTS, bundled_path
from mmpo.config.presets import PRESETS, apply_preset, preset_values
from mmpo.config.training import (
    CommonConfig,
    ConfigError,
    SFTConfig,
    TrainConfig,
    check_keys,
    from_dict,
    load_yaml,
    resolve,
    resume_mismatches,
    save_yaml,
    to_dict,
)

__all__ = [
    "LORA_ALL_PROJECTIONS",
    "OBJECTIVE_DEFAULTS",
    "PRESETS",
    "CommonConfig",
    "ConfigError",
    "SFTConfig",
    "TrainConfig",
    "apply_preset",
    "bundled_path",
    "check_keys",
    "from_dict",
    "load_yaml",
    "preset_values",
    "resolve",
    "resume_mismatches",
    "save_yaml",
    "to_dict",
]
