"""Our attention functions, registered with transformers under their own names and selected only
while our forward pass (and its replay in the backward pass) runs.

transformers looks the attention function up by ``config._attn_implementation`` at every call, so
``attention_selected`` points the model's config at ``mmpo_segmented`` or ``mmpo_flex`` for the
duration of one of our forward calls and restores it afterwards. Nothing of transformers' own
registry is replaced: ``"sdpa"`` and every other entry stay what they are, for every other model
and call in the process. Layers under (selective or full) activation checkpointing replay their
forward in the backward pass, after our call has returned; their checkpoint function is wrapped
for the duration of the call so that the replay selects our function again.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from transformers.modeling_layers import GradientCheckpointingLayer

from mmpo.forward.flex import flex_layout_attention
from mmpo.forward.layout import AttentionPlan

SEGMENTED = "mmpo_segmented"
FLEX = "mmpo_flex"


def plain_sdpa(module, query, key, value, attention_mask, **kwargs):
    """transformers' own sdpa function (looked up at call time: whatever is registered as "sdpa")."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)


def segmented_attention(
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
    """One ``scaled_dot_product_attention`` call per block of the plan.

    ``is_causal`` for a sequence or a prompt + chosen block; prompt + own keys, bottom-right
    causal, for a rejected block; so no query-key pair outside a sequence is computed at all.
    The plan travels as a keyword argument, so activation recompute replays the same calls.
    Without a plan (a call that is not ours) this is transformers' sdpa, unchanged."""
    if mmpo_attention_plan is None:
        return plain_sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
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
            dtype = pieces[0].dtype if pieces else query.dtype  # sdpa's output dtype (bf16 under autocast)
            pieces.append(query.new_zeros(1, query.shape[1], query.shape[2] - filled, value.shape[-1], dtype=dtype))
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows).transpose(1, 2).contiguous(), None


def flex_attention_or_sdpa(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, mmpo_block_mask=None, **kwargs
):
    """FlexAttention with the micro-batch's block mask; transformers' sdpa for calls that are not ours."""
    if mmpo_block_mask is None:
        return plain_sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    return flex_layout_attention(query, key, value, mmpo_block_mask, dropout=dropout, scaling=scaling)


_registered = False


def register_attention_functions() -> None:
    """Add ``mmpo_segmented`` and ``mmpo_flex`` to transformers' attention registry (once)."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(SEGMENTED, segmented_attention)
        AttentionInterface.register(FLEX, flex_attention_or_sdpa)
        _registered = True


def attention_configs(model: torch.nn.Module, kernel: str) -> list:
    """The distinct model configs whose ``_attn_implementation`` is ``kernel`` (what the attention
    modules read to find their function; a composite model may have several)."""
    configs = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "_attn_implementation", None) == kernel:
            configs[id(config)] = config
    return list(configs.values())


@contextmanager
def implementation_set(configs: list, name: str) -> Iterator[None]:
    """``configs`` name ``name`` as their attention implementation inside the block (restored after).

    The dict form sets a config alone, not its sub-configs (transformers' setter protocol)."""
    saved = [config._attn_implementation for config in configs]
    for config in configs:
        config._attn_implementation = {"": name}
    try:
        yield
    finally:
        for config, value in zip(configs, saved):
            config._attn_implementation = {"": value}


def _call_under(configs: list, name: str, function, *args, **kwargs):
    with implementation_set(configs, name):
        return function(*args, **kwargs)


def _replaying_under(checkpoint_function, configs: list, name: str):
    """A layer's checkpoint function whose forward (first run and backward-pass replay alike)
    runs with ``name`` selected."""

    def run(function, *args, **kwargs):
        return checkpoint_function(partial(_call_under, configs, name, function), *args, **kwargs)

    return run


_MISSING = object()


@contextmanager
def attention_selected(model: torch.nn.Module, name: str | None, kernel: str = "sdpa") -> Iterator[None]:
    """Run ``model`` with our attention function ``name`` instead of ``kernel`` inside the block.

    ``name=None`` changes nothing. Layers that are under activation checkpointing when the block
    starts get a checkpoint function that selects ``name`` again when the backward pass replays
    them; their own function is put back when the block ends (the autograd graph keeps ours)."""
    if name is None:
        yield
        return
    register_attention_functions()
    configs = attention_configs(model, kernel)
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    own = [layer.__dict__.get("_gradient_checkpointing_func", _MISSING) for layer in layers]
    for layer in layers:
        layer._gradient_checkpointing_func = _replaying_under(layer._gradient_checkpointing_func, configs, name)
    try:
        with implementation_set(configs, name):
            yield
    finally:
        for layer, function in zip(layers, own):
            if function is _MISSING:
                del layer._gradient_checkpointing_func
            else:
                layer._gradient_checkpointing_func = function


def replay_is_covered(model: torch.nn.Module) -> bool:
    """Whether every checkpointed forward of ``model`` goes through transformers' per-layer hook
    (which ``attention_selected`` wraps); a model with its own checkpointing would replay its
    layers with the restored attention function, so ours must not be used there."""
    flag = (
        "is_activation_checkpointing"
        if hasattr(type(model), "is_activation_checkpointing")
        else "is_gradient_checkpointing"
    )  # the newer name (transformers 5.2x) first: the old one warns
    checkpointing = bool(getattr(model, flag, False))
    return not checkpointing or any(isinstance(m, GradientCheckpointingLayer) for m in model.modules())
