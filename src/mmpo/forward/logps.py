"""Public entry points (``preference_logps``, ``sft_loss``) and the choice of attention layout,
with a one-time exactness probe per model against the padded path."""

from __future__ import annotations

import dataclasses

import torch

from mmpo.data.order import example_length
from mmpo.forward.attention import replay_is_covered
from mmpo.forward.flex import flex_available
from mmpo.forward.layout import sequence_unit, shared_prompt_unit
from mmpo.forward.options import ForwardOptions, PreferenceLogps
from mmpo.forward.padded import completion_rows, padded_preference_logps, padded_sft_loss
from mmpo.forward.probe import probe
from mmpo.forward.scoring import attention_kernel, make_layout, per_sequence, score_layout, unwrap_model
from mmpo.forward.scoring import warn_once as _warn_once
from mmpo.objectives import entropy_surrogate

#: Attention kernels of transformers that apply a custom 4D mask exactly (tests/forward/).
MASK_4D_KERNELS = ("sdpa", "eager")
#: Models set to these kernels run our attention functions (flex, segmented) during our calls.
OUR_ATTENTION_KERNELS = ("sdpa", "flex_attention")


def without_ddp(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP-style wrappers: the probe's backward must not start their gradient sync."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def attention_candidates(model, options: ForwardOptions, device: torch.device | None = None) -> list[str]:
    """The attention modes worth probing for ``model``, fastest first: FlexAttention on CUDA,
    segmented sdpa (the CPU path), a dense 4D mask. Ours (flex, segmented) replace transformers'
    sdpa only for our calls, so they need the model to run sdpa and its checkpointed layers to
    replay through transformers' per-layer hook (forward/attention.py)."""
    base = unwrap_model(model)
    ours = attention_kernel(model) in OUR_ATTENTION_KERNELS and replay_is_covered(base)
    on_cuda = (device or next(model.parameters()).device).type == "cuda"
    no_dropout = not getattr(base.config, "attention_dropout", 0.0)  # FlexAttention has none
    allowed = (
        ("flex", ours and on_cuda and options.flex_attention and no_dropout and flex_available()),
        ("segmented", ours and options.segmented_attention),
        ("mask", attention_kernel(model) in MASK_4D_KERNELS),
    )
    return [mode for mode, ok in allowed if ok]


def choose_attention(model, options: ForwardOptions, pad_token_id: int, longest_sequence: int) -> str:
    """The first of ``ATTENTION_MODES`` that is switched on, allowed and exact for this model."""
    if not (options.packing or options.share_prompt):
        return "padded"
    window = getattr(unwrap_model(model).config, "sliding_window", None)
    if window is not None and longest_sequence > window:  # our mask/plan would replace the window
        _warn_once(f"sequences longer than the model's sliding window ({window}): using the padded layout")
        return "padded"
    kernel = attention_kernel(model)
    candidates = attention_candidates(model, options)
    if not candidates:
        _warn_once(
            f"attention kernel {kernel!r} cannot take the shared-prompt/packing layout (supported: "
            f"{', '.join(MASK_4D_KERNELS)}); using the padded layout"
        )
        return "padded"
    for mode in candidates:
        reason = probe(without_ddp(model), options, pad_token_id, mode, fast_preference_logps)
        if reason is None:
            return mode
        fallback = "padded layout" if mode == candidates[-1] else f"{candidates[-1]!r} attention"
        _warn_once(
            f"{type(unwrap_model(model)).__name__} with attention {kernel!r}: {mode!r} attention is not exact "
            f"for this model ({reason}); using the {fallback}"
        )
    return "padded"


# --------------------------------------------------------------------------------------------
# Public entry points


def fast_preference_logps(
    model, examples, options: ForwardOptions, attention: str, *, pad_token_id, compute_entropy, length_normalize
) -> PreferenceLogps:
    batch = len(examples)
    if options.share_prompt and attention != "padded":
        units = [
            shared_prompt_unit(ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"], i, batch)
            for i, ex in enumerate(examples)
        ]
    else:
        rows, prompt_lengths = completion_rows(examples)
        units = [sequence_unit(row, [-100] * p + row[p:], i) for i, (row, p) in enumerate(zip(rows, prompt_lengths))]
    layout = make_layout(model, units, attention, options.packing, pad_token_id)
    token_logps, entropy = score_layout(model, layout, options, with_entropy=compute_entropy)
    per_token = per_sequence(token_logps, layout, 2 * batch)
    sums = per_token.sum(-1)
    counts = torch.bincount(layout.sequences, minlength=2 * batch)
    result = PreferenceLogps(
        chosen_logps=sums[:batch],
        rejected_logps=sums[batch:],
        chosen_lengths=counts[:batch],
        rejected_lengths=counts[batch:],
        num_tokens=layout.num_tokens,
    )
    if compute_entropy:
        mask = per_sequence(torch.ones_like(token_logps), layout, 2 * batch)
        surrogate = entropy_surrogate(
            per_sequence(entropy, layout, 2 * batch), per_token, mask, length_normalize=length_normalize
        )
        result.chosen_entropy, result.rejected_entropy = surrogate[:batch], surrogate[batch:]
    return result


def preference_logps(
    model: torch.nn.Module,
    examples: list[dict],
    *,
    pad_token_id: int,
    compute_entropy: bool = False,
    length_normalize: bool = False,
    options: ForwardOptions | None = None,
) -> PreferenceLogps:
    """Summed completion log-probs of chosen and rejected for each example.

    Without ``options``: the plain padded path - chosen and rejected rows go through the model as
    one ``[2B, T]`` batch, right-padded. The token at position ``t`` is scored by the logits at
    ``t - 1``; only completion tokens (including the closing end-of-turn token) count. With
    ``options``: the same numbers through the faster layouts (module docstring).
    """
    kwargs = dict(pad_token_id=pad_token_id, compute_entropy=compute_entropy, length_normalize=length_normalize)
    if options is None:
        return padded_preference_logps(model, examples, **kwargs)
    longest = max(example_length(ex) for ex in examples)
    attention = choose_attention(model, options, pad_token_id, longest)
    return fast_preference_logps(model, examples, options, attention, **kwargs)


def sft_loss(
    model: torch.nn.Module, examples: list[dict], *, pad_token_id: int, options: ForwardOptions | None = None
) -> tuple[torch.Tensor, int, int]:
    """Mean cross-entropy over assistant tokens of a micro-batch; also (target tokens, all tokens).

    Without ``options`` the plain padded path; with them, packing and chunked log-probs.
    """
    if options is None:
        return padded_sft_loss(model, examples, pad_token_id=pad_token_id)
    units = [sequence_unit(ex["input_ids"], ex["labels"], i) for i, ex in enumerate(examples)]
    options = dataclasses.replace(options, share_prompt=False)  # nothing to share in SFT
    attention = choose_attention(model, options, pad_token_id, max(len(ex["input_ids"]) for ex in examples))
    layout = make_layout(model, units, attention, options.packing, pad_token_id)
    token_logps, _ = score_layout(model, layout, options, with_entropy=False)
    num_targets = int(layout.targets.numel())
    loss = -token_logps.sum() / max(num_targets, 1)
    return loss, num_targets, layout.num_tokens
