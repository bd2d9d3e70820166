"""Sampling k completions per prompt: batched ``generate``, seeded per batch, resumable batch by batch.

Prompts are cut into fixed batches in their given order, and batch ``i`` is generated after
seeding with ``(seed, i)``: the same prompts and settings give the same samples whether a run
goes straight through or resumes after an interruption (batches already on disk are skipped).
Each prompt goes through the tokenizer's chat template as one user turn; a batch is left-padded
and ``num_return_sequences=k`` draws the k samples of each prompt in the same call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase, set_seed


@dataclass(frozen=True)
class SamplingSettings:
    """How completions are drawn (recorded with every pair as its provenance)."""

    k: int = 4
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 48
    batch_size: int = 8
    seed: int = 0
    system_prompt: str | None = None

    def check(self) -> None:
        problems = []
        if self.k < 1:
            problems.append(f"k must be >= 1 (got {self.k})")
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0 (got {self.temperature})")
        if self.temperature == 0 and self.k > 1:
            problems.append("temperature 0 is greedy decoding, which gives k identical samples: use k=1 or sample")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1] (got {self.top_p})")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            problems.append(
                f"max_new_tokens and batch_size must be >= 1 (got {self.max_new_tokens}, {self.batch_size})"
            )
        if problems:
            raise ValueError("; ".join(problems))


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update([configured] if isinstance(configured, int) else configured or [])
    if not ids:
        raise ValueError("neither the tokenizer nor the model's generation config names an end-of-sequence token")
    return sorted(ids)


def render_prompts(
    tokenizer: PreTrainedTokenizerBase, instructions: Sequence[str], system_prompt: str | None
) -> list[str]:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; prompts are rendered as a user turn with it")
    prefix = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [
        tokenizer.apply_chat_template(
            prefix + [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        for text in instructions
    ]


def batch_ranges(count: int, batch_size: int) -> list[range]:
    return [range(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]


@torch.inference_mode()
def sample_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    settings: SamplingSettings,
    batch_index: int,
) -> list[list[dict]]:
    """k samples for each rendered prompt: ``[{"text", "finished", "new_tokens"}, ...]`` per prompt.

    ``finished`` is False when the reply hit ``max_new_tokens`` before an end-of-turn token.
    """
    stops = stop_token_ids(model, tokenizer)
    sampling = settings.temperature > 0
    config = GenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        do_sample=sampling,
        num_return_sequences=settings.k,
        eos_token_id=stops,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0],
        **({"temperature": settings.temperature, "top_p": settings.top_p} if sampling else {}),
    )
    set_seed(settings.seed * 1_000_003 + batch_index)
    device = next(model.parameters()).device
    batch = tokenizer(
        list(prompts), add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt"
    ).to(device)
    generated = model.generate(**batch, generation_config=config)
    new_tokens = generated[:, batch["input_ids"].shape[1] :]
    is_stop = torch.isin(new_tokens, torch.tensor(stops, device=new_tokens.device))
    samples = []
    for tokens, stop_flags in zip(new_tokens.tolist(), is_stop.tolist()):
        # Cut at the first stop token: what follows it is padding.
        end = stop_flags.index(True) if True in stop_flags else len(tokens)
        samples.append(
            {
                "text": tokenizer.decode(tokens[:end], skip_special_tokens=True).strip(),
                "finished": end < len(tokens),
                "new_tokens": end,
            }
        )
    k = settings.k
    return [samples[i * k : (i + 1) * k] for i in range(len(prompts))]


def sample_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    instructions: Sequence[str],
    settings: SamplingSettings,
    *,
    skip_batches: Iterable[int] = (),
    on_batch: Callable[[int, range, list[list[dict]]], None] | None = None,
    progress: bool = False,
) -> dict[int, list[dict]]:
    """Samples of every prompt not in ``skip_batches``, by prompt index; ``on_batch`` sees each batch as it ends."""
    settings.check()
    model.eval()
    prompts = render_prompts(tokenizer, instructions, settings.system_prompt)
    skip = set(skip_batches)
    todo = [(i, r) for i, r in enumerate(batch_ranges(len(prompts), settings.batch_size)) if i not in skip]
    if progress:
        from tqdm.auto import tqdm

        todo = tqdm(todo, desc=f"sampling {settings.k} per prompt", unit="batch")
    out: dict[int, list[dict]] = {}
    for batch_index, indices in todo:
        samples = sample_batch(model, tokenizer, [prompts[i] for i in indices], settings, batch_index)
        out.update(zip(indices, samples))
        if on_batch is not None:
            on_batch(batch_index, indices, samples)
    return out
