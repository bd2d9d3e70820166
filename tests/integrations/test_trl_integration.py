"""MMPO inside TRL's ``DPOTrainer`` (``mmpo.integrations.trl``) against mmpo's own engine.

Both train the bundled world's SFT model in float32 on the same world pairs, in the engine's
order (TRL reads the dataset sequentially), with the same batch, optimizer and schedule; their
per-step losses and MMPO metrics must agree step by step, for the paper's settings and for the
ablations.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl", minversion="1.16", reason="the TRL integration needs trl>=1.16: pip install 'mmpo[trl]'")

from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM
from trl import DPOConfig

from mmpo.config import TrainConfig
from mmpo.data import load_rows, normalize_preference_row, prepare_preference_examples
from mmpo.data.order import epoch_order
from mmpo.integrations.trl import MMPOConfig, MMPOTrainer
from mmpo.modeling import load_tokenizer
from mmpo.training import train
from mmpo.world import bundled_path

SEED, STEPS, LR = 42, 3, 5e-4
MODEL = str(bundled_path("sft_model"))
TRL_ARGS = {
    "max_steps": STEPS,
    "learning_rate": LR,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0,
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "optim": "adamw_torch_fused",  # the engine's optimizer
    "logging_steps": 1,
    "save_strategy": "no",
    "report_to": "none",
    "bf16": False,
    "disable_tqdm": True,
    "seed": SEED,
    "use_cpu": True,
    "train_sampling_strategy": "sequential",  # TRL reads the pairs in the order given: the engine's
    "dataloader_num_workers": 0,
    "max_length": None,
}


def world_subset(tmp_path: Path, train_count: int, eval_count: int) -> tuple[str, str]:
    """The first pairs of the bundled world's train and test files, as files of their own."""
    out = []
    for name, count in (("prefs_train", train_count), ("prefs_test", eval_count)):
        lines = bundled_path(f"data/{name}.jsonl").read_text().splitlines()[:count]
        path = tmp_path / f"{name}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        out.append(str(path))
    return out[0], out[1]


def conversational(rows: list[dict]) -> Dataset:
    """TRL's conversational layout of mmpo's rows (TRL applies the chat template itself)."""
    pairs = [normalize_preference_row(row, i) for i, row in enumerate(rows)]
    return Dataset.from_list([{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs])


def train_records(records: list[dict]) -> list[dict]:
    return [r for r in records if "loss" in r and "eval_loss" not in r]


# Each case: the engine's settings, and the same settings as TRL arguments.
CASES = {
    # The one-line change: a plain DPOConfig; the paper's MMPO settings; reference log-probs precomputed.
    "paper-plain-dpoconfig": ({}, {"config": DPOConfig, "beta": 0.01, "precompute_ref_log_probs": True}),
    # Ablations: no auxiliary term, no normalization, other eps; a reference model kept in memory;
    # two micro-batches per optimizer step.
    "no-aux-no-norm": (
        {
            "aux_loss": False,
            "normalize": "none",
            "chosen_reward": 0.8,
            "rejected_reward": 0.3,
            "per_device_batch_size": 4,
            "gradient_accumulation_steps": 2,
        },
        {
            "config": MMPOConfig,
            "aux_loss": False,
            "normalize": "none",
            "chosen_reward": 0.8,
            "rejected_reward": 0.3,
            "precompute_ref_log_probs": False,
            "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 2,
        },
    ),
    # Ablations: per-token means and the entropy surrogate (both need the per-token view).
    "length-normalize-entropy": (
        {"length_normalize": True, "entropy_coef": 0.05, "aux_loss": False},
        {
            "config": MMPOConfig,
            "length_normalize": True,
            "entropy_coef": 0.05,
            "aux_loss": False,
            "precompute_ref_log_probs": True,
        },
    ),
    # LoRA through TRL's peft_config; the reference is the model with its adapters switched off.
    "lora": (
        {"lora": True, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "lora_target_modules": ("q_proj", "v_proj")},
        {
            "config": MMPOConfig,
            "precompute_ref_log_probs": False,
            "peft_config": LoraConfig(
                r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
            ),
        },
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_trl_mmpo_losses_equal_the_engines_step_by_step(tmp_path, case):
    engine_settings, trl_settings = CASES[case]
    train_file, eval_file = world_subset(tmp_path, train_count=8 * STEPS, eval_count=16)
    engine_settings = {"per_device_batch_size": 8, "gradient_accumulation_steps": 1, **engine_settings}

    result = train(
        TrainConfig(
            model=MODEL,
            dataset=(train_file,),
            eval_dataset=(eval_file,),
            objective="mmpo",
            beta=0.01,
            seed=SEED,
            max_steps=STEPS,
            learning_rate=LR,
            warmup_ratio=0.0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            dtype="float32",
            logging_steps=1,
            progress=False,
            output_dir=str(tmp_path / "engine"),
            cache_dir=str(tmp_path / "cache"),
            **engine_settings,
        )
    )
    engine_steps = train_records(result.metrics)
    engine_eval_before = next(r for r in result.metrics if r["step"] == 0 and "eval_loss" in r)

    # TRL sees the same pairs in the engine's order: the engine's row order, then its epoch-0 permutation.
    tokenizer = load_tokenizer(MODEL)
    rows = load_rows([train_file], seed=SEED)
    examples, _ = prepare_preference_examples(rows, tokenizer)
    assert len(examples) == len(rows)  # nothing dropped, so example i is row i
    ordered = [rows[i] for i in epoch_order(len(rows), SEED, 0)]
    eval_rows = load_rows([eval_file], seed=SEED)

    trl_settings = dict(trl_settings)
    config_class = trl_settings.pop("config")
    peft_config = trl_settings.pop("peft_config", None)
    batch = engine_settings["per_device_batch_size"]  # the engine evaluates in micro-batches of this size too
    args = config_class(
        output_dir=str(tmp_path / "trl"),
        per_device_eval_batch_size=batch,
        **{"per_device_train_batch_size": batch, **TRL_ARGS, **trl_settings},
    )
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    trainer = MMPOTrainer(
        model=model,
        args=args,
        train_dataset=conversational(ordered),
        eval_dataset=conversational(eval_rows),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    # TRL tokenized the pairs exactly as mmpo does.
    by_id = {ex["id"]: ex for ex in examples}
    for row, prepared in zip(ordered, trainer.train_dataset):
        ours = by_id[row["id"]]
        assert [prepared[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")] == [
            ours[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")
        ]

    trl_eval_before = trainer.evaluate()
    trainer.train()
    trl_steps = train_records(trainer.state.log_history)

    assert len(trl_steps) == len(engine_steps) == STEPS
    for key in (
        "loss",
        "mmpo/chosen_weight",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "rewards/accuracies",
    ):
        trl_values = [r[key] for r in trl_steps]
        engine_values = [r[key] for r in engine_steps]
        assert trl_values == pytest.approx(engine_values, rel=2e-4, abs=2e-5), key
    losses = [r["loss"] for r in engine_steps]
    assert len({round(x, 4) for x in losses}) == STEPS  # the model moved: equal losses are not a constant
    for key in ("entropy", "num_tokens", "mean_token_accuracy", "logits/chosen", "grad_norm", "learning_rate"):
        assert key in trl_steps[0], key  # TRL's own metrics are still logged
    for key in ("eval_mmpo/chosen_weight", "eval_rewards/margins", "eval_logps/chosen"):
        assert trl_eval_before[key] == pytest.approx(engine_eval_before[key], rel=2e-4), key
    if not engine_settings.get("entropy_coef"):  # the engine's eval_loss leaves the entropy term out; TRL's keeps it
        assert trl_eval_before["eval_loss"] == pytest.approx(engine_eval_before["eval_loss"], rel=2e-4)


CPU = {"use_cpu": True, "bf16": False, "report_to": "none"}


def test_trl_dpo_loss_options_are_refused_before_any_work(tmp_path):
    missing = str(tmp_path / "no-such-model")  # never loaded: the settings are checked first
    with pytest.raises(ValueError, match="loss_type=\\['ipo'\\]"):
        MMPOTrainer(
            model=missing,
            args=DPOConfig(output_dir=str(tmp_path), loss_type="ipo", **CPU),
            train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]),
        )
    with pytest.raises(ValueError, match="chosen_reward must be > rejected_reward"):
        MMPOTrainer(
            model=missing, args=MMPOConfig(output_dir=str(tmp_path), chosen_reward=0.1, rejected_reward=0.2, **CPU)
        )
    with pytest.raises(ValueError, match="normalize must be 'minmax' or 'none'"):
        MMPOTrainer(model=missing, args=MMPOConfig(output_dir=str(tmp_path), normalize="zscore", **CPU))


def test_plain_dpoconfig_with_dpo_beta_warns(tmp_path):
    # The model path does not exist: TRL stops right after the check and its warning.
    with pytest.warns(UserWarning, match="beta=0.1; MMPO's paper value is 0.01"), pytest.raises(OSError):
        MMPOTrainer(
            model=str(tmp_path / "no-such-model"),
            args=DPOConfig(output_dir=str(tmp_path), **CPU),
            train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]),
        )


def test_mmpo_config_round_trips_through_json(tmp_path):
    # TRL scripts save and reload their arguments; MMPO's fields must survive.
    args = MMPOConfig(output_dir=str(tmp_path), chosen_reward=0.7, aux_loss=False, entropy_coef=0.01, **CPU)
    values = json.loads(args.to_json_string())
    assert (values["beta"], values["chosen_reward"], values["aux_loss"], values["entropy_coef"]) == (
        0.01,
        0.7,
        False,
        0.01,
    )
