"""The one-time exactness probe: does an attention mode give the padded path's numbers on this model?

Run once per model and setting on two tiny pairs before the mode is used: log-probs and, where
the model has trainable parameters, the gradient of a per-sequence weighted sum of them with
respect to the first decoder layer's parameters (that gradient passes through every layer's
attention backward, activation recompute included). It runs in float32 with autocast off (also
inside Accelerate's mixed-precision wrapper), so a correct layout agrees to float32 rounding
whatever the training precision; the training mode
is kept when no dropout is active, so selective recompute and checkpoint replays take part.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from mmpo.forward.options import ForwardOptions
from mmpo.forward.padded import padded_preference_logps
from mmpo.forward.scoring import attention_kernel, unwrap_model

_results: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_WEIGHTS = (1.0, -0.7, 0.4, -0.2)  # per-sequence weights: unequal, like a DPO loss's


def probe_examples(vocab_size: int) -> list[dict]:
    ids = lambda *xs: [1 + (x * 7919) % (vocab_size - 1) for x in xs]  # noqa: E731 - arbitrary in-vocab tokens
    return [
        {"prompt_ids": ids(1, 2, 3, 4), "chosen_ids": ids(5, 6, 7), "rejected_ids": ids(8, 9)},
        {"prompt_ids": ids(10, 11), "chosen_ids": ids(12), "rejected_ids": ids(13, 14, 15, 16, 17)},
    ]


def probe_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Trainable parameters of the first decoder layer (else none: nothing will be trained)."""
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            params = [p for p in module.parameters() if p.requires_grad]
            if params:
                return params
    return []


def dropout_free(model: torch.nn.Module) -> bool:
    config = getattr(unwrap_model(model), "config", None)
    dropouts = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    return not any(dropouts) and not getattr(config, "attention_dropout", 0.0)


@contextmanager
def plain_forward(model: torch.nn.Module) -> Iterator[None]:
    """The model's own forward inside the block, without the autocast wrapper that Accelerate's mixed
    precision puts around it (Accelerate keeps the plain one as ``_original_forward``, the one its
    ``extract_model_from_parallel(keep_fp32_wrapper=False)`` unwraps to), so the probe computes in
    float32 even when training runs under bf16 autocast."""
    original = model.__dict__.get("_original_forward")
    if original is None or "forward" not in model.__dict__:
        yield
        return
    wrapped = model.__dict__["forward"]
    model.forward = original
    try:
        yield
    finally:
        model.forward = wrapped


def _pass(run: Callable, params: list) -> tuple[torch.Tensor, list[torch.Tensor]]:
    with torch.enable_grad() if params else torch.no_grad():
        out = run()
        logps = torch.cat([out.chosen_logps, out.rejected_logps])
        if not params:
            return logps.detach(), []
        weights = torch.tensor(_WEIGHTS, dtype=logps.dtype, device=logps.device)
        grads = torch.autograd.grad((logps * weights).sum(), params, allow_unused=True)
    return logps.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def probe(model, options: ForwardOptions, pad_token_id: int, attention: str, fast: Callable) -> str | None:
    """Why ``attention`` does not give the padded path's numbers on this model, or None when it
    does (``fast``: ``fast_preference_logps``; see the module docstring)."""
    was_training = model.training
    train_mode = was_training and dropout_free(model)
    # the training mode is part of the key: a model first probed for its reference log-probs (eval,
    # no recompute) is probed again when it trains, with selective recompute and replays taking part
    key = (options, attention, attention_kernel(model), train_mode)
    results = _results.setdefault(model, {})
    if key in results:
        return results[key]
    examples = probe_examples(unwrap_model(model).config.vocab_size)
    kwargs = dict(pad_token_id=pad_token_id, compute_entropy=False, length_normalize=False)
    model.train(train_mode)
    params = probe_parameters(unwrap_model(model))
    device_type = next(model.parameters()).device.type
    try:
        with torch.autocast(device_type, enabled=False), plain_forward(model):
            want, want_grads = _pass(lambda: padded_preference_logps(model, examples, **kwargs), params)
            got, got_grads = _pass(lambda: fast(model, examples, options, attention, **kwargs), params)
        # float32 agrees to ~1e-6 here; 16-bit weights differ by rounding, so only gross errors count
        tolerance = 1e-4 if next(model.parameters()).dtype in (torch.float32, torch.float64) else 1e-1
        results[key] = None
        if not torch.allclose(got.float(), want.float(), rtol=tolerance, atol=tolerance):
            results[key] = "its log-probs differ from the padded path's"
        elif any(
            float((g - w).abs().max()) > 10 * tolerance * max(float(w.abs().max()), 1e-6)
            for g, w in zip(got_grads, want_grads)
        ):
            results[key] = "its gradients differ from the padded path's"
    except Exception as err:  # a model that rejects 4D masks, custom positions or extra arguments
        results[key] = f"{err.__class__.__name__}: {err}"
    finally:
        model.train(was_training)
    return results[key]
