"""What a finished run publishes: the final model at the top of its folder, a merged LoRA model, the Hub.

* :func:`save_final_model` / :func:`copy_final_model` put the final model (or LoRA adapter) and
  its tokenizer at the top of ``output_dir``, where HF Trainer's ``save_model`` puts them, so
  ``AutoModelForCausalLM.from_pretrained(output_dir)`` (or PEFT's loader, for an adapter) works.
* :func:`merge_lora` folds a LoRA adapter into its base weights and writes a plain model
  (safetensors + ``config.json``, no PEFT keys): what transformers, vLLM and llama.cpp's
  converter load.
* :func:`push_to_hub` uploads a model folder (without ``checkpoints/``) through ``huggingface_hub``;
  :func:`files_to_upload` lists exactly what it would send.

The model card and ``trainer_state.json`` are :mod:`mmpo.publish.model_card` and :mod:`mmpo.publish.trainer_state`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "UPLOAD_IGNORE_PATTERNS",
    "ExportError",
    "copy_final_model",
    "files_to_upload",
    "merge_lora",
    "model_kind",
    "push_to_hub",
    "save_final_model",
]

# Weight and adapter files: a folder holds one kind, so writing one kind removes the other's
# leftovers (transformers takes a folder with adapter_config.json for a PEFT adapter).
WEIGHT_PATTERNS = (
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
    "adapter_config.json",
)
# Never uploaded: checkpoints (optimizer state, many GB), hidden and temporary files.
UPLOAD_IGNORE_PATTERNS = ["checkpoints/*", "checkpoints/**", ".*", "**/.*", "*.tmp*"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class ExportError(ValueError):
    """A folder, adapter or repo id that cannot be exported; raised before any long work."""


def model_kind(folder: str | Path) -> str | None:
    """``"model"`` (config.json and weights), ``"adapter"`` (a PEFT adapter) or ``None``."""
    folder = Path(folder)
    if (folder / "adapter_config.json").is_file() and any(folder.glob("adapter_model.*")):
        return "adapter"
    has_weights = any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin"))
    if (folder / "config.json").is_file() and has_weights:
        return "model"
    return None


def _remove_weights(folder: Path, keep: Sequence[str] = ()) -> None:
    for pattern in WEIGHT_PATTERNS:
        for path in folder.glob(pattern):
            if path.name not in keep:
                path.unlink()


def save_final_model(model: Any, tokenizer: Any, output_dir: str | Path, *, state_dict: dict | None = None) -> Path:
    """Write ``model`` (a full model, or a PEFT model's adapter) and ``tokenizer`` at the top of ``output_dir``.

    As HF Trainer's ``save_model``: safetensors weights, ``config.json``,
    ``generation_config.json`` and the tokenizer files (with its chat template). ``state_dict``
    is the gathered state dict under ZeRO-3/FSDP (``accelerator.get_state_dict(model)``). Call
    it on the main process only. Weights of the other kind left by an earlier save are removed.
    """
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    _remove_weights(folder)
    if hasattr(model, "peft_config"):
        model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
    else:
        model.save_pretrained(folder, state_dict=state_dict)
    tokenizer.save_pretrained(folder)
    return folder


def copy_final_model(model_dir: str | Path, output_dir: str | Path) -> Path:
    """Copy a checkpoint's ``model/`` folder (model or adapter, with its tokenizer) to the top of ``output_dir``.

    The cheap way to publish the final model when the engine has just written it as its last
    checkpoint: no second save, no collective under ZeRO-3/FSDP. Each file is copied under a
    temporary name and renamed into place, so a reader never sees a half-written file.
    """
    source, folder = Path(model_dir), Path(output_dir)
    if model_kind(source) is None:
        raise ExportError(f"{source} holds no model (config.json and weights) or LoRA adapter to copy")
    folder.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in source.iterdir() if p.is_file())
    _remove_weights(folder, keep=[p.name for p in files])
    for path in files:
        tmp = folder / f".{path.name}.tmp{os.getpid()}"
        shutil.copy2(path, tmp)
        os.replace(tmp, folder / path.name)
    return folder


def merge_lora(
    adapter_dir: str | Path,
    output_dir: str | Path,
    *,
    base_model: str | None = None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
) -> Path:
    """Merge the LoRA adapter of ``adapter_dir`` into its base model; write a plain model to ``output_dir``.

    The base is ``base_model`` or the adapter's ``base_model_name_or_path``. The merge runs in
    float32 (bf16 rounding of ``W + BA`` would lose small updates); the result is saved in
    ``dtype`` (``"float32"``, ``"bfloat16"``, ``"float16"``; default: the base model's own
    dtype). The tokenizer comes from the adapter folder when it has one, else from the base.
    No model card is written (``mmpo.publish.model_card.write_model_card(..., merged=True)`` does that).
    """
    import torch
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source, folder = Path(adapter_dir), Path(output_dir)
    config_path = source / "adapter_config.json"
    if not config_path.is_file():
        raise ExportError(f"{source} is not a LoRA adapter folder (no adapter_config.json)")
    if folder.resolve() == source.resolve():
        raise ExportError("the merged model needs its own folder: output_dir must differ from the adapter folder")
    adapter_config = json.loads(config_path.read_text())
    base = base_model or adapter_config.get("base_model_name_or_path")
    if not base:
        raise ExportError(f"{config_path} names no base model (base_model_name_or_path): pass base_model")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype is not None and dtype not in dtypes:
        raise ExportError(f"dtype must be one of {', '.join(dtypes)}, got {dtype!r}")
    try:
        base_config = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ExportError(f"cannot load the base model '{base}' of {source}: {str(err).splitlines()[0]}") from None
    target = dtypes[dtype] if dtype else getattr(base_config, "dtype", None) or torch.float32
    if isinstance(target, str):
        target = dtypes.get(target, torch.float32)

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, trust_remote_code=trust_remote_code)
    merged = PeftModel.from_pretrained(model, source).merge_and_unload()
    merged.to(target)
    has_tokenizer = any((source / name).is_file() for name in TOKENIZER_FILES)
    tokenizer = AutoTokenizer.from_pretrained(source if has_tokenizer else base, trust_remote_code=trust_remote_code)
    save_final_model(merged, tokenizer, folder)

    for weights in folder.glob("*.safetensors"):  # a plain model: no PEFT names left anywhere
        with safe_open(str(weights), framework="pt") as handle:
            leftover = [k for k in handle.keys() if "lora_" in k or k.startswith("base_model.model.")]  # noqa: SIM118 - safe_open is not iterable
        if leftover:
            raise ExportError(f"merging left PEFT weights in {weights.name}: {leftover[:3]}")
    return folder


def files_to_upload(folder: str | Path) -> list[str]:
    """The paths (relative, POSIX) :func:`push_to_hub` sends: the folder without checkpoints or hidden files."""
    from huggingface_hub.utils import filter_repo_objects

    folder = Path(folder)
    paths = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return list(filter_repo_objects(paths, ignore_patterns=UPLOAD_IGNORE_PATTERNS))


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    endpoint: str | None = None,
):
    """Upload ``folder`` (a model or adapter, its card, config and metrics; not ``checkpoints/``) to ``repo_id``.

    Creates the model repo if needed (``private`` as given; an existing repo is reused) and makes
    one commit through ``huggingface_hub`` (large files go by its LFS/Xet transfer). ``token``:
    default, huggingface_hub's own (``HF_TOKEN`` or ``hf auth login``). ``endpoint``: another
    Hub (default ``HF_ENDPOINT`` or huggingface.co). Returns the ``CommitInfo`` (``commit_url``,
    ``oid``). Everything that can be checked locally is checked before any request.
    """
    from huggingface_hub import HfApi, constants
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    folder = Path(folder)
    if model_kind(folder) is None:
        raise ExportError(f"{folder} holds no model (config.json and weights) or LoRA adapter to push")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ExportError(f"'{repo_id}' is not a Hub repo id ('user/name'): {err}") from None
    if constants.is_offline_mode():
        raise ExportError("pushing to the Hub needs the network, but HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set")
    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    if revision not in (None, constants.DEFAULT_REVISION) and not create_pr:
        api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        repo_type="model",
        revision=revision,
        create_pr=create_pr,
        commit_message=commit_message or f"Upload {model_kind(folder)} trained with mmpo",
        ignore_patterns=UPLOAD_IGNORE_PATTERNS,
    )
