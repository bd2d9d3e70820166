"""Loading models and tokenizers: dtype, attention kernel, dropout off, LoRA via PEFT.

A model is a local folder, a Hub id, a LoRA adapter folder, or a GGUF file (a spec ending in
``.gguf``: a local path or ``owner/repo/FILE.gguf``; see :mod:`mmpo.gguf_models`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from mmpo.config import CommonConfig, ConfigError
from mmpo.gguf_models import gguf_source, load_gguf_config, load_gguf_model, load_gguf_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def is_adapter_folder(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def load_tokenizer(
    path: str, *, trust_remote_code: bool = False, chat_template_path: str | None = None
) -> PreTrainedTokenizerBase:
    """Tokenizer of a model folder, Hub id or GGUF file (with the chat template of
    ``chat_template_path`` if given); a clear error when it cannot be found."""
    source = str(path)
    if is_adapter_folder(path) and not any(
        (Path(path) / n).exists() for n in ("tokenizer.json", "tokenizer_config.json")
    ):
        source = json.loads((Path(path) / "adapter_config.json").read_text())["base_model_name_or_path"]
    gguf = gguf_source(source)
    if gguf is not None:
        tokenizer = load_gguf_tokenizer(gguf)
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as err:
            raise ConfigError(
                f"could not load a tokenizer from '{source}': {err.__class__.__name__}: {str(err).splitlines()[0]} "
                "(a checkpoint folder needs its tokenizer files; Hub ids need network access)"
            ) from None
    if tokenizer.pad_token_id is None:
        # Many base models ship without a pad token; padding positions are always masked out.
        tokenizer.pad_token = tokenizer.eos_token
    if chat_template_path is not None:
        tokenizer.chat_template = Path(chat_template_path).read_text(encoding="utf-8")
    return tokenizer


def disable_dropout(model: torch.nn.Module) -> None:
    """Preference training runs with dropout off (as the authors' code does): the policy then
    equals the reference at step 0 and log-probs are deterministic."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if config is not None and isinstance(getattr(config, key, None), float):
            setattr(config, key, 0.0)


def weights_dtype(name: str) -> torch.dtype:
    """Training keeps float32 master weights unless a 16-bit dtype is asked for by name (then the
    weights themselves are 16-bit: updates smaller than their rounding step are lost)."""
    return torch.float32 if name == "auto" else DTYPES[name]


def load_pretrained(
    path: str | Path,
    *,
    dtype: torch.dtype,
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
    is_trainable: bool = True,
) -> PreTrainedModel:
    """A model folder, Hub id, GGUF file or LoRA adapter folder (on any of those bases), as loaded weights."""
    path = str(path)
    try:
        if is_adapter_folder(path):
            base = json.loads((Path(path) / "adapter_config.json").read_text())["base_model_name_or_path"]
            base_gguf = gguf_source(base)
            if base_gguf is not None:
                from peft import PeftModel

                base_model = load_gguf_model(base_gguf, dtype=dtype, attn_implementation=attn_implementation)
                return PeftModel.from_pretrained(base_model, path, is_trainable=is_trainable)
            from peft import AutoPeftModelForCausalLM

            return AutoPeftModelForCausalLM.from_pretrained(
                path,
                dtype=dtype,
                attn_implementation=attn_implementation,
                trust_remote_code=trust_remote_code,
                is_trainable=is_trainable,
            )
        gguf = gguf_source(path)
        if gguf is not None:
            return load_gguf_model(gguf, dtype=dtype, attn_implementation=attn_implementation)
        return AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
            use_safetensors=None,
        )
    except ConfigError:
        raise
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"could not load model '{path}': {err.__class__.__name__}: {str(err).splitlines()[0]}"
        ) from None


def load_model(cfg: CommonConfig, *, train_dropout: bool = False) -> PreTrainedModel:
    """The model to train, with LoRA adapters when ``cfg.lora`` (PEFT)."""
    dtype = weights_dtype(cfg.dtype)
    path = cfg.model
    model = load_pretrained(
        path, dtype=dtype, attn_implementation=cfg.attn_implementation, trust_remote_code=cfg.trust_remote_code
    )
    if not train_dropout:
        disable_dropout(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora and not is_adapter_folder(path):
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=list(cfg.lora_target_modules),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()
    return model


def is_peft_model(model: torch.nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


@torch.no_grad()
def weights_fingerprint(model: torch.nn.Module) -> str:
    """A cheap content hash of the weights (sums and strided samples of every tensor).

    Used to key the reference log-prob cache by *what the model is*, not where it was loaded
    from, so a copied folder or a Hub snapshot hit the same cache entry.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        stride = max(1, flat.numel() // 64)
        sample = flat[::stride][:64].float().cpu()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(sample.numpy().tobytes())
        digest.update(repr(float(flat.float().sum())).encode())
    return digest.hexdigest()[:16]


def model_context_length(cfg: CommonConfig) -> int | None:
    """The model's trained context window (``max_position_embeddings``), read from its config only."""
    from transformers import AutoConfig

    path = cfg.model
    if is_adapter_folder(path):
        path = json.loads((Path(path) / "adapter_config.json").read_text())["base_model_name_or_path"]
    try:
        gguf = gguf_source(path)
        config = (
            load_gguf_config(gguf)
            if gguf is not None
            else AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        )
    except (OSError, ValueError):
        return None  # reported clearly when the model itself is loaded
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(config, "max_position_embeddings", None)
