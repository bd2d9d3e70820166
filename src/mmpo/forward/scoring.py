"""Running the model on a layout and scoring the completion tokens through the LM head."""

from __future__ import annotations

import inspect
import warnings
import weakref
from contextlib import contextmanager
from functools import partial

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts
from transformers.modeling_layers import GradientCheckpointingLayer

from mmpo.forward.attention import FLEX, SEGMENTED, attention_selected
from mmpo.forward.flex import flex_block_mask
from mmpo.forward.layout import DEFAULT_ATTENTION_RATIO, Layout, Unit, assign_rows, build_layout
from mmpo.forward.liger import liger_token_logps, why_not_liger
from mmpo.forward.options import ForwardOptions
from mmpo.forward.padded import token_logps_and_entropy

_warned: set[str] = set()


def warn_once(message: str) -> None:
    """A ``RuntimeWarning`` the first time ``message`` comes up in this process."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside DDP/compile/PEFT wrappers (for config, decoder and head)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def attention_kernel(model: torch.nn.Module) -> str | None:
    return getattr(unwrap_model(model).config, "_attn_implementation", None)


def mask_kind(model: torch.nn.Module):
    """The 4D mask the model's attention kernel applies exactly: sdpa takes a boolean mask; eager
    *adds* the mask to the scores, so it needs an additive one (a boolean one silently gives wrong
    numbers there)."""
    return "bool" if attention_kernel(model) == "sdpa" else next(model.parameters()).dtype


def hidden_states(model: torch.nn.Module, layout: Layout) -> torch.Tensor:
    """Final hidden states ``[R, W, d]`` (after the last norm), through the model's own forward.

    The model is called as a whole (so DDP, PEFT and hooks see an ordinary forward) with
    ``logits_to_keep=1``; the decoder's output is taken with a forward hook."""
    base = unwrap_model(model)
    captured = []
    handle = base.get_decoder().register_forward_hook(lambda _m, _i, out: captured.append(out[0]))
    kwargs = dict(input_ids=layout.input_ids, attention_mask=layout.attention_mask, use_cache=False)
    if layout.position_ids is not None:
        kwargs["position_ids"] = layout.position_ids
    ours = None  # our attention function for this call (forward/attention.py), selected for it alone
    if layout.plan is not None:
        ours, kwargs["mmpo_attention_plan"] = SEGMENTED, layout.plan
    elif layout.flex_mask is not None:
        ours, kwargs["mmpo_block_mask"] = FLEX, layout.flex_mask
    if "logits_to_keep" in inspect.signature(base.forward).parameters:
        kwargs["logits_to_keep"] = 1
    try:
        with attention_selected(base, ours, attention_kernel(model)):
            model(**kwargs)
    finally:
        handle.remove()
    return captured[-1]


def _score_chunk(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, with_entropy: bool):
    logps, entropy = token_logps_and_entropy(head(hidden), targets, with_entropy=with_entropy)
    return (logps, entropy) if with_entropy else (logps,)


def score_hidden(
    head: torch.nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    *,
    with_entropy: bool = False,
    chunk_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Target log-probs (and entropies) ``[N]`` of hidden states ``[N, d]`` through the LM head.

    With ``chunk_size > 0`` each chunk's logits are recomputed in the backward pass
    (``torch.utils.checkpoint``) instead of being kept, so at most one chunk of ``[chunk, vocab]``
    float32 logits is alive at any time. Works with any head module (tied, LoRA-wrapped, biased).
    """
    if chunk_size <= 0 or hidden.shape[0] == 0:
        out = _score_chunk(head, hidden, targets, with_entropy)
        return out[0], (out[1] if with_entropy else None)
    needs_graph = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    parts = []
    for start in range(0, hidden.shape[0], chunk_size):
        args = (head, hidden[start : start + chunk_size], targets[start : start + chunk_size], with_entropy)
        parts.append(checkpoint(_score_chunk, *args, use_reentrant=False) if needs_graph else _score_chunk(*args))
    logps = torch.cat([p[0] for p in parts])
    return logps, (torch.cat([p[1] for p in parts]) if with_entropy else None)


# Ops whose outputs selective recompute keeps: everything else in a decoder layer (norms, RoPE,
# activations, residual adds, KV-head repeats) is elementwise and is recomputed from them.
_KEEP_OPS = {
    getattr(torch.ops.aten, name).default
    for name in (
        "mm",
        "addmm",
        "bmm",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
    )
    if hasattr(torch.ops.aten, name)
}
if hasattr(torch.ops.higher_order, "flex_attention"):  # FlexAttention's output too (torch's SAC supports it)
    _KEEP_OPS.add(torch.ops.higher_order.flex_attention)
try:  # a compiled region (our compiled FlexAttention on CUDA) reaches the policy as one op (torch >= 2.1x)
    from torch._higher_order_ops.wrap import inductor_compiled_code

    _KEEP_OPS.add(inductor_compiled_code)
except ImportError:
    pass


def _keep_matmuls(_ctx, op, *_args, **_kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _KEEP_OPS else CheckpointPolicy.PREFER_RECOMPUTE


@contextmanager
def selective_recompute(model: torch.nn.Module, enabled: bool):
    """Selective activation checkpointing of every decoder layer during this forward pass.

    Uses transformers' own checkpointing hook of each layer (``GradientCheckpointingLayer``) with
    torch's selective-checkpoint policy: matmul and attention outputs are saved, the cheap ops
    between them are replayed in the backward pass - same values, about half the activation
    memory, a few percent more time. Layers already under (full) gradient checkpointing are left
    alone; the layers' settings are restored afterwards (the autograd graph keeps what it needs).
    """
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and not m.gradient_checkpointing]
    if not (enabled and layers and model.training and torch.is_grad_enabled()):
        yield
        return
    function = partial(
        checkpoint, use_reentrant=False, context_fn=partial(create_selective_checkpoint_contexts, _keep_matmuls)
    )
    for layer in layers:
        layer.gradient_checkpointing, layer._gradient_checkpointing_func = True, function
    try:
        yield
    finally:
        for layer in layers:
            layer.gradient_checkpointing = False
            del layer._gradient_checkpointing_func


def score_layout(model, layout: Layout, options: ForwardOptions, *, with_entropy: bool):
    with selective_recompute(model, options.selective_recompute):
        hidden = hidden_states(model, layout)
    flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, layout.predictors)
    head = unwrap_model(model).get_output_embeddings()
    if options.liger_head:
        reason = why_not_liger(head, flat, with_entropy)
        if reason is None:
            return liger_token_logps(head, flat, layout.targets), None
        warn_once(f"liger_head: using the chunked LM head instead ({reason})")
    return score_hidden(head, flat, layout.targets, with_entropy=with_entropy, chunk_size=options.logits_chunk_size)


_attention_ratios: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def attention_ratio(model: torch.nn.Module) -> float:
    """``DEFAULT_ATTENTION_RATIO`` scaled to this model: FLOPs of a query-key pair over a token's."""
    if model not in _attention_ratios:
        base = unwrap_model(model)
        config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
        heads = (base.get_input_embeddings(), base.get_output_embeddings())
        embeddings = {id(m.weight): m.weight.numel() for m in heads if m is not None and hasattr(m, "weight")}
        body = sum(p.numel() for p in base.parameters()) - sum(embeddings.values())
        layers, hidden = getattr(config, "num_hidden_layers", None), getattr(config, "hidden_size", None)
        ratio = DEFAULT_ATTENTION_RATIO
        if layers and hidden and body > 0:
            ratio = 1.5 * 2 * layers * hidden / body  # 1.5: attention kernels run below matmul speed on CPU
        _attention_ratios[model] = ratio
    return _attention_ratios[model]


def make_layout(model, units: list[Unit], attention: str, packing: bool, pad_token_id: int) -> Layout:
    packing = packing and attention != "padded"
    ratio = 0.0 if attention in ("segmented", "flex") or not packing else attention_ratio(model)
    rows = assign_rows([len(u.tokens) for u in units], packing, ratio)
    layout = build_layout(
        units,
        rows,
        pad_token_id=pad_token_id,
        device=next(model.parameters()).device,
        mask_kind=mask_kind(model),
        attention=attention,
    )
    if layout.attention == "flex":  # built once here, used by every layer (and by their replays)
        layout.flex_mask = flex_block_mask(layout.segments, layout.branches)
    return layout


def per_sequence(values: torch.Tensor, layout: Layout, num_sequences: int) -> torch.Tensor:
    """Scored values ``[N]`` laid out as ``[sequences, completion length]`` (zeros elsewhere)."""
    width = int(layout.steps.max()) + 1 if layout.steps.numel() else 1
    out = values.new_zeros(num_sequences, width)
    return out.index_put((layout.sequences, layout.steps), values)
