"""Our attention functions: selected for our calls only, replayed correctly under activation
checkpointing, and FlexAttention's mask (the CUDA path) equal to the dense mask.

FlexAttention has no backward pass on CPU in torch 2.13, so here its forward is checked (log-probs
without gradients); its gradients are checked on a GPU by ``benchmarks/gpu_check.sh``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from forward.exactness import assert_grads_close, assert_logps_close, encode_pairs, loss_and_grads, sensitive_llama
from torch.nn.attention.flex_attention import create_mask
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_layers import GradientCheckpointingLayer

import mmpo.forward.attention as attention
import mmpo.forward.scoring as scoring
from mmpo.forward import ForwardOptions, preference_logps, sft_loss
from mmpo.forward import layout as layouts
from mmpo.forward.flex import flex_block_mask, layout_mask_mod
from mmpo.forward.logps import attention_candidates, fast_preference_logps

SHARED_PACKED = ForwardOptions(share_prompt=True, packing=True, logits_chunk_size=4)


@pytest.fixture(autouse=True)
def quiet_eager_flex():
    """Eager FlexAttention warns that it is unfused: expected on CPU, where only its mask is tested."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        yield


def mixed_units():
    """Two shared-prompt pairs and a plain sequence, packed so that one row has padding."""
    units = [
        layouts.shared_prompt_unit([1, 2, 3], [4, 5], [6, 7, 8, 9], 0, 3),
        layouts.sequence_unit([1, 2, 3, 4, 5, 6], [-100] * 3 + [4, 5, 6], 1),
        layouts.shared_prompt_unit([1], [2, 3, 4, 5, 6], [7], 2, 3),
    ]
    return units, [[0, 2], [1]]


# --------------------------------------------------------------------------------------------
# Selected for our calls only


def test_our_forward_leaves_transformers_registry_and_other_models_alone(tokenizer):
    examples, pad = encode_pairs(tokenizer), tokenizer.pad_token_id
    ours, outside = sensitive_llama(tokenizer, "sdpa"), sensitive_llama(tokenizer, "sdpa")
    batch = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, pad, pad, pad]])
    mask = (batch != pad).long()
    with torch.no_grad():
        before = outside(input_ids=batch, attention_mask=mask).logits

    _, _, _ = loss_and_grads(ours, examples, "dpo", SHARED_PACKED, pad)  # our segmented attention, with backward

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_attention_forward
    assert transformers.AttentionInterface._global_mapping["sdpa"] is sdpa_attention_forward
    assert ALL_ATTENTION_FUNCTIONS[attention.SEGMENTED] is attention.segmented_attention  # ours, under its own name
    assert ours.config._attn_implementation == "sdpa" and outside.config._attn_implementation == "sdpa"
    with torch.no_grad():
        after = outside(input_ids=batch, attention_mask=mask).logits
        ours_plain = ours(input_ids=batch, attention_mask=mask).logits
        eager = sensitive_llama(tokenizer, "eager")(input_ids=batch, attention_mask=mask).logits
    real = mask.bool()
    assert torch.equal(after, before)  # bit for bit: the same function ran
    torch.testing.assert_close(ours_plain[real], before[real], rtol=1e-5, atol=1e-5)  # same weights, same result
    torch.testing.assert_close(before[real], eager[real], rtol=1e-4, atol=1e-4)  # and it is real attention


def test_selection_is_undone_when_the_forward_fails(tokenizer):
    model = sensitive_llama(tokenizer)
    with pytest.raises(RuntimeError, match="boom"), attention.attention_selected(model, attention.SEGMENTED):
        assert model.config._attn_implementation == attention.SEGMENTED
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_checkpoint_replay_runs_our_attention_again(tokenizer, monkeypatch, recompute):
    """Activation checkpointing replays each layer in the backward pass, after our call returned:
    the replay must select our attention again, or its gradients silently differ."""
    model = sensitive_llama(tokenizer)
    if recompute == "full":
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    options = ForwardOptions(
        share_prompt=True, packing=True, logits_chunk_size=0, selective_recompute=recompute == "selective"
    )
    examples, pad = encode_pairs(tokenizer), tokenizer.pad_token_id
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    own = [layer.__dict__.get("_gradient_checkpointing_func") for layer in layers]
    want_logps, _, want_grads = loss_and_grads(model, examples, "mmpo", None, pad)
    assert attention_candidates(model, options)[0] == "segmented"
    got_logps, _, got_grads = loss_and_grads(model, examples, "mmpo", options, pad)
    assert_logps_close(got_logps, want_logps)
    assert_grads_close(got_grads, want_grads)
    assert [layer.__dict__.get("_gradient_checkpointing_func") for layer in layers] == own  # restored
    # without the replay wrapper the backward pass runs plain sdpa on our layout: the replay
    # breaks (torch notices it differs) or the gradients do
    monkeypatch.setattr(attention, "_replaying_under", lambda function, configs, name: function)
    try:
        _, _, wrong = loss_and_grads(model, examples, "mmpo", options, pad)
    except RuntimeError:  # torch's CheckpointError is one
        return
    assert any(not torch.allclose(wrong[n], want_grads[n], rtol=1e-3, atol=1e-6) for n in want_grads)


def test_probe_refuses_a_mode_whose_gradients_alone_differ(tokenizer):
    """Log-probs right, gradients halved: only the probe's gradient check can tell."""
    from mmpo.forward.logps import choose_attention

    def half_gradient(*args, **kwargs):
        out, _ = attention.segmented_attention(*args, **kwargs)
        return out.detach() + 0.5 * (out - out.detach()), None

    model = sensitive_llama(tokenizer).train()
    attention.register_attention_functions()
    transformers.AttentionInterface.register(attention.SEGMENTED, half_gradient)
    scoring._warned.clear()
    try:
        with pytest.warns(RuntimeWarning, match="'segmented' attention is not exact.*gradients differ"):
            assert choose_attention(model, ForwardOptions(), tokenizer.pad_token_id, 50) == "mask"
    finally:
        transformers.AttentionInterface.register(attention.SEGMENTED, attention.segmented_attention)
    assert (
        choose_attention(sensitive_llama(tokenizer).train(), ForwardOptions(), tokenizer.pad_token_id, 50)
        == "segmented"
    )


def test_probe_runs_in_float32_inside_accelerates_mixed_precision(tokenizer):
    """Accelerate's bf16 mixed precision wraps the model's forward in autocast: the probe must
    still compare in float32, or bf16 rounding would make every fast layout look inexact."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from mmpo.forward.logps import choose_attention

    AcceleratorState._reset_state(reset_partial_state=True)  # one state per process: earlier tests made one
    model = Accelerator(mixed_precision="bf16", cpu=True).prepare(sensitive_llama(tokenizer).train())
    assert "_original_forward" in model.__dict__  # the wrapper this is about
    wrapped = model.__dict__["forward"]
    scoring._warned.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "not exact" fallback
        assert choose_attention(model, ForwardOptions(), tokenizer.pad_token_id, 50) == "segmented"
    assert model.__dict__["forward"] is wrapped  # training goes on under its autocast
    AcceleratorState._reset_state(reset_partial_state=True)


def test_attention_candidates_per_device_and_setting(tokenizer):
    model = sensitive_llama(tokenizer)
    on = ForwardOptions()
    assert attention_candidates(model, on) == ["segmented", "mask"]  # CPU: no FlexAttention
    assert attention_candidates(model, ForwardOptions(segmented_attention=False)) == ["mask"]
    assert attention_candidates(sensitive_llama(tokenizer, "eager"), on) == ["mask"]
    cuda = torch.device("cuda")
    assert attention_candidates(model, on, device=cuda) == ["flex", "segmented", "mask"]
    assert attention_candidates(model, ForwardOptions(flex_attention=False), device=cuda) == ["segmented", "mask"]
    flex_kernel = sensitive_llama(tokenizer, "flex_attention")  # transformers' own flex: ours replace it too
    assert attention_candidates(flex_kernel, on, device=cuda) == ["flex", "segmented"]
    model.config.attention_dropout = 0.1  # FlexAttention has no dropout
    assert attention_candidates(model, on, device=cuda) == ["segmented", "mask"]


# --------------------------------------------------------------------------------------------
# FlexAttention: the mask and the forward pass


def test_flex_mask_mod_equals_the_dense_mask_element_by_element():
    units, rows = mixed_units()
    layout = layouts.build_layout(units, rows, pad_token_id=0, device="cpu", mask_kind="bool", attention="flex")
    dense = layouts.block_mask(layout.segments, layout.branches, "bool")  # [R, 1, W, W]
    assert layout.attention == "flex" and layout.plan is None
    R, W = layout.segments.shape
    got = create_mask(layout_mask_mod(layout.segments, layout.branches), R, 1, W, W, device="cpu")
    assert got.shape == dense.shape and torch.equal(got, dense)
    assert (layout.segments == -1).any()  # padding is part of what was compared
    assert not dense.all() and dense[:, 0].diagonal(dim1=1, dim2=2).all()
    block = flex_block_mask(layout.segments, layout.branches)
    assert block.shape == (R, 1, W, W)


def test_flex_forward_gives_the_padded_log_probs(tokenizer):
    model = sensitive_llama(tokenizer).eval()
    examples, pad = encode_pairs(tokenizer), tokenizer.pad_token_id
    kwargs = dict(pad_token_id=pad, compute_entropy=True, length_normalize=False)
    with torch.no_grad():
        want = preference_logps(model, examples, pad_token_id=pad, compute_entropy=True)
        for options in (
            SHARED_PACKED,
            ForwardOptions(share_prompt=True, packing=False),
            ForwardOptions(share_prompt=False, packing=True),
        ):
            got = fast_preference_logps(model, examples, options, "flex", **kwargs)
            assert_logps_close(got, want)
        # a wrong rule is caught: rejected tokens that may see the chosen ones
        wrong = layouts.build_layout
        with pytest.MonkeyPatch.context() as patch:

            def chosen_visible(*args, **kw):
                layout = wrong(*args, **kw)
                layout.branches = torch.zeros_like(layout.branches)  # every token "shared"
                return layout

            patch.setattr(scoring, "build_layout", chosen_visible)
            bad = fast_preference_logps(model, examples, SHARED_PACKED, "flex", **kwargs)
        assert float((bad.rejected_logps - want.rejected_logps).abs().max()) > 1e-2
    assert model.config._attn_implementation == "sdpa"


def test_flex_forward_under_bf16_autocast_is_close_to_the_padded_one(tokenizer):
    """Rotary embeddings leave query/key in float32 and value in bf16 under autocast; the flex path
    casts them to the autocast dtype like sdpa's autocast does."""
    model = sensitive_llama(tokenizer).eval()
    examples, pad = encode_pairs(tokenizer), tokenizer.pad_token_id
    kwargs = dict(pad_token_id=pad, compute_entropy=False, length_normalize=False)
    with torch.no_grad():
        exact = preference_logps(model, examples, pad_token_id=pad)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            padded = preference_logps(model, examples, pad_token_id=pad)
            flex = fast_preference_logps(model, examples, SHARED_PACKED, "flex", **kwargs)
    padded_error = float((padded.chosen_logps - exact.chosen_logps).abs().max())
    flex_error = float((flex.chosen_logps - exact.chosen_logps).abs().max())
    assert 0 < padded_error and flex_error <= 3 * padded_error + 1e-3


def test_sft_through_flex_forward(tokenizer):
    model = sensitive_llama(tokenizer).eval()
    examples = [
        {"input_ids": ex["prompt_ids"] + ex["chosen_ids"], "labels": [-100] * len(ex["prompt_ids"]) + ex["chosen_ids"]}
        for ex in encode_pairs(tokenizer)
    ]
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        want, _, _ = sft_loss(model, examples, pad_token_id=pad)
        layout = scoring.make_layout(
            model,
            [layouts.sequence_unit(ex["input_ids"], ex["labels"], i) for i, ex in enumerate(examples)],
            "flex",
            True,
            pad,
        )
        assert layout.flex_mask is not None and layout.input_ids.shape[0] == 1  # everything in one row
        logps, _ = scoring.score_layout(model, layout, ForwardOptions(), with_entropy=False)
    torch.testing.assert_close(-logps.sum() / logps.numel(), want, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Liger (CUDA only): the option falls back, saying why


def test_liger_head_falls_back_to_the_chunked_head_with_one_warning(tokenizer):
    model = sensitive_llama(tokenizer)
    examples, pad = encode_pairs(tokenizer), tokenizer.pad_token_id
    want = preference_logps(model, examples, pad_token_id=pad, options=SHARED_PACKED)
    scoring._warned.clear()
    with pytest.warns(RuntimeWarning, match="liger_head: using the chunked LM head instead"):
        got = preference_logps(
            model,
            examples,
            pad_token_id=pad,
            options=ForwardOptions(share_prompt=True, packing=True, logits_chunk_size=4, liger_head=True),
        )
    assert_logps_close(got, want)
