"""The `sft` preference objective (NLL of the chosen answers): the baseline default MMPO equals up to
a constant. Same pairs, same order: the two runs end with the same weights."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from mmpo.config import TrainConfig
from mmpo.objectives import chosen_nll_loss, mmpo_loss
from mmpo.training import train


def test_chosen_nll_has_mmpo_defaults_gradient():
    torch.manual_seed(0)
    logp_w, logp_l = (torch.randn(6, dtype=torch.float64, requires_grad=True) for _ in range(2))
    ref_w, ref_l = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    (g_sft_w, g_sft_l) = torch.autograd.grad(
        chosen_nll_loss(logp_w, logp_l).losses.mean(), (logp_w, logp_l), allow_unused=True, materialize_grads=True
    )
    (g_mmpo_w, g_mmpo_l) = torch.autograd.grad(mmpo_loss(logp_w, logp_l, ref_w, ref_l).losses.mean(), (logp_w, logp_l))
    torch.testing.assert_close(g_sft_w, g_mmpo_w)
    torch.testing.assert_close(g_sft_l, g_mmpo_l)  # zero for both: the rejected answer gets no gradient
    assert float(g_sft_l.abs().max()) == 0.0


def test_sft_objective_run_ends_with_default_mmpos_weights(tmp_path, tiny_model_dir, prefs):
    common = dict(
        model=str(tiny_model_dir),
        dataset=(prefs[0],),
        eval_dataset=(),
        per_device_batch_size=4,
        max_steps=3,
        learning_rate=1e-3,
        progress=False,
        cache_dir=str(tmp_path / "cache"),
    )
    runs = {}
    for objective in ("mmpo", "sft"):
        result = train(TrainConfig(objective=objective, output_dir=str(tmp_path / objective), **common))
        runs[objective] = load_file(Path(result.output_dir) / "model.safetensors")
        assert result.summary["objective"] == objective
    for name, tensor in runs["mmpo"].items():
        torch.testing.assert_close(runs["sft"][name], tensor, rtol=1e-5, atol=1e-6)
    assert not torch.equal(
        runs["sft"]["model.layers.0.mlp.down_proj.weight"],
        load_file(Path(tiny_model_dir) / "model.safetensors")["model.layers.0.mlp.down_proj.weight"],
    )
