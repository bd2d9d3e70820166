"""Layouts: where every token of a micro-batch sits, what it may attend to, which positions get scored.

A *unit* is what goes into a row as a whole (one sequence, or a pair sharing its prompt); rows are
filled by first-fit decreasing (packing) and turned into tensors plus, for segmented attention, an
``AttentionPlan`` of per-block calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

SHARED, CHOSEN, REJECTED = 0, 1, 2  # branch of a token: a token sees SHARED tokens and its own branch
#: Cost of one query-key pair of masked attention relative to one token through a layer stack of
#: SmolLM2-135M's shape on CPU (measured: ~1.5x the FLOP ratio 2 * layers * hidden / parameters).
DEFAULT_ATTENTION_RATIO = 4.6e-4
#: How attention is restricted to each sequence: ``flex`` runs one FlexAttention kernel per layer
#: with a block-sparse mask built once per micro-batch (CUDA), ``segmented`` one causal sdpa call
#: per block of a row (no wasted query-key pairs; the CPU path), ``mask`` one dense call with a 4D
#: mask, ``padded`` is the plain layout (one sequence per row, 2D padding mask).
ATTENTION_MODES = ("flex", "segmented", "mask", "padded")


@dataclass
class Unit:
    """What is placed in a row as a whole: one sequence, or a pair sharing its prompt."""

    tokens: list[int]
    positions: list[int]
    branches: list[int]
    sections: tuple[int, int, int]  # lengths of the shared part, the chosen and the rejected branch
    predictors: list[int]  # offset (within the unit) of the position whose output scores each target
    targets: list[int]
    sequences: list[int]  # which logical sequence each target belongs to
    steps: list[int]  # rank of each target within its sequence's scored tokens


def sequence_unit(tokens: list[int], labels: list[int], sequence: int) -> Unit:
    """A plain sequence; each position ``t >= 1`` whose label is not -100 is scored against it."""
    scored = [t for t in range(1, len(tokens)) if labels[t] != -100]
    return Unit(
        tokens=list(tokens),
        positions=list(range(len(tokens))),
        branches=[SHARED] * len(tokens),
        sections=(len(tokens), 0, 0),
        predictors=[t - 1 for t in scored],
        targets=[labels[t] for t in scored],
        sequences=[sequence] * len(scored),
        steps=list(range(len(scored))),
    )


def shared_prompt_unit(prompt: list[int], chosen: list[int], rejected: list[int], pair: int, num_pairs: int) -> Unit:
    """``prompt + chosen + rejected`` in one sequence; rejected positions restart after the prompt."""
    p, c, r = len(prompt), len(chosen), len(rejected)
    unit = Unit(
        tokens=prompt + chosen + rejected,
        positions=list(range(p + c)) + list(range(p, p + r)),
        branches=[SHARED] * p + [CHOSEN] * c + [REJECTED] * r,
        sections=(p, c, r),
        predictors=[],
        targets=[],
        sequences=[],
        steps=[],
    )
    for sequence, start, completion in ((pair, p, chosen), (num_pairs + pair, p + c, rejected)):
        scored = [j for j in range(len(completion)) if p + j > 0]  # a sequence's first token has no predictor
        unit.predictors += [p - 1 if j == 0 else start + j - 1 for j in scored]
        unit.targets += [completion[j] for j in scored]
        unit.sequences += [sequence] * len(scored)
        unit.steps += list(range(len(scored)))
    return unit


@dataclass(frozen=True)
class Block:
    """Queries ``[start, end)`` of a row attend causally to themselves and, when ``prefix`` is set,
    to all of the keys ``[prefix[0], prefix[1])`` (the shared prompt of a rejected branch)."""

    start: int
    end: int
    prefix: tuple[int, int] | None = None
    mask: torch.Tensor | None = None  # [end - start, prefix length + end - start] when prefix is set


@dataclass(frozen=True)
class AttentionPlan:
    """Blocks of every row for segmented attention (passed to the model as a keyword argument)."""

    rows: tuple[tuple[Block, ...], ...]


@dataclass
class Layout:
    input_ids: torch.Tensor  # [R, W]
    position_ids: torch.Tensor | None  # [R, W] (None: 0..W-1 in every row)
    attention_mask: torch.Tensor  # [R, W] padding mask, [R, 1, W, W] dense mask, or a placeholder (segmented, flex)
    plan: AttentionPlan | None  # segmented attention only
    predictors: torch.Tensor  # [N] flat index into the [R * W] outputs
    targets: torch.Tensor  # [N]
    sequences: torch.Tensor  # [N]
    steps: torch.Tensor  # [N]
    num_tokens: int
    segments: torch.Tensor  # [R, W] unit of each slot (-1: padding)
    branches: torch.Tensor  # [R, W] SHARED, CHOSEN or REJECTED
    attention: str = "padded"  # the ATTENTION_MODES entry the tensors are for ("padded": a plain 2D padding mask)
    flex_mask: Any = None  # FlexAttention BlockMask (attention "flex" only; see forward/flex.py)


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, room in enumerate(free):
            if lengths[i] <= room:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(capacity - lengths[i])
    return rows


def assign_rows(lengths: list[int], packing: bool, attention_ratio: float = DEFAULT_ATTENTION_RATIO) -> list[list[int]]:
    """Units per row: one each without packing; with packing, first-fit decreasing into rows of
    the capacity that minimizes the estimated cost of the padded ``[rows, width]`` batch.

    The cost counts every slot (token-wise layers run on padding too) plus, per row, the
    ``width**2`` query-key pairs a dense masked attention kernel computes, weighted by
    ``attention_ratio`` (cost of one query-key pair relative to one token through the layers).
    Few long rows waste no padding but pay quadratic attention; the estimate picks between them.
    Segmented and flex attention skip masked pairs (``attention_ratio=0``): everything goes in one row.
    """
    if not packing:
        return [[i] for i in range(len(lengths))]
    longest, total = max(lengths), sum(lengths)
    capacities = {longest, total} | {int(longest * f) for f in (1.25, 1.5, 2, 3, 4, 6, 8) if longest * f < total}
    best, best_key = None, None
    for capacity in sorted(capacities):
        rows = first_fit_decreasing(lengths, capacity)
        width = max(sum(lengths[i] for i in row) for row in rows)
        key = (len(rows) * width * (1 + attention_ratio * width), len(rows) * width)
        if best_key is None or key < best_key:
            best, best_key = rows, key
    return best


def build_layout(
    units: list[Unit], rows: list[list[int]], *, pad_token_id: int, device, mask_kind, attention: str = "mask"
) -> Layout:
    """Tensors for ``units`` placed in ``rows`` (lists of unit indices, see ``assign_rows``).

    ``attention`` (``ATTENTION_MODES``) decides the mask: a dense ``[R, 1, W, W]`` one of
    ``mask_kind`` for ``mask``, an ``AttentionPlan`` for ``segmented``, nothing for ``flex`` (its
    block mask is built from ``segments``/``branches`` by the caller)."""
    width = max(sum(len(units[i].tokens) for i in row) for row in rows)
    tokens, positions, segments, branches, plan_rows = [], [], [], [], []
    predictors, targets, sequences, steps = [], [], [], []
    rejected_masks: dict[tuple[int, int], torch.Tensor] = {}
    for r, row in enumerate(rows):
        row_tokens, row_positions, row_segments, row_branches, blocks = [], [], [], [], []
        for i in row:
            unit, start = units[i], len(row_tokens)
            predictors += [r * width + start + k for k in unit.predictors]
            targets += unit.targets
            sequences += unit.sequences
            steps += unit.steps
            row_tokens += unit.tokens
            row_positions += unit.positions
            row_segments += [i] * len(unit.tokens)
            row_branches += unit.branches
            p, c, rej = unit.sections
            blocks.append(Block(start, start + p + c))
            if rej:  # rejected: all of the prompt, causally its own tokens, none of the chosen ones
                if (p, rej) not in rejected_masks:
                    own = torch.ones(rej, rej, dtype=torch.bool, device=device).tril()
                    rejected_masks[p, rej] = torch.cat([torch.ones(rej, p, dtype=torch.bool, device=device), own], 1)
                blocks.append(Block(start + p + c, start + p + c + rej, (start, start + p), rejected_masks[p, rej]))
        pad = width - len(row_tokens)
        tokens.append(row_tokens + [pad_token_id] * pad)
        positions.append(row_positions + [0] * pad)
        segments.append(row_segments + [-1] * pad)
        branches.append(row_branches + [SHARED] * pad)
        plan_rows.append(tuple(blocks))

    def tensor(values):
        return torch.tensor(values, dtype=torch.long, device=device)

    segment, branch = tensor(segments), tensor(branches)
    plan = None
    simple = all(len(row) == 1 for row in rows) and all(b == SHARED for unit in units for b in unit.branches)
    if simple:  # one plain sequence per row: an ordinary padding mask does
        attention_mask, position_ids, attention = (segment >= 0).long(), None, "padded"
    elif attention in ("segmented", "flex"):  # the placeholder only stops transformers from building a mask
        attention_mask = torch.ones(len(rows), 1, 1, 1, dtype=torch.bool, device=device)
        position_ids = tensor(positions)
        plan = AttentionPlan(tuple(plan_rows)) if attention == "segmented" else None
    else:
        attention_mask, position_ids = block_mask(segment, branch, mask_kind), tensor(positions)
    return Layout(
        input_ids=tensor(tokens),
        position_ids=position_ids,
        attention_mask=attention_mask,
        plan=plan,
        predictors=tensor(predictors),
        targets=tensor(targets),
        sequences=tensor(sequences),
        steps=tensor(steps),
        num_tokens=sum(len(u.tokens) for u in units),
        segments=segment,
        branches=branch,
        attention=attention,
    )


def block_mask(segment: torch.Tensor, branch: torch.Tensor, kind) -> torch.Tensor:
    """``[R, 1, W, W]`` mask: query q sees key k iff same unit, k not after q, and k is a shared
    token or on q's own branch. Padding sees itself only (a fully masked row would give NaN)."""
    width = segment.shape[1]
    index = torch.arange(width, device=segment.device)
    causal = index[None, :, None] >= index[None, None, :]
    same_unit = (segment[:, :, None] == segment[:, None, :]) & (segment[:, None, :] >= 0)
    visible_branch = (branch[:, None, :] == SHARED) | (branch[:, None, :] == branch[:, :, None])
    allowed = (same_unit & causal & visible_branch) | (index[:, None] == index[None, :])
    allowed = allowed[:, None]
    if kind == "bool":
        return allowed
    return torch.zeros(allowed.shape, dtype=kind, device=segment.device).masked_fill(~allowed, torch.finfo(kind).min)
