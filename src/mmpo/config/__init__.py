"""Configuration: the run dataclasses (``training``), where each value came from (``provenance``),
configs as files (``files``), the paper's presets (``presets``) and the one table of defaults
(``defaults``)."""

from mmpo.config.defaults import LORA_ALL_PROJECTIONS, OBJECTIVE_DEFAULTS, TRACKERS, bundled_path
from mmpo.config.files import (
    check_keys,
    config_fields,
    flat_hparams,
    from_dict,
    load_yaml,
    resume_mismatches,
    to_dict,
)
from mmpo.config.presets import PRESETS, SFT_PRESETS, apply_preset, preset_values
from mmpo.config.provenance import is_user_set, sources, with_values
from mmpo.config.training import CommonConfig, ConfigError, SFTConfig, TrainConfig, check_types, resolve

__all__ = [
    "LORA_ALL_PROJECTIONS",
    "OBJECTIVE_DEFAULTS",
    "PRESETS",
    "SFT_PRESETS",
    "TRACKERS",
    "CommonConfig",
    "ConfigError",
    "SFTConfig",
    "TrainConfig",
    "apply_preset",
    "bundled_path",
    "check_keys",
    "check_types",
    "config_fields",
    "flat_hparams",
    "from_dict",
    "is_user_set",
    "load_yaml",
    "preset_values",
    "resolve",
    "resume_mismatches",
    "sources",
    "to_dict",
    "with_values",
]
