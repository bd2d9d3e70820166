"""The forward pass: completion log-probs of tokenized examples.

The data loader hands over lists of tokenized examples (see docs/architecture.md) and this module
builds the tensors, so the layout (padding, shared prompt, packing) is decided here and nowhere
else. ``preference_logps`` and ``sft_loss`` without ``options`` run the plain padded path: the
reference every faster path must match (tests/test_forward.py checks log-probs and gradients).

The fast paths (``ForwardOptions``; all exact, all on by default; see docs/performance.md):

* **shared prompt** - a pair is one sequence ``prompt + chosen + rejected``; a 4D attention mask
  hides the chosen tokens from the rejected ones and position ids restart after the prompt, so
  the prompt is computed once and the rejected tokens see exactly what they would see alone.
* **packing** - several sequences (or pairs) share a row, with a block-diagonal mask and
  per-sequence positions. Rows are filled first-fit decreasing at the width that minimizes an
  estimate of padding plus (quadratic, dense-masked) attention cost.
* **chunked log-probs** - only the positions that predict a completion token go through the LM
  head, a chunk at a time under activation checkpointing, so ``[tokens, vocab]`` float32 logits
  exist for one chunk only, in the forward and in the backward pass.
* **selective recompute** - each decoder layer keeps only its matmul and attention outputs for
  the backward pass; norms, RoPE and activations are replayed from them (torch's selective
  activation checkpointing).

A layout that needs a 4D mask is used only with attention kernels that honour one (``sdpa``,
``eager``) and after a one-time probe on the model shows it matches the padded path; otherwise
the padded path runs, with a warning once.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts
from transformers.modeling_layers import GradientCheckpointingLayer

from mmpo.objectives import entropy_surrogate

#: Attention kernels of transformers that apply a custom 4D mask exactly (tests/test_forward.py).
MASK_4D_KERNELS = ("sdpa", "eager")


@dataclass
class PreferenceLogps:
    """Per-pair results of one forward pass over chosen and rejected completions."""

    chosen_logps: torch.Tensor  # [B] summed completion log-probs
    rejected_logps: torch.Tensor  # [B]
    chosen_lengths: torch.Tensor  # [B] completion token counts
    rejected_lengths: torch.Tensor  # [B]
    chosen_entropy: torch.Tensor | None = None  # [B] entropy surrogate (SPEC.md B.2) when asked for
    rejected_entropy: torch.Tensor | None = None
    num_tokens: int = 0  # non-padding tokens that went through the model

    def means(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token mean log-probs (the length-normalization ablation, SimPO)."""
        return (self.chosen_logps / self.chosen_lengths.clamp(min=1),
                self.rejected_logps / self.rejected_lengths.clamp(min=1))


@dataclass(frozen=True)
class ForwardOptions:
    """Which exact speed-ups the forward pass uses (the config's ``# forward pass (speed)`` keys)."""

    share_prompt: bool = True
    """Preference pairs: prompt + chosen + rejected as one sequence, the prompt computed once."""
    packing: bool = True
    """Several sequences per row, without padding between them."""
    logits_chunk_size: int = 256
    """Tokens scored per LM-head chunk (0: all scored positions at once, still only those)."""
    selective_recompute: bool = True
    """Keep only matmul and attention outputs for the backward pass; recompute the elementwise rest."""
    segmented_attention: bool = True
    """With sdpa: attend block by block (one call per sequence part) instead of one dense masked call."""

    def __post_init__(self):
        if self.logits_chunk_size < 0:
            raise ValueError(f"logits_chunk_size must be >= 0, got {self.logits_chunk_size}")

    @classmethod
    def from_config(cls, cfg) -> ForwardOptions:
        """Options of a ``TrainConfig``/``SFTConfig`` (fields missing on the config keep the default)."""
        default = cls()
        return cls(**{f.name: getattr(cfg, f.name, getattr(default, f.name)) for f in dataclasses.fields(cls)})


# --------------------------------------------------------------------------------------------
# The plain padded path (the reference)


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


def _completion_rows(examples: list[dict]) -> tuple[list[list[int]], list[int]]:
    """Rows ``prompt + chosen`` for every pair, then ``prompt + rejected``; and prompt lengths."""
    rows = [ex["prompt_ids"] + ex["chosen_ids"] for ex in examples]
    rows += [ex["prompt_ids"] + ex["rejected_ids"] for ex in examples]
    prompt_lengths = [len(ex["prompt_ids"]) for ex in examples] * 2
    return rows, prompt_lengths


def _padded_preference_logps(model, examples, *, pad_token_id, compute_entropy, length_normalize) -> PreferenceLogps:
    device = next(model.parameters()).device
    rows, prompt_lengths = _completion_rows(examples)
    input_ids = pad_sequences(rows, pad_token_id, device)
    lengths = torch.tensor([len(r) for r in rows], device=device)
    positions = torch.arange(input_ids.shape[1], device=device)
    attention_mask = (positions[None, :] < lengths[:, None]).long()
    completion_mask = (positions[None, :] >= torch.tensor(prompt_lengths, device=device)[:, None]) & attention_mask.bool()

    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    targets = input_ids[:, 1:]
    mask = completion_mask[:, 1:]
    token_logps, entropy = token_logps_and_entropy(logits[:, :-1], targets, with_entropy=compute_entropy)
    token_logps = token_logps * mask
    sums = token_logps.sum(-1)
    counts = mask.sum(-1)

    batch = len(examples)
    result = PreferenceLogps(
        chosen_logps=sums[:batch], rejected_logps=sums[batch:],
        chosen_lengths=counts[:batch], rejected_lengths=counts[batch:],
        num_tokens=int(lengths.sum()),
    )
    if compute_entropy:
        surrogate = entropy_surrogate(entropy, token_logps, mask, length_normalize=length_normalize)
        result.chosen_entropy, result.rejected_entropy = surrogate[:batch], surrogate[batch:]
    return result


def _padded_sft_loss(model, examples, *, pad_token_id) -> tuple[torch.Tensor, int, int]:
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


# --------------------------------------------------------------------------------------------
# Batching


def length_grouped_order(lengths: list[int], *, seed: int, epoch: int, batch_size: int,
                         group_batches: int = 50) -> list[int]:
    """A shuffled epoch order in which each run of ``batch_size`` examples has similar lengths.

    For the padded path: shuffle, cut into groups of ``group_batches`` batches, sort each group
    by length (longest first), cut it into batches and shuffle the batches - the scheme of
    transformers' ``LengthGroupedSampler``. Padding shrinks; batches stay random. It changes which
    examples share a batch, so it is not exact; packing makes it unnecessary.
    """
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    span = batch_size * group_batches
    batches = []
    for start in range(0, len(order), span):
        group = sorted(order[start: start + span], key=lambda i: -lengths[i])
        batches += [group[i: i + batch_size] for i in range(0, len(group), batch_size)]
    # A short last batch stays last, so every full batch starts at a multiple of batch_size.
    tail = batches.pop() if batches and len(batches[-1]) < batch_size else []
    return [i for b in torch.randperm(len(batches), generator=generator).tolist() for i in batches[b]] + tail


# --------------------------------------------------------------------------------------------
# Layouts: where every token sits, what it may attend to, which positions get scored

SHARED, CHOSEN, REJECTED = 0, 1, 2  # branch of a token: a token sees SHARED tokens and its own branch
#: Cost of one query-key pair of masked attention relative to one token through a layer stack of
#: SmolLM2-135M's shape on CPU (measured: ~1.5x the FLOP ratio 2 * layers * hidden / parameters).
DEFAULT_ATTENTION_RATIO = 4.6e-4
#: How attention is restricted to each sequence: ``segmented`` runs one causal attention call per
#: block of a row (sdpa only, no wasted query-key pairs), ``mask`` one dense call with a 4D mask,
#: ``padded`` is the plain layout (one sequence per row, 2D padding mask).
ATTENTION_MODES = ("segmented", "mask", "padded")


@dataclass
class _Unit:
    """What is placed in a row as a whole: one sequence, or a pair sharing its prompt."""

    tokens: list[int]
    positions: list[int]
    branches: list[int]
    sections: tuple[int, int, int]  # lengths of the shared part, the chosen and the rejected branch
    predictors: list[int]  # offset (within the unit) of the position whose output scores each target
    targets: list[int]
    sequences: list[int]  # which logical sequence each target belongs to
    steps: list[int]  # rank of each target within its sequence's scored tokens


def _sequence_unit(tokens: list[int], labels: list[int], sequence: int) -> _Unit:
    """A plain sequence; each position ``t >= 1`` whose label is not -100 is scored against it."""
    scored = [t for t in range(1, len(tokens)) if labels[t] != -100]
    return _Unit(tokens=list(tokens), positions=list(range(len(tokens))), branches=[SHARED] * len(tokens),
                 sections=(len(tokens), 0, 0), predictors=[t - 1 for t in scored], targets=[labels[t] for t in scored],
                 sequences=[sequence] * len(scored), steps=list(range(len(scored))))


def _shared_prompt_unit(prompt: list[int], chosen: list[int], rejected: list[int], pair: int, num_pairs: int) -> _Unit:
    """``prompt + chosen + rejected`` in one sequence; rejected positions restart after the prompt."""
    p, c, r = len(prompt), len(chosen), len(rejected)
    unit = _Unit(tokens=prompt + chosen + rejected,
                 positions=list(range(p + c)) + list(range(p, p + r)),
                 branches=[SHARED] * p + [CHOSEN] * c + [REJECTED] * r, sections=(p, c, r),
                 predictors=[], targets=[], sequences=[], steps=[])
    for sequence, start, completion in ((pair, p, chosen), (num_pairs + pair, p + c, rejected)):
        scored = [j for j in range(len(completion)) if p + j > 0]  # a sequence's first token has no predictor
        unit.predictors += [p - 1 if j == 0 else start + j - 1 for j in scored]
        unit.targets += [completion[j] for j in scored]
        unit.sequences += [sequence] * len(scored)
        unit.steps += list(range(len(scored)))
    return unit


@dataclass(frozen=True)
class _Block:
    """Queries ``[start, end)`` of a row attend causally to themselves and, when ``prefix`` is set,
    to all of the keys ``[prefix[0], prefix[1])`` (the shared prompt of a rejected branch)."""

    start: int
    end: int
    prefix: tuple[int, int] | None = None
    mask: torch.Tensor | None = None  # [end - start, prefix length + end - start] when prefix is set


@dataclass(frozen=True)
class AttentionPlan:
    """Blocks of every row for segmented attention (passed to the model as a keyword argument)."""

    rows: tuple[tuple[_Block, ...], ...]


@dataclass
class _Layout:
    input_ids: torch.Tensor  # [R, W]
    position_ids: torch.Tensor | None  # [R, W] (None: 0..W-1 in every row)
    attention_mask: torch.Tensor  # [R, W] padding mask, [R, 1, W, W] dense mask, or a placeholder (segmented)
    plan: AttentionPlan | None  # segmented attention only
    predictors: torch.Tensor  # [N] flat index into the [R * W] outputs
    targets: torch.Tensor  # [N]
    sequences: torch.Tensor  # [N]
    steps: torch.Tensor  # [N]
    num_tokens: int


def _first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
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


def _assign_rows(lengths: list[int], packing: bool, attention_ratio: float = DEFAULT_ATTENTION_RATIO) -> list[list[int]]:
    """Units per row: one each without packing; with packing, first-fit decreasing into rows of
    the capacity that minimizes the estimated cost of the padded ``[rows, width]`` batch.

    The cost counts every slot (token-wise layers run on padding too) plus, per row, the
    ``width**2`` query-key pairs a dense masked attention kernel computes, weighted by
    ``attention_ratio`` (cost of one query-key pair relative to one token through the layers).
    Few long rows waste no padding but pay quadratic attention; the estimate picks between them.
    Segmented attention has no such cost (``attention_ratio=0``): everything goes in one row.
    """
    if not packing:
        return [[i] for i in range(len(lengths))]
    longest, total = max(lengths), sum(lengths)
    capacities = {longest, total} | {int(longest * f) for f in (1.25, 1.5, 2, 3, 4, 6, 8) if longest * f < total}
    best, best_key = None, None
    for capacity in sorted(capacities):
        rows = _first_fit_decreasing(lengths, capacity)
        width = max(sum(lengths[i] for i in row) for row in rows)
        key = (len(rows) * width * (1 + attention_ratio * width), len(rows) * width)
        if best_key is None or key < best_key:
            best, best_key = rows, key
    return best


def _build_layout(units: list[_Unit], rows: list[list[int]], *, pad_token_id: int, device, mask_kind,
                  segmented: bool = False) -> _Layout:
    """Tensors for ``units`` placed in ``rows`` (lists of unit indices, see ``_assign_rows``)."""
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
            blocks.append(_Block(start, start + p + c))
            if rej:  # rejected: all of the prompt, causally its own tokens, none of the chosen ones
                if (p, rej) not in rejected_masks:
                    own = torch.ones(rej, rej, dtype=torch.bool, device=device).tril()
                    rejected_masks[p, rej] = torch.cat([torch.ones(rej, p, dtype=torch.bool, device=device), own], 1)
                blocks.append(_Block(start + p + c, start + p + c + rej, (start, start + p), rejected_masks[p, rej]))
        pad = width - len(row_tokens)
        tokens.append(row_tokens + [pad_token_id] * pad)
        positions.append(row_positions + [0] * pad)
        segments.append(row_segments + [-1] * pad)
        branches.append(row_branches + [SHARED] * pad)
        plan_rows.append(tuple(blocks))

    def tensor(values):
        return torch.tensor(values, dtype=torch.long, device=device)

    segment = tensor(segments)
    plan = None
    simple = all(len(row) == 1 for row in rows) and all(b == SHARED for unit in units for b in unit.branches)
    if simple:  # one plain sequence per row: an ordinary padding mask does
        attention_mask, position_ids = (segment >= 0).long(), None
    elif segmented:  # the plan decides; the placeholder only stops transformers from building a mask
        attention_mask, position_ids = torch.ones(len(rows), 1, 1, 1, dtype=torch.bool, device=device), tensor(positions)
        plan = AttentionPlan(tuple(plan_rows))
    else:
        attention_mask, position_ids = _block_mask(segment, tensor(branches), mask_kind), tensor(positions)
    return _Layout(input_ids=tensor(tokens), position_ids=position_ids, attention_mask=attention_mask, plan=plan,
                   predictors=tensor(predictors), targets=tensor(targets), sequences=tensor(sequences),
                   steps=tensor(steps), num_tokens=sum(len(u.tokens) for u in units))


def _block_mask(segment: torch.Tensor, branch: torch.Tensor, kind) -> torch.Tensor:
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


# --------------------------------------------------------------------------------------------
# Segmented attention: transformers' sdpa entry, split into per-block calls when given a plan

_plain_sdpa = None


def _sdpa_or_segmented(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                       mmpo_attention_plan: AttentionPlan | None = None, **kwargs):
    """transformers' sdpa attention, unchanged unless the call carries ``mmpo_attention_plan``.

    With a plan, each block is one ``scaled_dot_product_attention`` call on its own queries and
    keys (``is_causal`` for a sequence or a prompt + chosen block; prompt + own keys, bottom-right
    causal, for a rejected block), so no query-key pair outside a sequence is computed at all.
    The plan travels as a keyword argument, so activation recompute replays the same calls."""
    if mmpo_attention_plan is None:
        return _plain_sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    gqa = query.shape[1] != key.shape[1]
    attend = partial(F.scaled_dot_product_attention, dropout_p=dropout, scale=scaling, enable_gqa=gqa)
    rows = []
    for r, blocks in enumerate(mmpo_attention_plan.rows):
        pieces = []
        for block in blocks:
            q = query[r:r + 1, :, block.start:block.end]
            k, v = key[r:r + 1, :, block.start:block.end], value[r:r + 1, :, block.start:block.end]
            if block.prefix is None:
                pieces.append(attend(q, k, v, is_causal=True))
            else:
                start, end = block.prefix
                k = torch.cat([key[r:r + 1, :, start:end], k], dim=2)
                v = torch.cat([value[r:r + 1, :, start:end], v], dim=2)
                pieces.append(attend(q, k, v, attn_mask=block.mask))
        filled = blocks[-1].end if blocks else 0
        if filled < query.shape[2]:  # padding: zeros, never read
            pieces.append(query.new_zeros(1, query.shape[1], query.shape[2] - filled, value.shape[-1]))
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows).transpose(1, 2).contiguous(), None


def _install_segmented_attention() -> None:
    """Route transformers' ``"sdpa"`` attention through ``_sdpa_or_segmented`` (once per process).

    Calls without a plan go to the original function with the same arguments, so every other
    use of sdpa in the process is unchanged."""
    global _plain_sdpa
    if _plain_sdpa is None:
        from transformers import AttentionInterface
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        _plain_sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
        AttentionInterface.register("sdpa", _sdpa_or_segmented)


# --------------------------------------------------------------------------------------------
# Running the model and scoring


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside DDP/compile/PEFT wrappers (for config, decoder and head)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def _kernel(model: torch.nn.Module) -> str | None:
    return getattr(_unwrap(model).config, "_attn_implementation", None)


def _mask_kind(model: torch.nn.Module):
    """The 4D mask the model's attention kernel applies exactly: sdpa takes a boolean mask; eager
    *adds* the mask to the scores, so it needs an additive one (a boolean one silently gives wrong
    numbers there)."""
    return "bool" if _kernel(model) == "sdpa" else next(model.parameters()).dtype


def _hidden_states(model: torch.nn.Module, layout: _Layout) -> torch.Tensor:
    """Final hidden states ``[R, W, d]`` (after the last norm), through the model's own forward.

    The model is called as a whole (so DDP, PEFT and hooks see an ordinary forward) with
    ``logits_to_keep=1``; the decoder's output is taken with a forward hook."""
    base = _unwrap(model)
    captured = []
    handle = base.get_decoder().register_forward_hook(lambda _m, _i, out: captured.append(out[0]))
    kwargs = dict(input_ids=layout.input_ids, attention_mask=layout.attention_mask, use_cache=False)
    if layout.position_ids is not None:
        kwargs["position_ids"] = layout.position_ids
    if layout.plan is not None:
        _install_segmented_attention()
        kwargs["mmpo_attention_plan"] = layout.plan
    if "logits_to_keep" in inspect.signature(base.forward).parameters:
        kwargs["logits_to_keep"] = 1
    try:
        model(**kwargs)
    finally:
        handle.remove()
    return captured[-1]


def _score_chunk(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, with_entropy: bool):
    logps, entropy = token_logps_and_entropy(head(hidden), targets, with_entropy=with_entropy)
    return (logps, entropy) if with_entropy else (logps,)


def score_hidden(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, *, with_entropy: bool = False,
                 chunk_size: int = 256) -> tuple[torch.Tensor, torch.Tensor | None]:
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
        args = (head, hidden[start: start + chunk_size], targets[start: start + chunk_size], with_entropy)
        parts.append(checkpoint(_score_chunk, *args, use_reentrant=False) if needs_graph else _score_chunk(*args))
    logps = torch.cat([p[0] for p in parts])
    return logps, (torch.cat([p[1] for p in parts]) if with_entropy else None)


# Ops whose outputs selective recompute keeps: everything else in a decoder layer (norms, RoPE,
# activations, residual adds, KV-head repeats) is elementwise and is recomputed from them.
_KEEP_OPS = {getattr(torch.ops.aten, name).default for name in (
    "mm", "addmm", "bmm", "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention") if hasattr(torch.ops.aten, name)}


def _keep_matmuls(_ctx, op, *_args, **_kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _KEEP_OPS else CheckpointPolicy.PREFER_RECOMPUTE


@contextmanager
def _selective_recompute(model: torch.nn.Module, enabled: bool):
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
    function = partial(checkpoint, use_reentrant=False,
                       context_fn=partial(create_selective_checkpoint_contexts, _keep_matmuls))
    for layer in layers:
        layer.gradient_checkpointing, layer._gradient_checkpointing_func = True, function
    try:
        yield
    finally:
        for layer in layers:
            layer.gradient_checkpointing = False
            del layer._gradient_checkpointing_func


def _score_layout(model, layout: _Layout, options: ForwardOptions, *, with_entropy: bool):
    with _selective_recompute(model, options.selective_recompute):
        hidden = _hidden_states(model, layout)
    flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, layout.predictors)
    head = _unwrap(model).get_output_embeddings()
    return score_hidden(head, flat, layout.targets, with_entropy=with_entropy, chunk_size=options.logits_chunk_size)


_attention_ratios: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _attention_ratio(model: torch.nn.Module) -> float:
    """``DEFAULT_ATTENTION_RATIO`` scaled to this model: FLOPs of a query-key pair over a token's."""
    if model not in _attention_ratios:
        base = _unwrap(model)
        config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
        embeddings = {id(m.weight): m.weight.numel() for m in (base.get_input_embeddings(), base.get_output_embeddings())
                      if m is not None and hasattr(m, "weight")}
        body = sum(p.numel() for p in base.parameters()) - sum(embeddings.values())
        layers, hidden = getattr(config, "num_hidden_layers", None), getattr(config, "hidden_size", None)
        ratio = DEFAULT_ATTENTION_RATIO
        if layers and hidden and body > 0:
            ratio = 1.5 * 2 * layers * hidden / body  # 1.5: attention kernels run below matmul speed on CPU
        _attention_ratios[model] = ratio
    return _attention_ratios[model]


def _layout(model, units: list[_Unit], attention: str, packing: bool, pad_token_id: int) -> _Layout:
    packing = packing and attention != "padded"
    ratio = 0.0 if attention == "segmented" or not packing else _attention_ratio(model)
    rows = _assign_rows([len(u.tokens) for u in units], packing, ratio)
    return _build_layout(units, rows, pad_token_id=pad_token_id, device=next(model.parameters()).device,
                         mask_kind=_mask_kind(model), segmented=attention == "segmented")


def _per_sequence(values: torch.Tensor, layout: _Layout, num_sequences: int) -> torch.Tensor:
    """Scored values ``[N]`` laid out as ``[sequences, completion length]`` (zeros elsewhere)."""
    width = int(layout.steps.max()) + 1 if layout.steps.numel() else 1
    out = values.new_zeros(num_sequences, width)
    return out.index_put((layout.sequences, layout.steps), values)


# --------------------------------------------------------------------------------------------
# Choosing how attention is restricted, with a one-time exactness probe per model

_warned: set[str] = set()
_probe_results: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _probe_examples(vocab_size: int) -> list[dict]:
    ids = lambda *xs: [1 + (x * 7919) % (vocab_size - 1) for x in xs]  # noqa: E731 - arbitrary in-vocab tokens
    return [{"prompt_ids": ids(1, 2, 3, 4), "chosen_ids": ids(5, 6, 7), "rejected_ids": ids(8, 9)},
            {"prompt_ids": ids(10, 11), "chosen_ids": ids(12), "rejected_ids": ids(13, 14, 15, 16, 17)}]


def _probe(model, options: ForwardOptions, pad_token_id: int, attention: str) -> str | None:
    """Why ``attention`` does not give the padded path's numbers on this model, or None when it
    does. Checked once per model and setting on two tiny pairs, without gradients."""
    key = (options.share_prompt, options.packing, attention, _kernel(model))
    results = _probe_results.setdefault(model, {})
    if key not in results:
        examples = _probe_examples(_unwrap(model).config.vocab_size)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                want = _padded_preference_logps(model, examples, pad_token_id=pad_token_id, compute_entropy=False,
                                                length_normalize=False)
                got = _fast_preference_logps(model, examples, options, attention, pad_token_id=pad_token_id,
                                             compute_entropy=False, length_normalize=False)
            # float32 agrees to ~1e-6 here; 16-bit layouts differ by rounding, so only gross errors count
            tolerance = 1e-4 if next(model.parameters()).dtype in (torch.float32, torch.float64) else 1e-1
            close = all(torch.allclose(g.float(), w.float(), rtol=tolerance, atol=tolerance)
                        for g, w in ((got.chosen_logps, want.chosen_logps), (got.rejected_logps, want.rejected_logps)))
            results[key] = None if close else "its log-probs differ from the padded path's"
        except Exception as err:  # a model that rejects 4D masks, custom positions or extra arguments
            results[key] = f"{err.__class__.__name__}: {err}"
        finally:
            model.train(was_training)
    return results[key]


def _choose_attention(model, options: ForwardOptions, pad_token_id: int, longest_sequence: int) -> str:
    """The first of ``ATTENTION_MODES`` that is switched on, allowed and exact for this model."""
    if not (options.packing or options.share_prompt):
        return "padded"
    window = getattr(_unwrap(model).config, "sliding_window", None)
    if window is not None and longest_sequence > window:  # our mask/plan would replace the window
        _warn_once(f"sequences longer than the model's sliding window ({window}): using the padded layout")
        return "padded"
    kernel = _kernel(model)
    candidates = [mode for mode, allowed in (("segmented", kernel == "sdpa" and options.segmented_attention),
                                             ("mask", kernel in MASK_4D_KERNELS)) if allowed]
    if not candidates:
        _warn_once(f"attention kernel {kernel!r} cannot take the shared-prompt/packing layout (supported: "
                   f"{', '.join(MASK_4D_KERNELS)}); using the padded layout")
        return "padded"
    for mode in candidates:
        reason = _probe(model, options, pad_token_id, mode)
        if reason is None:
            return mode
        fallback = "padded layout" if mode == candidates[-1] else f"{candidates[-1]!r} attention"
        _warn_once(f"{type(_unwrap(model)).__name__} with attention {kernel!r}: {mode!r} attention is not exact "
                   f"for this model ({reason}); using the {fallback}")
    return "padded"


# --------------------------------------------------------------------------------------------
# Public entry points


def _fast_preference_logps(model, examples, options: ForwardOptions, attention: str, *, pad_token_id,
                           compute_entropy, length_normalize) -> PreferenceLogps:
    batch = len(examples)
    if options.share_prompt and attention != "padded":
        units = [_shared_prompt_unit(ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"], i, batch)
                 for i, ex in enumerate(examples)]
    else:
        rows, prompt_lengths = _completion_rows(examples)
        units = [_sequence_unit(row, [-100] * p + row[p:], i) for i, (row, p) in enumerate(zip(rows, prompt_lengths))]
    layout = _layout(model, units, attention, options.packing, pad_token_id)
    token_logps, entropy = _score_layout(model, layout, options, with_entropy=compute_entropy)
    per_token = _per_sequence(token_logps, layout, 2 * batch)
    sums = per_token.sum(-1)
    counts = torch.bincount(layout.sequences, minlength=2 * batch)
    result = PreferenceLogps(chosen_logps=sums[:batch], rejected_logps=sums[batch:],
                             chosen_lengths=counts[:batch], rejected_lengths=counts[batch:],
                             num_tokens=layout.num_tokens)
    if compute_entropy:
        mask = _per_sequence(torch.ones_like(token_logps), layout, 2 * batch)
        surrogate = entropy_surrogate(_per_sequence(entropy, layout, 2 * batch), per_token, mask,
                                      length_normalize=length_normalize)
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
        return _padded_preference_logps(model, examples, **kwargs)
    longest = max(len(ex["prompt_ids"]) + max(len(ex["chosen_ids"]), len(ex["rejected_ids"])) for ex in examples)
    attention = _choose_attention(model, options, pad_token_id, longest)
    return _fast_preference_logps(model, examples, options, attention, **kwargs)


def sft_loss(model: torch.nn.Module, examples: list[dict], *, pad_token_id: int,
             options: ForwardOptions | None = None) -> tuple[torch.Tensor, int, int]:
    """Mean cross-entropy over assistant tokens of a micro-batch; also (target tokens, all tokens).

    Without ``options`` the plain padded path; with them, packing and chunked log-probs.
    """
    if options is None:
        return _padded_sft_loss(model, examples, pad_token_id=pad_token_id)
    units = [_sequence_unit(ex["input_ids"], ex["labels"], i) for i, ex in enumerate(examples)]
    options = dataclasses.replace(options, share_prompt=False)  # nothing to share in SFT
    attention = _choose_attention(model, options, pad_token_id, max(len(ex["input_ids"]) for ex in examples))
    layout = _layout(model, units, attention, options.packing, pad_token_id)
    token_logps, _ = _score_layout(model, layout, options, with_entropy=False)
    num_targets = int(layout.targets.numel())
    loss = -token_logps.sum() / max(num_targets, 1)
    return loss, num_targets, layout.num_tokens
