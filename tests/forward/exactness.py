"""Shared by the forward tests: tokenized pairs, a tiny Llama whose log-probs react to attention
and positions, the objectives' losses, and the comparisons against the padded path."""

from __future__ import annotations

import torch

from mmpo.forward import PreferenceLogps, preference_logps
from mmpo.objectives import dpo_loss, mmpo_loss, simpo_loss
from mmpo.world.model import build_tiny_llama
from mmpo.world.tokenizer import END

PAIRS = [  # (prompt, chosen, rejected): different lengths, so rows pad, pack and pair up differently
    ("What is the first letter of zorbat?", "It is z.", "I am not sure about that, sorry."),
    ("Repeat the word banop please.", "banop", "The quick brown fox jumps over the lazy dog."),
    ("Hi", "Hello there! How are you today?", "0123"),
    ("Which word is longer, mipo or tuvalak? Let me think about it.", "tuvalak", "mipo"),
]


def encode_pairs(tokenizer, pairs=PAIRS) -> list[dict]:
    """Tokenized preference examples as the data module makes them (chat template, EOS-closed)."""
    out = []
    for i, (prompt, chosen, rejected) in enumerate(pairs):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
        out.append(
            {
                "id": f"t:{i}",
                "prompt_ids": encode(text),
                "chosen_ids": encode(chosen + END),
                "rejected_ids": encode(rejected + END),
            }
        )
    return out


def sensitive_llama(tokenizer, kernel: str = "sdpa", seed: int = 0):
    model = build_tiny_llama(tokenizer, seed=seed, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    model.set_attn_implementation(kernel)
    return model


def objective_loss(name: str, logps: PreferenceLogps) -> torch.Tensor:
    batch = logps.chosen_logps.shape[0]
    ref_w = torch.linspace(-40.0, -10.0, batch)
    ref_l = torch.linspace(-35.0, -20.0, batch)
    if name == "mmpo":
        return mmpo_loss(logps.chosen_logps, logps.rejected_logps, ref_w, ref_l, beta=0.5).losses.mean()
    if name == "dpo":
        return dpo_loss(logps.chosen_logps, logps.rejected_logps, ref_w, ref_l, beta=0.1).losses.mean()
    if name == "simpo":
        return simpo_loss(
            logps.chosen_logps, logps.rejected_logps, logps.chosen_lengths, logps.rejected_lengths, beta=2.0, gamma=1.0
        ).losses.mean()
    assert name == "entropy"  # MMPO plus the entropy surrogate term, as the engine combines them
    entropy = torch.cat([logps.chosen_entropy, logps.rejected_entropy]).mean()
    return mmpo_loss(logps.chosen_logps, logps.rejected_logps, ref_w, ref_l, beta=0.5).losses.mean() - 0.3 * entropy


def loss_and_grads(model, examples, objective: str, options, pad: int, *, length_normalize=False):
    model.zero_grad(set_to_none=True)
    logps = preference_logps(
        model,
        examples,
        pad_token_id=pad,
        compute_entropy=objective == "entropy",
        length_normalize=length_normalize,
        options=options,
    )
    loss = objective_loss(objective, logps)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return logps, loss.detach(), grads


def assert_grads_close(got: dict, want: dict, rel: float = 1e-4) -> None:
    assert got.keys() == want.keys()
    for name, g in want.items():
        scale = float(g.abs().max())
        assert scale > 0, f"{name}: reference gradient is zero, the check would be vacuous"
        err = float((got[name] - g).abs().max())
        assert err <= rel * scale, f"{name}: max |grad diff| {err:.3g} > {rel} x {scale:.3g}"


def assert_logps_close(got: PreferenceLogps, want: PreferenceLogps) -> None:
    for field in ("chosen_logps", "rejected_logps"):
        torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=1e-5, atol=1e-5)
    assert got.chosen_lengths.tolist() == want.chosen_lengths.tolist()
    assert got.rejected_lengths.tolist() == want.rejected_lengths.tolist()
    if want.chosen_entropy is not None:
        torch.testing.assert_close(got.chosen_entropy, want.chosen_entropy, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(got.rejected_entropy, want.rejected_entropy, rtol=1e-5, atol=1e-4)
