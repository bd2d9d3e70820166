"""Exactness of the fast forward paths against the plain padded path.

Every optimized layout (shared prompt, packing, chunked log-probs, and their combinations) must
give the padded path's per-sequence log-probs to 1e-5 and, through each objective (MMPO, DPO,
SimPO) and the entropy term, the same parameter gradients to 1e-4 relative - on every attention
kernel the fast paths accept, for a plain and a LoRA (PEFT) model, and for SFT.

The tiny Llama's weights are scaled up (std 0.3 instead of 0.02) so that attention and position
actually move the log-probs: with near-zero weights a wrong mask would go unnoticed.
``test_a_wrong_mask_is_caught`` checks that sensitivity.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from forward.exactness import (
    assert_grads_close,
    assert_logps_close,
    encode_pairs,
    loss_and_grads,
    sensitive_llama,
)

import mmpo.forward.logps as logps_module
import mmpo.forward.scoring as scoring_module
from mmpo.data.order import length_grouped_order
from mmpo.forward import ForwardOptions, attention, preference_logps, score_hidden, sft_loss
from mmpo.forward import layout as layouts

KERNELS = ["sdpa", "eager"]
FAST_OPTIONS = {
    "chunked-only": ForwardOptions(share_prompt=False, packing=False, logits_chunk_size=3, selective_recompute=False),
    "recompute-only": ForwardOptions(share_prompt=False, packing=False, logits_chunk_size=0),
    "shared-prompt": ForwardOptions(share_prompt=True, packing=False, logits_chunk_size=0),
    "packed": ForwardOptions(share_prompt=False, packing=True, logits_chunk_size=5),
    "shared+packed+chunked": ForwardOptions(share_prompt=True, packing=True, logits_chunk_size=4),
    "dense-mask": ForwardOptions(share_prompt=True, packing=True, segmented_attention=False, logits_chunk_size=4),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one thread is faster than two fighting over a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# Exactness: log-probs and gradients, every layout x kernel x objective


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("objective", ["mmpo", "dpo", "simpo", "entropy"])
def test_fast_layouts_match_padded_path(tokenizer, kernel, objective):
    model = sensitive_llama(tokenizer, kernel)
    examples = encode_pairs(tokenizer)
    pad = tokenizer.pad_token_id
    want_logps, want_loss, want_grads = loss_and_grads(model, examples, objective, None, pad)
    for label, options in FAST_OPTIONS.items():
        got_logps, got_loss, got_grads = loss_and_grads(model, examples, objective, options, pad)
        assert_logps_close(got_logps, want_logps)
        torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6, msg=f"{label}: loss")
        assert_grads_close(got_grads, want_grads)


def test_length_normalized_entropy_matches(tokenizer):
    model = sensitive_llama(tokenizer)
    examples, pad = encode_pairs(tokenizer), tokenizer.pad_token_id
    want_logps, _, want_grads = loss_and_grads(model, examples, "entropy", None, pad, length_normalize=True)
    got_logps, _, got_grads = loss_and_grads(
        model, examples, "entropy", FAST_OPTIONS["shared+packed+chunked"], pad, length_normalize=True
    )
    assert_logps_close(got_logps, want_logps)
    assert_grads_close(got_grads, want_grads)


def test_lora_model_matches_padded_path_and_reference_is_base(tokenizer):
    from peft import LoraConfig, get_peft_model

    base = sensitive_llama(tokenizer)
    # init_lora_weights=False: random A and B, so the adapters change the outputs and get gradients
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj", "lm_head"],
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft notes the tied lm_head
        model = get_peft_model(base, config)
    examples, pad = encode_pairs(tokenizer), tokenizer.pad_token_id
    options = FAST_OPTIONS["shared+packed+chunked"]
    want_logps, _, want_grads = loss_and_grads(model, examples, "mmpo", None, pad)
    got_logps, _, got_grads = loss_and_grads(model, examples, "mmpo", options, pad)
    assert_logps_close(got_logps, want_logps)
    assert any("lm_head" in name for name in got_grads)
    assert_grads_close(got_grads, want_grads)
    with torch.no_grad(), model.disable_adapter():  # how the engine gets reference log-probs
        ref_fast = preference_logps(model, examples, pad_token_id=pad, options=options)
        ref_plain = preference_logps(model, examples, pad_token_id=pad)
    assert_logps_close(ref_fast, ref_plain)
    assert not torch.allclose(ref_fast.chosen_logps, got_logps.chosen_logps.detach(), atol=1e-3)


@pytest.mark.parametrize("kernel", KERNELS)
def test_sft_loss_matches_padded_path(tokenizer, kernel):
    model = sensitive_llama(tokenizer, kernel)
    examples = []
    for ex in encode_pairs(tokenizer):
        ids = ex["prompt_ids"] + ex["chosen_ids"]
        examples.append({"input_ids": ids, "labels": [-100] * len(ex["prompt_ids"]) + ex["chosen_ids"]})
    pad = tokenizer.pad_token_id
    results = []
    for options in (None, ForwardOptions(packing=True, logits_chunk_size=3), ForwardOptions(packing=False)):
        model.zero_grad(set_to_none=True)
        loss, targets, tokens = sft_loss(model, examples, pad_token_id=pad, options=options)
        loss.backward()
        results.append((loss.detach(), targets, tokens, {n: p.grad.clone() for n, p in model.named_parameters()}))
    want = results[0]
    for got in results[1:]:
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
        assert got[1:3] == want[1:3]
        assert_grads_close(got[3], want[3])


def test_a_wrong_mask_is_caught(tokenizer, monkeypatch):
    """If rejected tokens could see the chosen ones, the comparison above would fail."""
    model = sensitive_llama(tokenizer)
    examples, pad = encode_pairs(tokenizer), tokenizer.pad_token_id
    want = preference_logps(model, examples, pad_token_id=pad)
    correct_mask = layouts.block_mask
    monkeypatch.setattr(layouts, "block_mask", lambda segment, branch, kind: correct_mask(segment, branch * 0, kind))
    got = logps_module.fast_preference_logps(
        model,
        examples,
        FAST_OPTIONS["shared-prompt"],
        "mask",
        pad_token_id=pad,
        compute_entropy=False,
        length_normalize=False,
    )
    torch.testing.assert_close(got.chosen_logps, want.chosen_logps, rtol=1e-5, atol=1e-5)  # chosen unaffected
    assert float((got.rejected_logps - want.rejected_logps).detach().abs().max()) > 1e-2


# --------------------------------------------------------------------------------------------
# Layout details


def test_shared_prompt_layout_positions_and_visibility():
    # prompt [11, 12], chosen [21, 22], rejected [31]
    unit = layouts.shared_prompt_unit([11, 12], [21, 22], [31], pair=0, num_pairs=1)
    layout = layouts.build_layout([unit], [[0]], pad_token_id=0, device="cpu", mask_kind="bool", attention="mask")
    assert layout.input_ids.tolist() == [[11, 12, 21, 22, 31]]
    assert layout.position_ids.tolist() == [[0, 1, 2, 3, 2]]  # rejected restarts after the prompt
    sees = layout.attention_mask[0, 0].int().tolist()
    assert sees[4] == [1, 1, 0, 0, 1]  # rejected sees the prompt and itself, not the chosen tokens
    assert sees[3] == [1, 1, 1, 1, 0]
    # chosen 21 and rejected 31 are both scored from the last prompt token (offset 1)
    assert list(zip(layout.predictors.tolist(), layout.targets.tolist(), layout.sequences.tolist())) == [
        (1, 21, 0),
        (2, 22, 0),
        (1, 31, 1),
    ]
    assert layout.num_tokens == 5


def test_packing_puts_sequences_side_by_side_without_crosstalk():
    units = [
        layouts.sequence_unit([1, 2, 3, 4], [-100, 2, 3, 4], 0),
        layouts.sequence_unit([5, 6], [-100, 6], 1),
        layouts.sequence_unit([7, 8], [-100, 8], 2),
    ]
    layout = layouts.build_layout(units, [[0], [1, 2]], pad_token_id=0, device="cpu", mask_kind=torch.float32)
    assert layout.input_ids.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert layout.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 0, 1]]
    mask = layout.attention_mask[1, 0]
    assert mask.dtype == torch.float32 and float(mask[2, 1]) == torch.finfo(torch.float32).min
    assert float(mask[3, 2]) == 0.0 and float(mask[1, 0]) == 0.0


def test_row_assignment_trades_padding_against_attention():
    lengths = [9, 3, 5, 4, 2, 6]
    for ratio in (0.0, 0.01, 1.0):
        rows = layouts.assign_rows(lengths, packing=True, attention_ratio=ratio)
        assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    # attention free: one row, no padding at all
    assert layouts.assign_rows(lengths, packing=True, attention_ratio=0.0) == [[0, 5, 2, 3, 1, 4]]
    # attention dear: rows no wider than the longest unit, first-fit decreasing: 9 | 6+3 | 5+4 | 2
    assert layouts.assign_rows(lengths, packing=True, attention_ratio=1.0) == [[0], [5, 1], [2, 3], [4]]
    assert layouts.assign_rows(lengths, packing=False) == [[i] for i in range(len(lengths))]


def test_length_grouped_order_cuts_padding_and_stays_a_shuffle():
    import random

    lengths = [random.Random(i).randint(10, 500) for i in range(400)]
    batch = 8

    def padding(order):
        return sum(
            max(lengths[i] for i in order[s : s + batch]) * len(order[s : s + batch])
            - sum(lengths[i] for i in order[s : s + batch])
            for s in range(0, len(order), batch)
        )

    grouped = length_grouped_order(lengths, seed=0, epoch=0, batch_size=batch, group_batches=10)
    shuffled = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0)).tolist()
    assert sorted(grouped) == list(range(len(lengths)))
    assert padding(grouped) < 0.2 * padding(shuffled)
    assert grouped == length_grouped_order(lengths, seed=0, epoch=0, batch_size=batch, group_batches=10)
    assert grouped != length_grouped_order(lengths, seed=0, epoch=1, batch_size=batch, group_batches=10)
    firsts = [max(lengths[i] for i in grouped[s : s + batch]) for s in range(0, len(grouped), batch)]
    assert firsts != sorted(firsts, reverse=True)  # batches are shuffled, not longest-first


def test_padding_rows_never_produce_nan_gradients(tokenizer):
    model = sensitive_llama(tokenizer)
    examples = encode_pairs(tokenizer)[:2]
    logps = preference_logps(
        model, examples, pad_token_id=tokenizer.pad_token_id, options=ForwardOptions(share_prompt=True, packing=False)
    )
    (logps.chosen_logps.sum() + logps.rejected_logps.sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# Chunked log-probs keep one chunk of logits


def retained_bytes(fn) -> int:
    """CPU memory allocated while ``fn`` runs and still held when it returns (what the backward
    pass will need, plus the small outputs), from the profiler's allocation records."""
    with torch.profiler.profile(profile_memory=True) as prof:
        result = fn()
    del result
    return sum(event.self_cpu_memory_usage for event in prof.events())


def test_chunked_scoring_matches_and_saves_no_logits():
    torch.manual_seed(0)
    vocab, dim, tokens = 1000, 16, 64
    head = torch.nn.Linear(dim, vocab, bias=False)
    hidden = torch.randn(tokens, dim, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,))
    results = {}
    for chunk in (0, 8):
        hidden.grad, head.weight.grad = None, None
        out = {}
        kept = retained_bytes(
            lambda out=out, chunk=chunk: out.update(
                zip(("logps", "entropy"), score_hidden(head, hidden, targets, with_entropy=True, chunk_size=chunk))
            )
        )
        (out["logps"].sum() + 0.5 * out["entropy"].sum()).backward()
        results[chunk] = (kept, out["logps"].detach(), hidden.grad.clone(), head.weight.grad.clone())
    full_logits = tokens * vocab * 4
    assert results[0][0] >= full_logits  # unchunked: autograd holds the float32 logits
    assert results[8][0] < 2 * 8 * vocab * 4  # chunked: not even two chunks' worth of logits
    for a, b in zip(results[8][1:], results[0][1:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_selective_recompute_keeps_less_and_restores_the_model(tokenizer):
    model = sensitive_llama(tokenizer)
    examples, pad = encode_pairs(tokenizer), tokenizer.pad_token_id
    kept = {}
    for on in (False, True):
        options = ForwardOptions(share_prompt=False, packing=False, logits_chunk_size=0, selective_recompute=on)
        kept[on] = retained_bytes(
            lambda options=options: preference_logps(model, examples, pad_token_id=pad, options=options)
        )
    assert kept[True] < 0.7 * kept[False]
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


# --------------------------------------------------------------------------------------------
# Falling back to the padded layout


def test_model_that_rejects_4d_masks_falls_back_with_one_warning(tokenizer):
    model = sensitive_llama(tokenizer)
    original = model.forward

    def no_4d_masks(*args, attention_mask=None, **kwargs):
        if attention_mask is not None and attention_mask.dim() == 4:
            raise ValueError("this model only takes 2D attention masks")
        return original(*args, attention_mask=attention_mask, **kwargs)

    model.forward = no_4d_masks
    examples, pad = encode_pairs(tokenizer), tokenizer.pad_token_id
    want = preference_logps(model, examples, pad_token_id=pad)
    scoring_module._warned.clear()
    with pytest.warns(RuntimeWarning, match="not exact for this model.*only takes 2D"):
        got = preference_logps(model, examples, pad_token_id=pad, options=ForwardOptions())
    assert_logps_close(got, want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call stays silent
        preference_logps(model, examples, pad_token_id=pad, options=ForwardOptions())


def test_model_that_ignores_our_masks_and_plans_is_detected_by_the_probe(tokenizer):
    model = sensitive_llama(tokenizer)
    original = model.forward

    def ignoring(*args, attention_mask=None, mmpo_attention_plan=None, **kwargs):
        keep = attention_mask is not None and attention_mask.dim() == 2
        return original(*args, attention_mask=attention_mask if keep else None, **kwargs)

    model.forward = ignoring
    examples, pad = encode_pairs(tokenizer), tokenizer.pad_token_id
    scoring_module._warned.clear()
    with pytest.warns(RuntimeWarning, match="differ from the padded path"):
        got = preference_logps(model, examples, pad_token_id=pad, options=ForwardOptions())
    assert_logps_close(got, preference_logps(model, examples, pad_token_id=pad))


def test_attention_mode_per_kernel(tokenizer):
    model = sensitive_llama(tokenizer, "sdpa")
    pad = tokenizer.pad_token_id
    assert logps_module.choose_attention(model, ForwardOptions(), pad, 50) == "segmented"
    assert logps_module.choose_attention(model, ForwardOptions(segmented_attention=False), pad, 50) == "mask"
    assert logps_module.choose_attention(model, ForwardOptions(share_prompt=False, packing=False), pad, 50) == "padded"
    assert logps_module.choose_attention(sensitive_llama(tokenizer, "eager"), ForwardOptions(), pad, 50) == "mask"
    model.config._attn_implementation = "flash_attention_2"  # decided before the model runs
    scoring_module._warned.clear()
    with pytest.warns(RuntimeWarning, match="cannot take the shared-prompt"):
        assert logps_module.choose_attention(model, ForwardOptions(), pad, 50) == "padded"


def test_segmented_attention_equals_dense_masked_attention():
    """Per-block sdpa calls give what one sdpa call with the dense 4D mask gives, padding aside."""
    units = [
        layouts.shared_prompt_unit([1, 2, 3], [4, 5], [6, 7, 8, 9], 0, 3),
        layouts.sequence_unit([1, 2, 3, 4, 5, 6], [-100] * 3 + [4, 5, 6], 1),
        layouts.shared_prompt_unit([1], [2, 3, 4, 5, 6], [7], 2, 3),
    ]
    rows = [[0, 2], [1]]
    segmented = layouts.build_layout(units, rows, pad_token_id=0, device="cpu", mask_kind="bool", attention="segmented")
    dense = layouts.build_layout(units, rows, pad_token_id=0, device="cpu", mask_kind="bool", attention="mask")
    assert torch.equal(segmented.position_ids, dense.position_ids)
    torch.manual_seed(0)
    width = dense.input_ids.shape[1]
    query = torch.randn(2, 4, width, 8, dtype=torch.float64, requires_grad=True)
    key, value = torch.randn(2, 2, width, 8, dtype=torch.float64), torch.randn(2, 2, width, 8, dtype=torch.float64)
    got, _ = attention.segmented_attention(
        None, query, key, value, segmented.attention_mask, scaling=0.3, mmpo_attention_plan=segmented.plan
    )
    want = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=dense.attention_mask, scale=0.3, enable_gqa=True
    ).transpose(1, 2)
    real = dense.input_ids != 0
    torch.testing.assert_close(got[real], want[real])
    (grad_got,) = torch.autograd.grad(got[real].sum(), query)
    (grad_want,) = torch.autograd.grad(want[real].sum(), query)
    torch.testing.assert_close(grad_got, grad_want)
