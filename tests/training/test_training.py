"""The training engine end to end on a tiny model: objectives, ablations, checkpoints, resume, cache."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import WORDS
from mmpo.config import ConfigError, SFTConfig, TrainConfig
from mmpo.data import load_preference_examples
from mmpo.data.order import epoch_order, example_length, step_micro_batches
from mmpo.modeling import load_tokenizer
from mmpo.training import sft, train


def config(tmp_path, tiny_model_dir, prefs, **overrides) -> TrainConfig:
    train_file, test_file = prefs
    values = dict(
        model=str(tiny_model_dir),
        dataset=(train_file,),
        eval_dataset=(test_file,),
        output_dir=str(tmp_path / "run"),
        per_device_batch_size=4,
        gradient_accumulation_steps=2,
        epochs=1,
        learning_rate=1e-3,
        progress=False,
        cache_dir=str(tmp_path / "cache"),
        logging_steps=1,
    )
    values.update(overrides)
    return TrainConfig(**values)


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_mmpo_run_writes_trl_metrics_checkpoint_and_summary(tmp_path, tiny_model_dir, prefs):
    result = train(config(tmp_path, tiny_model_dir, prefs, epochs=2))
    run = Path(result.output_dir)
    records = read_metrics(run)
    train_records = [r for r in records if "loss" in r]
    for key in (
        "loss",
        "grad_norm",
        "learning_rate",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "mmpo/chosen_weight",
        "tokens_per_second",
    ):
        assert key in train_records[0], key
    evals = [r for r in records if "eval_rewards/accuracies" in r]
    assert evals[0]["step"] == 0 and len(evals) == 3  # before training, after each epoch
    assert result.global_step == 2 * (32 // 8)
    for name in ("epoch-1", "epoch-2"):
        ckpt = run / "checkpoints" / name
        assert (ckpt / "manifest.json").is_file() and (ckpt / "model" / "model.safetensors").is_file()
        assert (ckpt / "model" / "tokenizer.json").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval_reward_accuracy_before"] == evals[0]["eval_rewards/accuracies"]
    assert summary["final_model"] == str(run)  # the final model at the top of output_dir, as HF Trainer leaves it
    assert (run / "README.md").is_file() and (run / "trainer_state.json").is_file()
    # The trained model is loadable as a normal transformers folder.
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(summary["final_model"])


@pytest.mark.parametrize(
    "overrides",
    [
        {"objective": "dpo"},
        {"objective": "simpo"},
        {"length_normalize": True},
        {"entropy_coef": 0.01},
        {"aux_loss": False},
        {"normalize": "none"},
        {"normalize_scope": "step"},
    ],
)
def test_objectives_and_ablations_train(tmp_path, tiny_model_dir, prefs, overrides):
    result = train(config(tmp_path, tiny_model_dir, prefs, max_steps=2, **overrides))
    losses = [r["loss"] for r in result.metrics if "loss" in r]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def test_training_moves_weights_and_raises_reward_accuracy(tmp_path, tiny_model_dir, prefs):
    result = train(config(tmp_path, tiny_model_dir, prefs, epochs=3, objective="dpo", learning_rate=5e-3))
    evals = [r for r in result.metrics if "eval_rewards/accuracies" in r]
    # DPO rewards are 0 for every pair before training (policy == reference), up to the rounding of
    # different batch layouts in the reference pass and the evaluation pass.
    assert abs(evals[0]["eval_rewards/margins"]) < 1e-4 and abs(evals[0]["eval_rewards/chosen"]) < 1e-4
    assert evals[-1]["eval_rewards/accuracies"] > 0.5


def test_resume_from_epoch_checkpoint_matches_uninterrupted(tmp_path, tiny_model_dir, prefs):
    full = train(config(tmp_path / "a", tiny_model_dir, prefs, epochs=2))
    # A run that died after its first epoch checkpoint: the same folder without epoch 2.
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "run" / "checkpoints" / "epoch-2")
    resumed = train(config(tmp_path / "b", tiny_model_dir, prefs, epochs=2, resume=True))
    records = read_metrics(Path(resumed.output_dir))
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 9))  # no duplicated steps
    assert resumed.global_step == full.global_step
    a = load_file(Path(full.output_dir) / "checkpoints/epoch-2/model/model.safetensors")
    b = load_file(Path(resumed.output_dir) / "checkpoints/epoch-2/model/model.safetensors")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_reference_cache_is_reused(tmp_path, tiny_model_dir, prefs, capsys):
    train(config(tmp_path / "one", tiny_model_dir, prefs, max_steps=1, cache_dir=str(tmp_path / "shared")))
    files = list((tmp_path / "shared").glob("*.pt"))
    assert len(files) == 2  # train and eval sets
    capsys.readouterr()
    train(config(tmp_path / "two", tiny_model_dir, prefs, max_steps=1, cache_dir=str(tmp_path / "shared"), beta=0.5))
    assert "cache hit" in capsys.readouterr().out
    assert len(list((tmp_path / "shared").glob("*.pt"))) == 2


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"beta": 0.0}, "beta"),
        ({"beta": -1.0}, "beta"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"epochs": 0}, "epochs"),
        ({"per_device_batch_size": 64}, "global batch"),
    ],
)
def test_bad_config_fails_before_training(tmp_path, tiny_model_dir, prefs, overrides, key):
    with pytest.raises(ConfigError, match=key):
        train(config(tmp_path, tiny_model_dir, prefs, **overrides))


def test_resume_with_another_config_is_refused(tmp_path, tiny_model_dir, prefs):
    train(config(tmp_path, tiny_model_dir, prefs, max_steps=1))
    with pytest.raises(ConfigError, match="beta"):
        train(config(tmp_path, tiny_model_dir, prefs, max_steps=2, resume=True, beta=0.3))
    with pytest.raises(ConfigError, match="--resume"):
        train(config(tmp_path, tiny_model_dir, prefs, max_steps=2))


def test_micro_batch_layout_is_the_same_across_processes_and_accumulation():
    order = list(range(100))
    one, step1 = step_micro_batches(order, 1, per_device=2, accumulation=4, world_size=1, rank=0)
    r0, step2 = step_micro_batches(order, 1, per_device=2, accumulation=2, world_size=2, rank=0)
    r1, _ = step_micro_batches(order, 1, per_device=2, accumulation=2, world_size=2, rank=1)
    assert step1 == step2 == list(range(8, 16))
    assert one == [r0[0], r1[0], r0[1], r1[1]]


def test_group_by_length_trains_on_steps_of_similar_length(tmp_path, tiny_model_dir, prefs, monkeypatch):
    """The padded path with length grouping: each step's pairs have similar lengths, longest first."""
    import mmpo.training.loop as engine

    steps: list[list[int]] = []
    layout = engine.step_micro_batches

    def recording_layout(order, step, **kwargs):
        micro, step_indices = layout(order, step, **kwargs)
        steps.append(step_indices)
        return micro, step_indices

    monkeypatch.setattr(engine, "step_micro_batches", recording_layout)
    cfg = config(
        tmp_path, tiny_model_dir, prefs, packing=False, share_prompt=False, group_by_length=True, eval_dataset=()
    )
    result = train(cfg)
    assert all(torch.isfinite(torch.tensor([r["loss"] for r in result.metrics if "loss" in r])))
    examples, _ = load_preference_examples([prefs[0]], load_tokenizer(cfg.model), seed=cfg.seed)
    lengths = [example_length(e) for e in examples]

    def mean_spread(batches):
        return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)

    order = epoch_order(len(examples), cfg.seed, 0)
    shuffled = [order[i : i + 8] for i in range(0, len(steps) * 8, 8)]
    assert len(steps) == len(examples) // 8 and len({i for s in steps for i in s}) == len(steps) * 8
    assert mean_spread(steps) < 0.5 * mean_spread(shuffled)
    assert [lengths[i] for i in steps[0]] == sorted((lengths[i] for i in steps[0]), reverse=True)


def test_sft_lowers_loss_on_assistant_tokens(tmp_path, tiny_model_dir):
    data = tmp_path / "chat.jsonl"
    with open(data, "w") as handle:
        for word in WORDS * 4:
            handle.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": f"Repeat the word {word}."},
                            {"role": "assistant", "content": word},
                        ]
                    }
                )
                + "\n"
            )
    result = sft(
        SFTConfig(
            model=str(tiny_model_dir),
            dataset=(str(data),),
            eval_dataset=(str(data),),
            output_dir=str(tmp_path / "sft"),
            epochs=6,
            per_device_batch_size=8,
            learning_rate=1e-2,
            progress=False,
            logging_steps=1,
        )
    )
    evals = [r["eval_loss"] for r in result.metrics if "eval_loss" in r]
    assert evals[-1] < evals[0] * 0.6


def test_cli_help_documents_every_option():
    out = subprocess.run(
        [sys.executable, "-m", "mmpo.cli", "train", "--help"],
        capture_output=True,
        text=True,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
        check=True,
    ).stdout
    for flag in (
        "--objective",
        "--beta",
        "--length-normalize",
        "--entropy-coef",
        "--no-aux-loss",
        "--normalize",
        "--preset",
        "--model",
        "--dataset",
        "--resume",
        "--lora",
        "--normalize-scope",
    ):
        assert flag in out, flag


def test_cli_train_with_yaml_and_overrides(tmp_path, tiny_model_dir, prefs):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(
        f"model: {tiny_model_dir}\ndataset: [{prefs[0]}]\neval_dataset: [{prefs[1]}]\n"
        f"per_device_batch_size: 4\nmax_steps: 2\nobjective: dpo\ncache_dir: {tmp_path / 'c'}\n"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mmpo.cli",
            "train",
            "--config",
            str(cfg_file),
            "--output-dir",
            str(tmp_path / "cli_run"),
            "--objective",
            "simpo",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    saved = (tmp_path / "cli_run" / "config.yaml").read_text()
    assert "objective: simpo" in saved and "max_steps: 2" in saved


def test_cli_rejects_unknown_yaml_key(tmp_path):
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text("betta: 0.1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "mmpo.cli", "train", "--config", str(cfg_file)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "unknown config key 'betta'" in proc.stderr and "beta" in proc.stderr


def test_lora_run_uses_base_as_reference_and_saves_an_adapter(tmp_path, tiny_model_dir, prefs):
    result = train(
        config(
            tmp_path,
            tiny_model_dir,
            prefs,
            lora=True,
            lora_r=4,
            lora_alpha=8,
            max_steps=2,
            learning_rate=1e-2,
            lora_target_modules=("q_proj", "v_proj"),
        )
    )
    model_dir = Path(result.summary["final_model"])
    assert (model_dir / "adapter_config.json").is_file() and not (model_dir / "model.safetensors").exists()
    evals = [r for r in result.metrics if "eval_rewards/accuracies" in r]
    # Before training the adapters are zero, so the policy equals the reference: MMPO scores differ
    # only by the normalized priors, and DPO-style rewards would be exactly 0.
    assert evals[0]["step"] == 0
    from peft import AutoPeftModelForCausalLM

    AutoPeftModelForCausalLM.from_pretrained(model_dir)


def test_preset_fills_paper_settings_but_explicit_values_win():
    from mmpo.config import apply_preset
    from mmpo.config.training import batch_layout

    cfg = apply_preset(TrainConfig(preset="llama3.2-1b", objective="dpo", epochs=2))
    assert cfg.model == "runs/sft-llama3.2-1b" and cfg.lora and cfg.lora_r == 64  # the SFT stage's output
    assert cfg.learning_rate == 5e-4 and cfg.optimizer == "adamw_8bit" and cfg.epochs == 2
    assert cfg.global_batch_size == 128 and batch_layout(cfg, processes=4).accumulation == 16  # the paper's 2 x 16 x 4
    instruct = apply_preset(TrainConfig(preset="llama3.2-1b-instruct", objective="dpo"))
    assert instruct.model == "meta-llama/Llama-3.2-1B-Instruct" and instruct.lora
    simpo = apply_preset(TrainConfig(preset="smollm2-135m", objective="simpo"))
    assert simpo.gamma == 1.6 and simpo.learning_rate == 1e-4 and not simpo.lora
    with pytest.raises(ConfigError, match="unknown train preset"):
        apply_preset(TrainConfig(preset="gpt5"))
