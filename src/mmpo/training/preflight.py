"""Checks of a run's settings against the model that need no data and no weights.

They run before the data is loaded (which can take minutes), so a typo fails in seconds.
"""

from __future__ import annotations

import torch

from mmpo.config import CommonConfig, ConfigError

#: Layer types PEFT's LoRA can wrap.
LORA_LAYER_TYPES = ("Linear", "Embedding", "Conv1D", "Conv1d", "Conv2d", "Conv3d")


def module_names(cfg: CommonConfig) -> list[str] | None:
    """Names and types of the model's modules, built on the meta device from its config (no weights
    are read); ``None`` when the config cannot be read (model loading then reports why)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError, KeyError, ImportError):
        return None
    return [(name, type(module).__name__) for name, module in model.named_modules() if name]


def check_lora_targets(cfg: CommonConfig) -> None:
    """Every ``lora_target_modules`` entry must name a layer of the model (matched as PEFT does:
    the whole module name or its last dotted parts). PEFT itself only fails when none matches, so
    one typo among good names would silently train fewer layers."""
    from mmpo.modeling import is_adapter_folder

    if not cfg.lora or is_adapter_folder(cfg.model):
        return
    modules = module_names(cfg)
    if modules is None:
        return
    names = [name for name, _ in modules]
    missing = [t for t in cfg.lora_target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        layers = sorted({name.rsplit(".", 1)[-1] for name, kind in modules if kind in LORA_LAYER_TYPES})
        raise ConfigError(
            f"config key 'lora_target_modules': {', '.join(map(repr, missing))} matches no layer of {cfg.model}; "
            f"its layers LoRA can wrap are: {', '.join(layers)}"
        )
