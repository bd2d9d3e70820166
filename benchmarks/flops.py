"""Useful FLOPs of a preference-training step and the accelerator's peak, for MFU.

*Useful* FLOPs count the work a pair needs, whatever the trainer does: the prompt once, then
the chosen and the rejected completion each attending to the prompt and causally to itself,
through every layer; the LM head only where a completion token is predicted; forward and
backward (3 x the forward's matrix products). Recompute, padding, a second pass over the prompt
and LM-head work on prompt positions are not useful work, so they are not counted: both trainers
get the same count for the same pairs, and MFU = useful FLOPs / step time / card peak compares
them like their throughput does.

Per pair with prompt, chosen and rejected lengths p, c, r (forward, multiply-adds x 2):

* matrix products of the decoder layers: 2 x N_body x (p + c + r), N_body = parameters outside
  the embedding and LM head;
* LM head: 2 x d_model x vocab x (c + r);
* attention scores and values: 4 x layers x (heads x head_dim) x query-key pairs, with pairs
  p(p+1)/2 + c*p + c(c+1)/2 + r*p + r(r+1)/2.
"""

from __future__ import annotations

#: Dense bf16 tensor-core peaks (spec sheets, FLOP/s) by a substring of torch's device name.
CARD_PEAKS_BF16 = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 80GB HBM3": 989e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 70e12,
}


def card_peak(device_name: str) -> float | None:
    for key, peak in CARD_PEAKS_BF16.items():
        if key in device_name:
            return peak
    return None


def model_dims(config) -> dict:
    """What the count needs from a transformers config."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {
        "layers": config.num_hidden_layers,
        "hidden": config.hidden_size,
        "vocab": config.vocab_size,
        "attention_width": config.num_attention_heads * head_dim,
    }


def body_parameters(params: int, dims: dict, tied: bool) -> int:
    """Parameters outside the input embedding and the LM head."""
    embedding = dims["vocab"] * dims["hidden"]
    return params - embedding * (1 if tied else 2)


def pair_flops(p: int, c: int, r: int, *, body: int, dims: dict) -> float:
    """Useful training FLOPs of one pair (module docstring)."""
    pairs = p * (p + 1) / 2 + c * p + c * (c + 1) / 2 + r * p + r * (r + 1) / 2
    forward = (
        2 * body * (p + c + r)
        + 2 * dims["hidden"] * dims["vocab"] * (c + r)
        + 4 * dims["layers"] * dims["attention_width"] * pairs
    )
    return 3 * forward


def step_flops(examples: list[dict], *, body: int, dims: dict) -> float:
    return sum(
        pair_flops(len(e["prompt_ids"]), len(e["chosen_ids"]), len(e["rejected_ids"]), body=body, dims=dims)
        for e in examples
    )
