"""The model card (``README.md``) of a trained model, through ``huggingface_hub.ModelCard``.

The card says what the model is and how it was made: the base model, the objective and its
settings, the training data, the optimization settings, the final metrics and the command that
reproduces the run. Its YAML header (``base_model``, ``datasets``, ``library_name``, ``tags``) is
what the Hub indexes; only Hub ids go there (a local path is not metadata the Hub accepts), while
the body names local paths too.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["build_model_card", "invocation", "is_hub_id", "write_model_card"]

OBJECTIVE_NAMES = {
    "mmpo": "MMPO (maximum marginal likelihood preference optimization; Najafi & Fyshe, EACL 2026)",
    "dpo": "DPO (direct preference optimization; Rafailov et al., 2023)",
    "simpo": "SimPO (simple preference optimization; Meng et al., 2024)",
    "sft": "supervised fine-tuning (loss on assistant tokens)",
}
# The settings that define each objective (config keys), in the order the card lists them.
OBJECTIVE_SETTINGS = {
    "mmpo": (
        "beta",
        "chosen_reward",
        "rejected_reward",
        "normalize",
        "normalize_scope",
        "aux_loss",
        "length_normalize",
        "entropy_coef",
    ),
    "dpo": ("beta", "length_normalize", "entropy_coef"),
    "simpo": ("beta", "gamma"),
    "sft": ("max_length",),
}
TRAINING_SETTINGS = (
    "learning_rate",
    "epochs",
    "max_steps",
    "per_device_batch_size",
    "gradient_accumulation_steps",
    "warmup_ratio",
    "weight_decay",
    "max_grad_norm",
    "optimizer",
    "dtype",
    "seed",
    "max_prompt_length",
    "max_completion_length",
    "lora",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
)
LORA_ONLY = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")
CITATION = """@inproceedings{najafi2026mmpo,
  title     = {Offline Preference Optimization via Maximum Marginal Likelihood Estimation},
  author    = {Saeed Najafi and Alona Fyshe},
  booktitle = {Proceedings of EACL 2026},
  year      = {2026},
  note      = {arXiv:2510.22881}
}"""

TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ summary }}

## Base model

{{ base_model_text }}

## Objective

{{ objective_text }}

| setting | value |
| --- | --- |
{% for key, value in objective_settings %}| `{{ key }}` | {{ value }} |
{% endfor %}
## Data

{% for line in data_lines %}- {{ line }}
{% endfor %}
## Training

| setting | value |
| --- | --- |
{% for key, value in training_settings %}| `{{ key }}` | {{ value }} |
{% endfor %}
## Results

{% if metrics %}| metric | value |
| --- | --- |
{% for key, value in metrics %}| `{{ key }}` | {{ value }} |
{% endfor %}{% else %}No evaluation was run.
{% endif %}
## Reproduce

```bash
{{ command }}
```

The run's full configuration is `config.yaml`{% if not merged %} in this folder{% endif %}; its training curve is in
`trainer_state.json` (Hugging Face Trainer's layout) and `metrics.jsonl`.

## Citation

```bibtex
{{ citation }}
```
"""


def is_hub_id(name: str) -> bool:
    """Whether ``name`` reads as a Hugging Face Hub repo id rather than a local path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not name or Path(name).expanduser().exists() or name.startswith((".", "/", "~")):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def invocation() -> str:
    """The command line of this process as the user typed it (``mmpo ...``), shell-quoted."""
    program = Path(sys.argv[0]).name
    program = "mmpo" if program in ("mmpo", "cli.py", "__main__.py") else program
    return shlex.join([program, *sys.argv[1:]])


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(f"`{v}`" for v in value) if value else "(none)"
    if value is None:
        return "(default)"
    return f"`{value}`" if isinstance(value, str) else str(value)


def _capitalized(text: str) -> str:
    return text[:1].upper() + text[1:]


def _describe_model(name: str) -> str:
    from mmpo.world import bundled_path

    if Path(name).expanduser().resolve() == bundled_path("sft_model").resolve():
        return "the SFT model of mmpo's bundled offline world (a 0.5M-parameter Llama; `mmpo world build`)"
    if is_hub_id(name):
        return f"[`{name}`](https://huggingface.co/{name})"
    return f"the local model `{name}`"


def _describe_local_file(path: str) -> str:
    from mmpo.world import bundled_path

    try:
        inside = Path(path).expanduser().resolve().relative_to(bundled_path("").resolve())
    except ValueError:
        return f"`{path}`"
    return f"`{inside.as_posix()}` of mmpo's bundled offline world"


def _datasets(config: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(lines for the card's Data section, Hub ids for its metadata)."""
    from mmpo.data import DatasetSpec

    lines, hub_ids = [], []
    for role, key in (("training", "dataset"), ("validation", "eval_dataset")):
        for text in config.get(key) or ():
            spec = DatasetSpec.parse(text)
            where = (
                f"[`{spec.path}`](https://huggingface.co/datasets/{spec.path})"
                if is_hub_id(spec.path)
                else _describe_local_file(spec.path)
            )
            lines.append(f"{role}: {where} (split `{spec.split}`, weight {spec.weight:g})")
            if role == "training" and is_hub_id(spec.path) and spec.path not in hub_ids:
                hub_ids.append(spec.path)
    return lines or ["(not recorded)"], hub_ids


def build_model_card(
    config: Mapping[str, Any],
    *,
    metrics: Mapping[str, Any] | None = None,
    command: str | None = None,
    adapter: bool = False,
    merged: bool = False,
    model_name: str | None = None,
    extra_tags: Sequence[str] = (),
):
    """A ``huggingface_hub.ModelCard`` for a model trained with ``config`` (``mmpo.config.to_dict``).

    ``metrics``: final numbers to report (non-numbers are skipped); ``command``: the command
    that made the run (default: ``mmpo train --config config.yaml``); ``adapter``: the folder
    holds a LoRA adapter (``library_name: peft``); ``merged``: a LoRA adapter merged into the
    base weights.
    """
    from huggingface_hub import ModelCard, ModelCardData

    objective = str(config.get("objective", "sft"))
    if objective not in OBJECTIVE_NAMES:
        raise ValueError(f"unknown objective {objective!r} (known: {', '.join(OBJECTIVE_NAMES)})")
    base = str(config.get("model", ""))
    data_lines, hub_datasets = _datasets(config)
    training = [
        (k, _format(config[k])) for k in TRAINING_SETTINGS if k in config and (config.get("lora") or k not in LORA_ONLY)
    ]
    numbers = [
        (k, _format(v)) for k, v in (metrics or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    ]
    kind = "LoRA adapter" if adapter else ("model (LoRA adapter merged into the base weights)" if merged else "model")
    tags = ["mmpo", objective, *(("preference-optimization",) if objective != "sft" else ()), *extra_tags]
    card_data = ModelCardData(
        base_model=base if is_hub_id(base) else None,
        datasets=hub_datasets or None,
        library_name="peft" if adapter else "transformers",
        pipeline_tag="text-generation",
        tags=list(dict.fromkeys(tags)),
        model_name=model_name,
    )
    default_command = f"mmpo {'sft' if objective == 'sft' else 'train'} --config config.yaml"
    return ModelCard.from_template(
        card_data,
        template_str=TEMPLATE,
        title=model_name or f"{objective.upper()} {kind}",
        summary=f"A {kind} trained from {_describe_model(base)} with {OBJECTIVE_NAMES[objective]}, "
        "using the `mmpo` toolkit (offline preference optimization by maximum marginal likelihood).",
        base_model_text=_capitalized(_describe_model(base))
        + (" (load it first, then this adapter with PEFT)." if adapter else "."),
        objective_text=OBJECTIVE_NAMES[objective] + ".",
        objective_settings=[(k, _format(config[k])) for k in OBJECTIVE_SETTINGS[objective] if k in config],
        data_lines=data_lines,
        training_settings=training,
        metrics=numbers,
        command=command or default_command,
        merged=merged,
        citation=CITATION,
    )


def write_model_card(folder: str | Path, config: Mapping[str, Any], **kwargs: Any) -> Path:
    """Write ``README.md`` in ``folder`` (see :func:`build_model_card` for the arguments)."""
    path = Path(folder) / "README.md"
    build_model_card(config, **kwargs).save(path)
    return path
