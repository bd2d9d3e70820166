"""TRL / alignment-handbook recipes run here: their key names are read as ours."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import write_prefs
from mmpo.config import ConfigError, TrainConfig, bundled_path, from_dict, sources

HANDBOOK_DPO = {
    # Model arguments
    "model_name_or_path": None,  # filled by the test
    "torch_dtype": "float32",
    "attn_implementation": "sdpa",
    # Data training arguments
    "chat_template": "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}",
    "dataset_mixture": {"datasets": [{"id": None, "config": "default", "split": "train", "weight": 1.0}]},
    "dataset_num_proc": 12,
    # DPOTrainer arguments
    "bf16": False,
    "beta": 0.01,
    "do_eval": False,
    "eval_strategy": "no",
    "gradient_accumulation_steps": 2,
    "gradient_checkpointing": False,
    "hub_model_id": "someone/zephyr-dpo",
    "learning_rate": 5.0e-7,
    "log_level": "info",
    "logging_steps": 1,
    "lr_scheduler_type": "cosine",
    "max_length": 96,
    "max_prompt_length": 48,
    "num_train_epochs": 1,
    "optim": "adamw_torch",
    "output_dir": None,
    "per_device_train_batch_size": 4,
    "per_device_eval_batch_size": 8,
    "push_to_hub": False,
    "save_strategy": "steps",
    "seed": 42,
    "warmup_ratio": 0.1,
    "loss_type": "sigmoid",
    "precompute_ref_log_probs": True,
    "report_to": ["none"],
}


def handbook_recipe(tmp_path: Path) -> Path:
    data = write_prefs(tmp_path / "prefs.jsonl", 16)
    recipe = {**HANDBOOK_DPO, "model_name_or_path": str(bundled_path("sft_model")), "output_dir": str(tmp_path / "run")}
    recipe["dataset_mixture"] = {"datasets": [{**recipe["dataset_mixture"]["datasets"][0], "id": str(data)}]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_handbook_dpo_recipe_reads_as_our_settings(tmp_path, capsys):
    path = handbook_recipe(tmp_path)
    cfg = from_dict(TrainConfig, yaml.safe_load(path.read_text()), source=str(path))
    assert cfg.model.endswith("sft_model") and cfg.per_device_batch_size == 4 and cfg.epochs == 1
    assert cfg.objective == "dpo" and cfg.optimizer == "adamw" and cfg.dtype == "float32"
    assert cfg.max_prompt_length == 48 and cfg.max_completion_length == 48  # their max_length is the sum
    assert cfg.dataset == (str(tmp_path / "prefs.jsonl") + ":train",) and cfg.precompute_ref
    assert Path(cfg.chat_template_path).read_text().startswith("{% for m in messages %}")
    assert sources(cfg)["epochs"] == f"file:{path}"
    assert "ignored" in capsys.readouterr().out  # do_eval, hub_model_id, ... are named once


def test_handbook_recipe_trains_with_objective_mmpo(tmp_path):
    path = handbook_recipe(tmp_path)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mmpo.cli",
            "train",
            "--config",
            str(path),
            "--objective",
            "mmpo",
            "--no-progress",
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["objective"] == "mmpo" and summary["steps"] == 16 // 8
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "run")  # the final model at the top of output_dir


@pytest.mark.parametrize(
    "values,match",
    [
        ({"optim": "sgd"}, "optim 'sgd' is not supported"),
        ({"loss_type": "ipo"}, "loss_type 'ipo': only sigmoid, simpo"),
        ({"cpo_alpha": 1.0}, "pure SimPO"),
        ({"lr_scheduler_type": "linear"}, "cosine with warm-up"),
        ({"max_length": 512}, "max_length needs max_prompt_length"),
        ({"num_train_epoch": 3}, "did you mean 'num_train_epochs'|did you mean 'epochs'"),
        ({"model_name_or_path": "x", "model": "y"}, "both set 'model'"),
    ],
)
def test_recipe_keys_that_cannot_work_are_named(values, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(TrainConfig, values, source="recipe.yaml")


def test_simpo_recipe_keys(tmp_path):
    cfg = from_dict(TrainConfig, {"loss_type": "simpo", "cpo_alpha": 0.0, "simpo_gamma": 1.6, "beta": 2.0}, source="r")
    assert cfg.objective == "simpo" and cfg.gamma == 1.6
