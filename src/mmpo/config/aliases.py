"""TRL and alignment-handbook key names, read as ours: a handbook DPO or SimPO recipe runs as it is.

``translate(values)`` maps the keys of TRL's ``DPOConfig``/``CPOConfig``/``ModelConfig``/
``ScriptArguments`` and of alignment-handbook recipes onto this project's (docs/recipes.md has the
table). Keys of theirs that only steer their trainer's bookkeeping (Hub pushes, eval strategies,
dataloader workers) are accepted and listed once as ignored; a key that is neither ours, nor an
alias, nor one of those is still an error, with a suggestion.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from mmpo.config.training import ConfigError

#: Their name -> ours, where only the name differs.
RENAMED = {
    "model_name_or_path": "model",
    "per_device_train_batch_size": "per_device_batch_size",
    "num_train_epochs": "epochs",
    "use_peft": "lora",
    "precompute_ref_log_probs": "precompute_ref",
    "simpo_gamma": "gamma",
    "torch_dtype": "dtype",
}
#: Their values of ``optim`` -> our ``optimizer``.
OPTIMIZERS = {
    "adamw_torch": "adamw",
    "adamw_torch_fused": "adamw",
    "adamw_hf": "adamw",
    "adamw_8bit": "adamw_8bit",
    "adamw_bnb_8bit": "adamw_8bit",
    "paged_adamw_8bit": "adamw_8bit",
}
#: Their ``loss_type`` -> our ``objective``.
LOSS_TYPES = {"sigmoid": "dpo", "simpo": "simpo"}
#: Accepted and ignored: their trainer's bookkeeping, with no effect on what is trained here.
IGNORED = frozenset(
    {
        "do_eval", "do_train", "eval_strategy", "evaluation_strategy", "save_strategy", "logging_strategy",
        "log_level", "logging_first_step", "overwrite_output_dir", "push_to_hub", "hub_model_id", "hub_strategy",
        "hub_private_repo", "dataset_num_proc", "model_revision", "remove_unused_columns",
        "per_device_eval_batch_size", "gradient_checkpointing_kwargs", "ddp_timeout", "bf16_full_eval",
        "dataloader_num_workers", "dataset_config", "tokenizer_name_or_path", "use_liger_kernel",
        "padding_free", "generate_during_eval", "truncation_mode", "padding_value", "label_pad_token_id",
        "dataset_text_field", "packing", "eval_on_start",
    }
)  # fmt: skip


#: Every key name of theirs this module reads (for "did you mean" suggestions).
ALIAS_NAMES = frozenset(RENAMED) | {
    "optim", "loss_type", "cpo_alpha", "resume_from_checkpoint", "bf16", "fp16", "lr_scheduler_type",
    "dataset_name", "dataset_train_split", "dataset_test_split", "dataset_mixture", "chat_template", "max_length",
}  # fmt: skip


def _chat_template_file(template: str) -> str:
    """An inline chat template (the handbook's ``chat_template``) as a file, for ``chat_template_path``."""
    folder = Path.home() / ".cache" / "mmpo" / "chat_templates"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{hashlib.sha256(template.encode()).hexdigest()[:16]}.jinja"
    if not path.exists():
        path.write_text(template, encoding="utf-8")
    return str(path)


def _mixture(value: Any, source: str) -> list[str]:
    """The handbook's ``dataset_mixture`` (``datasets: [{id, split, weight}]``, or ``{id: weight}``) as specs."""
    if isinstance(value, dict) and "datasets" in value:
        specs = []
        for entry in value["datasets"]:
            if entry.get("config") not in (None, "default"):
                raise ConfigError(
                    f"{source}: dataset_mixture entry {entry.get('id')!r}: configs other than 'default' are not supported"
                )
            spec = entry["id"] + (f":{entry['split']}" if entry.get("split") else "")
            specs.append(spec + (f"@{entry['weight']}" if entry.get("weight") not in (None, 1, 1.0) else ""))
        return specs
    if isinstance(value, dict):
        return [f"{name}@{weight}" if weight not in (1, 1.0) else name for name, weight in value.items()]
    raise ConfigError(f"{source}: dataset_mixture must be a mapping (got {value!r})")


def translate(values: dict[str, Any], known: set[str], source: str) -> tuple[dict[str, Any], list[str]]:
    """``values`` with their keys and values in our terms, and the keys that were ignored."""
    out: dict[str, Any] = {}
    ignored: list[str] = []

    def put(key: str, value: Any, theirs: str) -> None:
        if key in out and out[key] != value:
            raise ConfigError(f"{source}: '{theirs}' and another key both set '{key}'")
        out[key] = value

    for key, value in values.items():
        if key in known and key not in ("max_length",):
            put(key, value, key)
        elif key in RENAMED:
            put(RENAMED[key], value, key)
        elif key == "optim":
            if value not in OPTIMIZERS:
                raise ConfigError(f"{source}: optim {value!r} is not supported; use one of {', '.join(OPTIMIZERS)}")
            put("optimizer", OPTIMIZERS[value], key)
        elif key == "loss_type":
            kind = value[0] if isinstance(value, list) and len(value) == 1 else value
            if kind not in LOSS_TYPES:
                raise ConfigError(
                    f"{source}: loss_type {value!r}: only {', '.join(LOSS_TYPES)} have a counterpart here"
                )
            put("objective", LOSS_TYPES[kind], key)
        elif key == "cpo_alpha":
            if value not in (0, 0.0):
                raise ConfigError(f"{source}: cpo_alpha {value!r}: SimPO here is pure SimPO (cpo_alpha 0)")
        elif key == "resume_from_checkpoint":
            put("resume", bool(value), key)
        elif key in ("bf16", "fp16"):
            if value:
                put("mixed_precision", key, key)
        elif key == "lr_scheduler_type":
            if value != "cosine":
                raise ConfigError(f"{source}: lr_scheduler_type {value!r}: the schedule here is cosine with warm-up")
        elif key == "dataset_name":
            split = values.get("dataset_train_split", "train")
            put("dataset", [f"{value}:{split}"], key)
            if "dataset_test_split" in values:
                put("eval_dataset", [f"{value}:{values['dataset_test_split']}"], key)
        elif key in ("dataset_train_split", "dataset_test_split"):
            continue  # read with dataset_name
        elif key == "dataset_mixture":
            put("dataset", _mixture(value, source), key)
        elif key == "chat_template":
            put("chat_template_path", _chat_template_file(value), key)
        elif key == "max_length" and "max_length" in known:
            put("max_length", value, key)  # SFT: the same meaning
        elif key == "max_length":  # TRL's DPO: prompt + completion
            prompt = values.get("max_prompt_length")
            if prompt is None:
                raise ConfigError(f"{source}: max_length needs max_prompt_length (their sum is the limit here)")
            put("max_completion_length", value - prompt, key)
        elif key in IGNORED:
            ignored.append(key)
        else:
            out[key] = value  # unknown: check_keys names it, with a suggestion
    return out, ignored
