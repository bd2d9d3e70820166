"""The plain padded path: the reference every faster layout must match (log-probs and gradients)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmpo.forward.options import PreferenceLogps
from mmpo.objectives import entropy_surrogate


def pad_sequences(sequences: list[list[int]], pad_value: int, device: torch.device | None = None) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    out = torch.full((len(sequences), width), pad_value, dtype=torch.long)
    for row, seq in enumerate(sequences):
        out[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return out.to(device) if device is not None else out


def token_logps_and_entropy(
    logits: torch.Tensor, targets: torch.Tensor, *, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of each target token (and the entropy of each distribution) in float32."""
    logprobs = F.log_softmax(logits.float(), dim=-1)
    token_logps = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = None
    if with_entropy:
        entropy = -(logprobs.exp() * logprobs).sum(-1)
    return token_logps, entropy


def completion_rows(examples: list[dict]) -> tuple[list[list[int]], list[int]]:
    """Rows ``prompt + chosen`` for every pair, then ``prompt + rejected``; and prompt lengths."""
    rows = [ex["prompt_ids"] + ex["chosen_ids"] for ex in examples]
    rows += [ex["prompt_ids"] + ex["rejected_ids"] for ex in examples]
    prompt_lengths = [len(ex["prompt_ids"]) for ex in examples] * 2
    return rows, prompt_lengths


def padded_preference_logps(model, examples, *, pad_token_id, compute_entropy, length_normalize) -> PreferenceLogps:
    device = next(model.parameters()).device
    rows, prompt_lengths = completion_rows(examples)
    input_ids = pad_sequences(rows, pad_token_id, device)
    lengths = torch.tensor([len(r) for r in rows], device=device)
    positions = torch.arange(input_ids.shape[1], device=device)
    attention_mask = (positions[None, :] < lengths[:, None]).long()
    completion_mask = (
        positions[None, :] >= torch.tensor(prompt_lengths, device=device)[:, None]
    ) & attention_mask.bool()

    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    targets = input_ids[:, 1:]
    mask = completion_mask[:, 1:]
    token_logps, entropy = token_logps_and_entropy(logits[:, :-1], targets, with_entropy=compute_entropy)
    token_logps = token_logps * mask
    sums = token_logps.sum(-1)
    counts = mask.sum(-1)

    batch = len(examples)
    result = PreferenceLogps(
        chosen_logps=sums[:batch],
        rejected_logps=sums[batch:],
        chosen_lengths=counts[:batch],
        rejected_lengths=counts[batch:],
        num_tokens=int(lengths.sum()),
    )
    if compute_entropy:
        surrogate = entropy_surrogate(entropy, token_logps, mask, length_normalize=length_normalize)
        result.chosen_entropy, result.rejected_entropy = surrogate[:batch], surrogate[batch:]
    return result


def padded_sft_loss(model, examples, *, pad_token_id) -> tuple[torch.Tensor, int, int]:
    device = next(model.parameters()).device
    input_ids = pad_sequences([ex["input_ids"] for ex in examples], pad_token_id, device)
    labels = pad_sequences([ex["labels"] for ex in examples], -100, device)
    lengths = torch.tensor([len(ex["input_ids"]) for ex in examples], device=device)
    attention_mask = (torch.arange(input_ids.shape[1], device=device)[None, :] < lengths[:, None]).long()
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    targets = labels[:, 1:]
    mask = targets != -100
    token_logps, _ = token_logps_and_entropy(logits[:, :-1], targets.clamp(min=0))
    num_targets = int(mask.sum())
    loss = -(token_logps * mask).sum() / max(num_targets, 1)
    return loss, num_targets, int(lengths.sum())
