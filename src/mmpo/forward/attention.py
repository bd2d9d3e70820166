"""Segmented attention: transformers' sdpa entry, split into per-block calls when given a plan."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from mmpo.forward.layout import AttentionPlan

_plain_sdpa = None


def sdpa_or_segmented(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout=0.0,
    scaling=None,
    mmpo_attention_plan: AttentionPlan | None = None,
    **kwargs,
):
    """transformers' sdpa attention, unchanged unless the call carries ``mmpo_attention_plan``.

    With a plan, each block is one ``scaled_dot_product_attention`` call on its own queries and
    keys (``is_causal`` for a sequence or a prompt + chosen block; prompt + own keys, bottom-right
    causal, for a rejected block), so no query-key pair outside a sequence is computed at all.
    The plan travels as a keyword argument, so activation recompute replays the same calls."""
    if mmpo_attention_plan is None:
        return _plain_sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    gqa = query.shape[1] != key.shape[1]
    attend = partial(F.scaled_dot_product_attention, dropout_p=dropout, scale=scaling, enable_gqa=gqa)
    rows = []
    for r, blocks in enumerate(mmpo_attention_plan.rows):
        pieces = []
        for block in blocks:
            q = query[r : r + 1, :, block.start : block.end]
            k, v = key[r : r + 1, :, block.start : block.end], value[r : r + 1, :, block.start : block.end]
            if block.prefix is None:
                pieces.append(attend(q, k, v, is_causal=True))
            else:
                start, end = block.prefix
                k = torch.cat([key[r : r + 1, :, start:end], k], dim=2)
                v = torch.cat([value[r : r + 1, :, start:end], v], dim=2)
                pieces.append(attend(q, k, v, attn_mask=block.mask))
        filled = blocks[-1].end if blocks else 0
        if filled < query.shape[2]:  # padding: zeros, never read
            pieces.append(query.new_zeros(1, query.shape[1], query.shape[2] - filled, value.shape[-1]))
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows).transpose(1, 2).contiguous(), None


def install_segmented_attention() -> None:
    """Route transformers' ``"sdpa"`` attention through ``sdpa_or_segmented`` (once per process).

    Calls without a plan go to the original function with the same arguments, so every other
    use of sdpa in the process is unchanged."""
    global _plain_sdpa
    if _plain_sdpa is None:
        from transformers import AttentionInterface
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        _plain_sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
        AttentionInterface.register("sdpa", sdpa_or_segmented)
