"""FlexAttention for the packed and shared-prompt layouts (the CUDA path).

The layout's rule (a query sees a key of its own unit, not after it, on the shared part or its own
branch; padding sees itself) is written once as a ``mask_mod`` over the layout's segment and
branch tensors; ``create_block_mask`` turns it into a block-sparse mask once per micro-batch, and
every layer's attention is one fused kernel call that skips the blocks nobody attends to. The
kernel is compiled on CUDA; elsewhere torch's eager FlexAttention runs (its forward only: torch
2.13 has no CPU backward), which is what the CPU tests use to check the mask.
"""

from __future__ import annotations

import functools

import torch

from mmpo.forward.layout import SHARED


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def layout_mask_mod(segments: torch.Tensor, branches: torch.Tensor):
    """The layout's visibility rule as a FlexAttention ``mask_mod``: the same rule, element by
    element, as ``layout.block_mask`` (``segments``/``branches``: ``[rows, width]``)."""

    def mask_mod(b, h, q_idx, kv_idx):
        segment_q, segment_kv = segments[b, q_idx], segments[b, kv_idx]
        branch_q, branch_kv = branches[b, q_idx], branches[b, kv_idx]
        same_unit = (segment_q == segment_kv) & (segment_kv >= 0)
        visible_branch = (branch_kv == SHARED) | (branch_kv == branch_q)
        return (same_unit & (kv_idx <= q_idx) & visible_branch) | (q_idx == kv_idx)

    return mask_mod


def flex_block_mask(segments: torch.Tensor, branches: torch.Tensor):
    """The micro-batch's ``BlockMask`` (one per forward pass, shared by every layer)."""
    from torch.nn.attention.flex_attention import create_block_mask

    rows, width = segments.shape
    # compiled on CUDA, as transformers does: the eager builder materializes [rows, width, width] indices
    return create_block_mask(
        layout_mask_mod(segments, branches),
        B=rows,
        H=None,
        Q_LEN=width,
        KV_LEN=width,
        device=segments.device,
        _compile=segments.device.type == "cuda",
    )


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    # dynamic from the first call: every micro-batch has its own width, and a static graph replaced
    # by a dynamic one could be picked differently by an activation-checkpoint replay
    return torch.compile(flex_attention, dynamic=True)


def flex_kernel(device_type: str):
    """The fused (compiled) kernel on CUDA; torch's eager FlexAttention elsewhere."""
    if device_type == "cuda":
        return _compiled_flex_attention()
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


def flex_layout_attention(query, key, value, block_mask, *, dropout: float = 0.0, scaling: float | None = None):
    """``[B, heads, W, d]`` inputs -> ``[B, W, heads, d]`` output (transformers' attention layout).

    Under autocast the inputs are cast to the autocast dtype first (what autocast does for sdpa;
    rotary embeddings can leave query and key in float32 while value is bf16)."""
    if dropout:
        raise ValueError(
            f"FlexAttention has no attention dropout (got {dropout}): set the model's attention_dropout to 0"
        )
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = torch.promote_types(torch.promote_types(query.dtype, key.dtype), value.dtype)
    query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    with torch.autocast(device_type, enabled=False):
        out = flex_kernel(device_type)(
            query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=query.shape[1] != key.shape[1]
        )
    return out.transpose(1, 2).contiguous(), None
