"""Optional: target log-probs through Liger-Kernel's fused linear cross-entropy (CUDA, where installed).

Liger fuses the LM-head matmul with the log-softmax, chunk by chunk, so no logits are kept. Its
per-token form (``reduction="none"``) propagates per-token gradients correctly from version
0.8.5 on (earlier versions scaled the summed weight gradient, which is wrong for DPO-style
losses), so older versions are not used. Only a plain ``nn.Linear`` head qualifies (a LoRA-wrapped
head has no single weight) and only without the entropy term (Liger returns no entropy).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util

import torch

MIN_LIGER_VERSION = (0, 8, 5)


@functools.cache
def liger_version() -> tuple[int, ...] | None:
    """The installed liger-kernel's version, or None when it is not installed."""
    if importlib.util.find_spec("liger_kernel") is None:
        return None
    parts = []
    for piece in importlib.metadata.version("liger-kernel").split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def why_not_liger(head: torch.nn.Module, hidden: torch.Tensor, with_entropy: bool) -> str | None:
    """Why the fused head cannot score here (None: it can)."""
    version = liger_version()
    if version is None:
        return "liger-kernel is not installed"
    if version < MIN_LIGER_VERSION:
        return f"liger-kernel {'.'.join(map(str, version))} is older than 0.8.5 (wrong per-token gradients)"
    if hidden.device.type != "cuda":
        return "Liger's kernels run on CUDA only"
    if with_entropy:
        return "the entropy term needs the full distribution, which Liger does not return"
    if type(head) is not torch.nn.Linear:
        return f"the LM head is a {type(head).__name__}, not a plain Linear layer"
    return None


def liger_token_logps(head: torch.nn.Linear, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Log-prob of each target ``[N]`` from hidden states ``[N, d]`` through ``head``."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    weight, bias = head.weight, head.bias
    if torch.is_autocast_enabled("cuda"):  # what autocast gives head(hidden): the matmul in the autocast dtype
        dtype = torch.get_autocast_dtype("cuda")
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    losses = liger_fused_linear_cross_entropy(
        hidden.contiguous(), weight, targets, bias, reduction="none", accum_dtype=torch.float32
    )
    return -losses.float()
