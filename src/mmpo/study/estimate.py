"""What a run will cost before it runs: optimizer steps and a rough GPU memory estimate, with no
download (row counts and model shapes of the paper's datasets and models are tabled here)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmpo.config import TrainConfig

#: Row counts of the paper's Hub datasets, so a dry run needs no download.
KNOWN_DATASET_ROWS = {
    ("HuggingFaceH4/orca_dpo_pairs", "train_prefs"): 12359,
    ("HuggingFaceH4/orca_dpo_pairs", "test_prefs"): 500,
    ("HuggingFaceH4/ultrafeedback_binarized", "train_prefs"): 61135,
    ("HuggingFaceH4/ultrafeedback_binarized", "test_prefs"): 2000,
}
#: Shapes of the presets' models (from their config.json), the one table of them in the package:
#: a dry run needs no download, and the benchmarks build random-weight models of these shapes.
MODEL_SHAPES: dict[str, dict[str, Any]] = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "max_position_embeddings": 8192,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
    },
    "HuggingFaceTB/SmolLM2-360M-Instruct": {
        "hidden_size": 960,
        "intermediate_size": 2560,
        "num_hidden_layers": 32,
        "num_attention_heads": 15,
        "num_key_value_heads": 5,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
    },
    "meta-llama/Llama-3.2-1B-Instruct": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "tie_word_embeddings": True,
    },
    "meta-llama/Meta-Llama-3-8B-Instruct": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
    },
}
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 4}  # auto: float32 master weights


def activation_bytes(cfg: TrainConfig) -> int:
    """Bytes per activation value on a GPU: 2 under bf16/fp16 autocast (``mixed_precision`` auto
    with float32 weights), else the weights' width."""
    autocast = cfg.mixed_precision in ("bf16", "fp16") or (
        cfg.mixed_precision == "auto" and cfg.dtype in ("auto", "float32")
    )
    return 2 if autocast else BYTES[cfg.dtype]


def count_rows(specs: tuple[str, ...]) -> int | None:
    """Rows a dataset mixture yields (weights applied); None when a Hub dataset's size is unknown."""
    from mmpo.data import DatasetSpec
    from mmpo.data.loading import load_dataset_rows

    total = 0.0
    for text in specs:
        spec = DatasetSpec.parse(text)
        path = Path(spec.path).expanduser()
        if path.is_file() and path.suffix == ".jsonl":
            with open(path, "rb") as handle:
                rows = sum(1 for line in handle if line.strip())
        elif path.exists():
            rows = len(load_dataset_rows(spec))
        elif (spec.path, spec.split) in KNOWN_DATASET_ROWS:
            rows = KNOWN_DATASET_ROWS[(spec.path, spec.split)]
        else:
            return None
        total += int(spec.weight) * rows + round((spec.weight % 1) * rows)
    return int(total)


def known_model_config(model: str, **overrides: Any):
    """A LlamaConfig of a tabled model's shape (random weights when built), e.g. for benchmarks."""
    from transformers import LlamaConfig

    return LlamaConfig(**{**MODEL_SHAPES[model], **overrides})


#: Models with the shape of a tabled one: the base models and the presets' SFT-stage folders.
SAME_SHAPE = {
    "HuggingFaceTB/SmolLM2-135M": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "runs/sft-smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "HuggingFaceTB/SmolLM2-360M": "HuggingFaceTB/SmolLM2-360M-Instruct",
    "runs/sft-smollm2-360m": "HuggingFaceTB/SmolLM2-360M-Instruct",
    "meta-llama/Llama-3.2-1B": "meta-llama/Llama-3.2-1B-Instruct",
    "runs/sft-llama3.2-1b": "meta-llama/Llama-3.2-1B-Instruct",
}


def _model_config(model: str):
    from transformers import AutoConfig

    if not Path(model).exists():
        model = SAME_SHAPE.get(model, model)
    if model in MODEL_SHAPES:
        return known_model_config(model)
    try:
        return AutoConfig.from_pretrained(model)
    except (OSError, ValueError):
        return None


@dataclass
class MemoryEstimate:
    total_gib: float
    parts: dict[str, float]  # GiB each (unrounded: round when showing)
    parameters: int
    trainable: int


def estimate_gpu_memory(cfg: TrainConfig) -> MemoryEstimate | None:
    """A rough peak-memory estimate of one training process (GiB). It is an estimate: real use
    depends on sequence lengths in the data, the attention kernel, fragmentation and the framework.

    weights (P x dtype bytes); gradients and AdamW's two moments for the trainable parameters
    (in the weights' dtype; 8-bit AdamW: 2 bytes per parameter; LoRA parameters are fp32);
    activations of one micro-batch (2 x per-device pairs sequences of max_prompt + max_completion
    tokens): ~34 bytes x tokens x hidden x layers in 16-bit without gradient checkpointing
    (Korthikanti et al. 2022, flash/SDPA attention), layer inputs only with it; the logits and
    their fp32 log-softmax; 1 GiB of CUDA context. The reference model is not loaded (its
    log-probs are precomputed).
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = _model_config(cfg.model)
    if config is None:
        return None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    width = BYTES[cfg.dtype]
    if cfg.lora:
        trainable = sum(
            cfg.lora_r * (m.in_features + m.out_features)
            for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in cfg.lora_target_modules
        )
        trainable_bytes = 4
    else:
        trainable, trainable_bytes = params, width
    state_bytes = 2 if cfg.optimizer == "adamw_8bit" else 2 * trainable_bytes
    hidden, layers = config.hidden_size, config.num_hidden_layers
    tokens = 2 * cfg.per_device_batch_size * (cfg.max_prompt_length + cfg.max_completion_length)
    act = activation_bytes(cfg)
    per_token_layer = act if cfg.gradient_checkpointing else 17 * act  # 34 bytes at 16-bit
    gib = 1024**3
    parts = {
        "weights": params * width / gib,
        "gradients": trainable * trainable_bytes / gib,
        "optimizer": trainable * state_bytes / gib,
        "activations": tokens * hidden * layers * per_token_layer / gib,
        "logits": tokens * config.vocab_size * (act + 8) / gib,
        "cuda_context": 1.0,
    }
    if cfg.lora:
        parts["weights"] += trainable * 4 / gib
    return MemoryEstimate(sum(parts.values()), parts, params, trainable)


def run_steps(cfg: TrainConfig) -> tuple[int | None, int | None, int]:
    """(pairs, optimizer steps, global batch) of one run on one device; None where a size is unknown."""
    rows = count_rows(cfg.dataset)
    global_batch = cfg.per_device_batch_size * cfg.gradient_accumulation_steps
    steps = None
    if rows is not None:
        steps = (rows // global_batch) * cfg.epochs
        if cfg.max_steps > 0:
            steps = min(steps, cfg.max_steps)
    return rows, steps, global_batch
