"""The two data types of the forward API: which exact speed-ups to use, and what a pass returns."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from mmpo.config.training import ConfigError


@dataclass
class PreferenceLogps:
    """Per-pair results of one forward pass over chosen and rejected completions."""

    chosen_logps: torch.Tensor  # [B] summed completion log-probs
    rejected_logps: torch.Tensor  # [B]
    chosen_lengths: torch.Tensor  # [B] completion token counts
    rejected_lengths: torch.Tensor  # [B]
    chosen_entropy: torch.Tensor | None = None  # [B] entropy surrogate (docs/objectives.md B.2) when asked for
    rejected_entropy: torch.Tensor | None = None
    num_tokens: int = 0  # non-padding tokens that went through the model

    def means(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token mean log-probs (the length-normalization ablation, SimPO)."""
        return (
            self.chosen_logps / self.chosen_lengths.clamp(min=1),
            self.rejected_logps / self.rejected_lengths.clamp(min=1),
        )


@dataclass(frozen=True)
class ForwardOptions:
    """Which exact speed-ups the forward pass uses (the config's ``# forward pass (speed)`` keys)."""

    share_prompt: bool = True
    """Preference pairs: prompt + chosen + rejected as one sequence, the prompt computed once."""
    packing: bool = True
    """Several sequences per row, without padding between them."""
    logits_chunk_size: int = 256
    """Tokens scored per LM-head chunk (0: all scored positions at once, still only those)."""
    selective_recompute: bool = True
    """Keep only matmul and attention outputs for the backward pass; recompute the elementwise rest."""
    segmented_attention: bool = True
    """With sdpa: attend block by block (one call per sequence part) instead of one dense masked call."""
    flex_attention: bool = True
    """With sdpa on CUDA: FlexAttention with a block-sparse mask built once per micro-batch (before segmented)."""
    liger_head: bool = False
    """Score through Liger-Kernel's fused linear cross-entropy where it applies (CUDA, liger-kernel>=0.8.5
    installed, a plain Linear head, no entropy term); the chunked LM head otherwise, with a warning once."""

    def __post_init__(self):
        if self.logits_chunk_size < 0:
            raise ConfigError(
                f"config key 'logits_chunk_size': must be >= 0 (0: no chunking) (got {self.logits_chunk_size})"
            )

    @classmethod
    def from_config(cls, cfg) -> ForwardOptions:
        """Options of a ``TrainConfig``/``SFTConfig`` (fields missing on the config keep the default)."""
        default = cls()
        return cls(**{f.name: getattr(cfg, f.name, getattr(default, f.name)) for f in dataclasses.fields(cls)})
