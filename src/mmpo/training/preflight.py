"""Checks of a run's settings against the model that need no data and no weights.

They run before the data is loaded (which can take minutes), so a typo fails in seconds.
"""

from __future__ import annotations

import importlib.util

import torch

from mmpo.config import CommonConfig, ConfigError

#: How to get an optional package that a feature needs: module -> (words its ImportError may use, hint).
OPTIONAL_PACKAGES = {
    "flash_attn": (
        ("flash_attn", "flash-attn", "FlashAttention"),
        "pip install flash-attn (needs a CUDA GPU), or use --attn-implementation sdpa",
    ),
    "bitsandbytes": (("bitsandbytes",), "pip install 'mmpo[eightbit]', or use --optimizer adamw"),
    "deepspeed": (("deepspeed", "DeepSpeed"), "pip install deepspeed, or launch without the DeepSpeed config"),
    "trl": (("trl",), "pip install 'mmpo[bench]'"),
    "psutil": (("psutil",), "pip install 'mmpo[bench]'"),
}

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
    except Exception:  # best effort (e.g. remote code that cannot build on "meta"): loading reports real problems
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


def check_optional_packages(cfg: CommonConfig) -> None:
    """Options that need a package that is not installed fail now, not after the data is loaded."""
    needed = {
        "flash_attn": cfg.attn_implementation == "flash_attention_2",
        "bitsandbytes": cfg.optimizer == "adamw_8bit",
    }
    for package, used in needed.items():
        if used and importlib.util.find_spec(package) is None:
            raise ConfigError(
                f"the settings need the package '{package}', which is not installed: {OPTIONAL_PACKAGES[package][1]}"
            )
