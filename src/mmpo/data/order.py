"""Example order: the seeded per-epoch shuffle, length grouping, and each step's micro-batches.

Data order is a pure function of (seed, epoch), and each optimizer step takes a fixed slice of
it, so a resumed run, a run on N processes and a run on one process with N times the
accumulation see exactly the same examples in the same micro-batches.
"""

from __future__ import annotations

from typing import Any

import torch


def example_length(example: dict[str, Any]) -> int:
    """Tokens an example puts through the model on the padded path (a pair: its longer sequence)."""
    if "input_ids" in example:
        return len(example["input_ids"])
    return len(example["prompt_ids"]) + max(len(example["chosen_ids"]), len(example["rejected_ids"]))


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1000 + epoch)


def epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    """The seeded shuffle of one epoch."""
    return torch.randperm(num_examples, generator=_epoch_generator(seed, epoch)).tolist()


def length_grouped_order(
    lengths: list[int], *, seed: int, epoch: int, batch_size: int, group_batches: int = 50
) -> list[int]:
    """A shuffled epoch order in which each run of ``batch_size`` examples has similar lengths.

    For the padded path: shuffle, cut into groups of ``group_batches`` batches, sort each group
    by length (longest first), cut it into batches and shuffle the batches - the scheme of
    transformers' ``LengthGroupedSampler``. Padding shrinks; batches stay random. It changes which
    examples share a batch, so it is not exact; packing makes it unnecessary.
    """
    generator = _epoch_generator(seed, epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    span = batch_size * group_batches
    batches = []
    for start in range(0, len(order), span):
        group = sorted(order[start : start + span], key=lambda i: -lengths[i])
        batches += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    # A short last batch stays last, so every full batch starts at a multiple of batch_size.
    tail = batches.pop() if batches and len(batches[-1]) < batch_size else []
    return [i for b in torch.randperm(len(batches), generator=generator).tolist() for i in batches[b]] + tail


def training_order(
    examples: list[dict[str, Any]], *, seed: int, epoch: int, global_batch: int, group_by_length: bool
) -> list[int]:
    """The epoch's example order: a seeded shuffle, length-grouped per optimizer step if asked."""
    if not group_by_length:
        return epoch_order(len(examples), seed, epoch)
    lengths = [example_length(e) for e in examples]
    return length_grouped_order(lengths, seed=seed, epoch=epoch, batch_size=global_batch)


def step_micro_batches(
    order: list[int], step: int, *, per_device: int, accumulation: int, world_size: int, rank: int
) -> tuple[list[list[int]], list[int]]:
    """This process's micro-batches of one optimizer step, and all indices of the step.

    Layout of a step's slice: ``accumulation x world_size x per_device``, so micro-batch ``a``
    of rank ``r`` is the same examples whatever the split between processes and accumulation.
    """
    global_batch = per_device * world_size * accumulation
    step_indices = order[step * global_batch : (step + 1) * global_batch]
    micro = []
    for a in range(accumulation):
        start = (a * world_size + rank) * per_device
        micro.append(step_indices[start : start + per_device])
    return micro, step_indices


def length_sorted_batches(examples: list[dict[str, Any]], batch_size: int) -> list[list[int]]:
    """Batches of indices, longest examples first: less padding for passes whose order is free."""
    order = sorted(range(len(examples)), key=lambda i: -example_length(examples[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
