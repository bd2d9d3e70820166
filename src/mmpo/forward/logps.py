"""Public entry points (``preference_logps``, ``sft_loss``) and the choice of attention layout,
with a one-time exactness probe per model against the padded path."""

from __future__ import annotations

import dataclasses
import warnings
import weakref

import torch

from mmpo.data.order import example_length
from mmpo.forward.layout import sequence_unit, shared_prompt_unit
from mmpo.forward.options import ForwardOptions, PreferenceLogps
from mmpo.forward.padded import completion_rows, padded_preference_logps, padded_sft_loss
from mmpo.forward.scoring import attention_kernel, make_layout, per_sequence, score_layout, unwrap_model
from mmpo.objectives import entropy_surrogate

#: Attention kernels of transformers that apply a custom 4D mask exactly (tests/forward/).
MASK_4D_KERNELS = ("sdpa", "eager")

_warned: set[str] = set()
_probe_results: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _probe_examples(vocab_size: int) -> list[dict]:
    ids = lambda *xs: [1 + (x * 7919) % (vocab_size - 1) for x in xs]  # noqa: E731 - arbitrary in-vocab tokens
    return [
        {"prompt_ids": ids(1, 2, 3, 4), "chosen_ids": ids(5, 6, 7), "rejected_ids": ids(8, 9)},
        {"prompt_ids": ids(10, 11), "chosen_ids": ids(12), "rejected_ids": ids(13, 14, 15, 16, 17)},
    ]


def _probe(model, options: ForwardOptions, pad_token_id: int, attention: str) -> str | None:
    """Why ``attention`` does not give the padded path's numbers on this model, or None when it
    does. Checked once per model and setting on two tiny pairs, without gradients."""
    key = (options.share_prompt, options.packing, attention, attention_kernel(model))
    results = _probe_results.setdefault(model, {})
    if key not in results:
        examples = _probe_examples(unwrap_model(model).config.vocab_size)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                want = padded_preference_logps(
                    model, examples, pad_token_id=pad_token_id, compute_entropy=False, length_normalize=False
                )
                got = fast_preference_logps(
                    model,
                    examples,
                    options,
                    attention,
                    pad_token_id=pad_token_id,
                    compute_entropy=False,
                    length_normalize=False,
                )
            # float32 agrees to ~1e-6 here; 16-bit layouts differ by rounding, so only gross errors count
            tolerance = 1e-4 if next(model.parameters()).dtype in (torch.float32, torch.float64) else 1e-1
            close = all(
                torch.allclose(g.float(), w.float(), rtol=tolerance, atol=tolerance)
                for g, w in ((got.chosen_logps, want.chosen_logps), (got.rejected_logps, want.rejected_logps))
            )
            results[key] = None if close else "its log-probs differ from the padded path's"
        except Exception as err:  # a model that rejects 4D masks, custom positions or extra arguments
            results[key] = f"{err.__class__.__name__}: {err}"
        finally:
            model.train(was_training)
    return results[key]


def choose_attention(model, options: ForwardOptions, pad_token_id: int, longest_sequence: int) -> str:
    """The first of ``ATTENTION_MODES`` that is switched on, allowed and exact for this model."""
    if not (options.packing or options.share_prompt):
        return "padded"
    window = getattr(unwrap_model(model).config, "sliding_window", None)
    if window is not None and longest_sequence > window:  # our mask/plan would replace the window
        _warn_once(f"sequences longer than the model's sliding window ({window}): using the padded layout")
        return "padded"
    kernel = attention_kernel(model)
    candidates = [
        mode
        for mode, allowed in (
            ("segmented", kernel == "sdpa" and options.segmented_attention),
            ("mask", kernel in MASK_4D_KERNELS),
        )
        if allowed
    ]
    if not candidates:
        _warn_once(
            f"attention kernel {kernel!r} cannot take the shared-prompt/packing layout (supported: "
            f"{', '.join(MASK_4D_KERNELS)}); using the padded layout"
        )
        return "padded"
    for mode in candidates:
        reason = _probe(model, options, pad_token_id, mode)
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
