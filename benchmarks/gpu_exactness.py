"""Every fast layout against the padded path on one device: log-probs and gradients, fp32 and bf16.

    python benchmarks/gpu_exactness.py --device cuda --out exactness.json

A small Llama with grouped-query attention and scaled-up weights (so a wrong mask or position
moves the log-probs; tests/forward/ uses the same idea on CPU) scores real tokenized pairs of the
benchmark's workload. For each attention mode (FlexAttention, segmented sdpa, dense mask) and
layout (shared prompt, packing, both with chunked log-probs, with and without selective
recompute; Liger's fused head where installed) the DPO loss and the MMPO loss with the entropy
term are backpropagated and compared with the padded path's:

* ``fp32``: float32 weights, no autocast: log-probs within 1e-4 (relative to their scale) and
  every parameter's gradient within 1e-3 of its largest entry.
* ``bf16``: float32 master weights under bf16 autocast (the GPU training default). Layouts may
  round differently, so each is held against the float32 padded result: its error (log-probs,
  and the gradients' relative L2 error) must stay within 2x the bf16 padded path's own error
  (+ a small floor).

On CPU (the dry mode) FlexAttention is checked without gradients: torch has no CPU backward for it.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

OBJECTIVES = ("dpo", "entropy")
MODES = ("flex", "segmented", "mask")


def layouts(liger: bool):
    from mmpo.forward import ForwardOptions

    out = {
        "shared-prompt": ForwardOptions(share_prompt=True, packing=False, logits_chunk_size=0),
        "packed": ForwardOptions(share_prompt=False, packing=True, logits_chunk_size=5),
        "shared+packed+chunked": ForwardOptions(logits_chunk_size=4),
        "shared+packed, no recompute": ForwardOptions(logits_chunk_size=4, selective_recompute=False),
    }
    if liger:
        out["shared+packed, liger head"] = ForwardOptions(liger_head=True)
    return out


def test_model(tokenizer, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        attention_dropout=0.0,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.3)
    model.set_attn_implementation("sdpa")
    return model.to(device).train()


def test_pairs(tokenizer, count: int = 6) -> list[dict]:
    from workload import synthetic_pairs

    from mmpo.data import prepare_preference_examples

    examples, _ = prepare_preference_examples(synthetic_pairs(count, 1, (5, 60), (2, 40)), tokenizer)
    return examples


def loss_of(objective: str, logps) -> torch.Tensor:
    from mmpo.objectives import dpo_loss, mmpo_loss

    batch = logps.chosen_logps.shape[0]
    ref_w = torch.linspace(-60.0, -10.0, batch, device=logps.chosen_logps.device)
    ref_l = torch.linspace(-50.0, -20.0, batch, device=logps.chosen_logps.device)
    if objective == "dpo":
        return dpo_loss(logps.chosen_logps, logps.rejected_logps, ref_w, ref_l, beta=0.1).losses.mean()
    entropy = torch.cat([logps.chosen_entropy, logps.rejected_entropy]).mean()
    return mmpo_loss(logps.chosen_logps, logps.rejected_logps, ref_w, ref_l, beta=0.5).losses.mean() - 0.3 * entropy


def run_pass(model, examples, pad: int, objective: str, options, mode: str | None, precision: str, grads: bool):
    """(log-probs [2B] in float32, flat gradient or None) of one path."""
    from mmpo.forward import preference_logps
    from mmpo.forward.logps import fast_preference_logps

    device_type = next(model.parameters()).device.type
    kwargs = dict(pad_token_id=pad, compute_entropy=objective == "entropy", length_normalize=False)
    model.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(grads), torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        if mode is None:
            out = preference_logps(model, examples, **kwargs)
        else:
            out = fast_preference_logps(model, examples, options, mode, **kwargs)
        loss = loss_of(objective, out)
    logps = torch.cat([out.chosen_logps, out.rejected_logps]).detach().float()
    if not grads:
        return logps, None
    loss.backward()
    flat = torch.cat([p.grad.detach().float().flatten() for p in model.parameters() if p.grad is not None])
    return logps, flat


def compare(got, want, reference) -> dict:
    """Errors of ``got`` (and, for bf16, of the padded ``want``) against ``reference``."""
    (logps, grad), (ref_logps, ref_grad) = got, reference
    scale = float(ref_logps.abs().max())
    row = {"logps_error": float((logps - ref_logps).abs().max()) / scale}
    if grad is not None:
        row["grad_error"] = float((grad - ref_grad).norm() / ref_grad.norm())
        row["grad_max_error"] = float((grad - ref_grad).abs().max() / ref_grad.abs().max())
    if want is not None:
        row["padded_logps_error"] = float((want[0] - ref_logps).abs().max()) / scale
        if grad is not None:
            row["padded_grad_error"] = float((want[1] - ref_grad).norm() / ref_grad.norm())
    return row


def passes(row: dict, precision: str) -> bool:
    if precision == "fp32":
        return row["logps_error"] <= 1e-4 and row.get("grad_max_error", 0.0) <= 1e-3
    ok = row["logps_error"] <= 2 * row["padded_logps_error"] + 1e-3
    return ok and row.get("grad_error", 0.0) <= 2 * row.get("padded_grad_error", 0.0) + 1e-2


def check(device: str, precisions=("fp32", "bf16"), objectives=OBJECTIVES) -> dict:
    from workload import bench_tokenizer

    from mmpo.forward.flex import flex_available
    from mmpo.forward.liger import liger_version
    from mmpo.forward.logps import attention_candidates, choose_attention

    tokenizer = bench_tokenizer()
    model = test_model(tokenizer, device)
    examples, pad = test_pairs(tokenizer), tokenizer.pad_token_id
    modes = [m for m in MODES if m != "flex" or flex_available()]
    liger = device == "cuda" and (liger_version() or (0,)) >= (0, 8, 5)
    from mmpo.forward import ForwardOptions

    rows, started = [], time.perf_counter()
    for precision in precisions:
        for objective in objectives:
            reference = run_pass(model, examples, pad, objective, None, None, "fp32", True)
            padded = run_pass(model, examples, pad, objective, None, None, precision, True)
            cases = [
                ("padded", label, options)
                for label, options in (
                    (
                        "chunked-only",
                        ForwardOptions(
                            share_prompt=False, packing=False, logits_chunk_size=3, selective_recompute=False
                        ),
                    ),
                    ("recompute-only", ForwardOptions(share_prompt=False, packing=False, logits_chunk_size=0)),
                )
            ]
            cases += [
                (mode, label, options)
                for mode in modes
                for label, options in layouts(liger).items()
                if not (options.liger_head and (mode != modes[0] or objective == "entropy"))
            ]
            for mode, label, options in cases:
                grads = not (mode == "flex" and device != "cuda")  # no FlexAttention backward off CUDA
                try:
                    got = run_pass(model, examples, pad, objective, options, mode, precision, grads)
                    row = compare(got, None if precision == "fp32" else padded, reference)
                    row["ok"] = passes(row, precision)
                except Exception as error:  # one broken case must not hide the others' results
                    row = {"ok": False, "error": f"{type(error).__name__}: {error}"[:500]}
                rows.append(
                    {
                        "precision": precision,
                        "objective": objective,
                        "attention": mode,
                        "layout": label,
                        "gradients": grads,
                        **row,
                    }
                )
    chosen = choose_attention(model, ForwardOptions(), pad, max(len(e["prompt_ids"]) + 80 for e in examples))
    return {
        "device": device,
        "torch": torch.__version__,
        "seconds": time.perf_counter() - started,
        "candidates": attention_candidates(model, ForwardOptions()),
        "automatic_choice": chosen,
        "liger": liger,
        "passed": all(r["ok"] for r in rows),
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=list(OBJECTIVES))
    parser.add_argument("--out", default=None, help="write the results here as JSON")
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        result = check(args.device, tuple(args.precisions), tuple(args.objectives))
    for row in result["rows"]:
        errors = {k: f"{v:.1e}" for k, v in row.items() if k.endswith("error") and isinstance(v, float)}
        print(
            f"{'ok  ' if row['ok'] else 'FAIL'} {row['precision']:<4} {row['objective']:<7} {row['attention']:<9} "
            f"{row['layout']:<28} {errors or row.get('error', '')}",
            flush=True,
        )
    print(
        f"automatic choice on {result['device']}: {result['automatic_choice']} (candidates "
        f"{result['candidates']}); {'all passed' if result['passed'] else 'FAILURES'} in {result['seconds']:.0f} s"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
