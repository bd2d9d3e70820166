"""Settings provenance: presets fill only what the user did not set, through the API, YAML and flags;
the global batch a preset states; the dry run; the authors'-code variant; settings without effect."""

from __future__ import annotations

import pytest

from mmpo.cli import parse
from mmpo.config import (
    ConfigError,
    SFTConfig,
    TrainConfig,
    apply_preset,
    from_dict,
    resolve,
    sources,
    with_values,
)
from mmpo.config.defaults import LORA_ALL_PROJECTIONS
from mmpo.config.provenance import flags_in_argv
from mmpo.dry_run import plan, render


def from_cli(argv: list[str]) -> TrainConfig:
    return apply_preset(parse(["train", *argv]).args)


def from_yaml(tmp_path, text: str) -> TrainConfig:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    from mmpo.config import load_yaml

    return apply_preset(from_dict(TrainConfig, load_yaml(path), source=str(path)))


# Each case: explicit values equal to a built-in default, which a preset used to overwrite.
CASES = [
    ("epochs", 1, ["--epochs", "1"]),
    ("gradient_accumulation_steps", 1, ["--gradient-accumulation-steps", "1"]),
    ("per_device_batch_size", 8, ["--per-device-batch-size", "8"]),
    ("dtype", "auto", ["--dtype", "auto"]),
]


@pytest.mark.parametrize("key,value,flags", CASES, ids=[c[0] for c in CASES])
def test_explicit_values_win_over_the_preset_through_api_yaml_and_flags(tmp_path, key, value, flags):
    api = apply_preset(TrainConfig(preset="smollm2-135m", **{key: value}))
    yaml_cfg = from_yaml(tmp_path, f"preset: smollm2-135m\n{key}: {value}\n")
    cli = from_cli(["--preset", "smollm2-135m", *flags])
    for cfg, source in ((api, "api"), (yaml_cfg, f"file:{tmp_path / 'run.yaml'}"), (cli, "flag")):
        assert getattr(cfg, key) == value and sources(cfg)[key] == source
        assert cfg.model == "runs/sft-smollm2-135m" and sources(cfg)["model"] == "preset"


def test_simpo_gamma_and_lora_targets_stay_as_given():
    simpo = apply_preset(TrainConfig(preset="smollm2-135m", objective="simpo", gamma=1.0))
    assert simpo.gamma == 1.0 and simpo.learning_rate == 1e-4  # lr still from the preset's SimPO column
    assert apply_preset(TrainConfig(preset="smollm2-135m", objective="simpo")).gamma == 1.6
    mine = apply_preset(TrainConfig(preset="llama3-8b", lora_target_modules=LORA_ALL_PROJECTIONS))
    assert mine.lora_target_modules == LORA_ALL_PROJECTIONS
    assert apply_preset(TrainConfig(preset="llama3-8b")).lora_target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    cli = from_cli(["--preset", "smollm2-135m", "--objective", "simpo", "--gamma", "1.0"])
    assert cli.gamma == 1.0


def test_underscore_and_negated_flags_are_recognised():
    assert flags_in_argv(TrainConfig, ["--per_device_batch_size", "3", "--no-aux-loss", "--beta=0.1", "x"]) == {
        "per_device_batch_size",
        "aux_loss",
        "beta",
    }


def test_preset_states_the_global_batch_and_accumulation_follows_processes():
    cfg = TrainConfig(preset="smollm2-135m", epochs=1, per_device_batch_size=8)
    one, four = plan(cfg, processes=1), plan(cfg, processes=4)
    assert (one["settings"]["gradient_accumulation_steps"], one["global_batch"]) == (16, 128)
    assert (four["settings"]["gradient_accumulation_steps"], four["global_batch"]) == (4, 128)
    assert one["settings"]["epochs"] == 1 and one["sources"]["epochs"] == "api"
    mine = plan(TrainConfig(preset="smollm2-135m", gradient_accumulation_steps=1))
    assert mine["global_batch"] == 2 and "differs from the preset's 128" in mine["batch_note"]
    with pytest.raises(ConfigError, match="global_batch_size 100 is not a multiple"):
        plan(TrainConfig(global_batch_size=100, per_device_batch_size=8))


def test_dry_run_shows_sources_counts_and_steps_without_loading(monkeypatch):
    import mmpo.modeling

    monkeypatch.setattr(mmpo.modeling, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    result = plan(TrainConfig(epochs=2, per_device_batch_size=8))
    assert result["train_rows"] == 2000 and result["eval_rows"] == 300  # the bundled world
    assert result["steps_per_epoch"] == 250 and result["total_steps"] == 500
    text = render(result)
    assert "[api]" in text and "[objective default]" in text and "500 in total" in text
    hub = plan(TrainConfig(preset="smollm2-135m-instruct"))
    assert hub["train_rows"] == 12359 + 61135  # the paper's Hub datasets, counted from a table offline
    assert hub["notes"] == []  # the -instruct preset needs no SFT stage
    stage = plan(TrainConfig(preset="smollm2-135m"))
    assert "run `mmpo sft --preset smollm2-135m` first" in render(stage)
    assert hub["steps_per_epoch"] == (12359 + 61135) // 128
    unknown = plan(TrainConfig(dataset=("someone/unknown-prefs:train",)))
    assert unknown["train_rows"] is None and "size unknown offline" in render(unknown)


def test_sft_presets_and_the_two_starting_points():
    sft = apply_preset(SFTConfig(preset="smollm2-135m"))
    assert sft.model == "HuggingFaceTB/SmolLM2-135M" and sft.epochs == 2 and sft.output_dir == "runs/sft-smollm2-135m"
    assert sft.chat_template_path.endswith("chatml.jinja")
    assert apply_preset(SFTConfig(preset="llama3.2-1b")).epochs == 3
    assert apply_preset(TrainConfig(preset="smollm2-135m")).model == sft.output_dir
    assert apply_preset(TrainConfig(preset="smollm2-135m-instruct")).model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(ConfigError, match="unknown sft preset 'llama3-8b'"):
        apply_preset(SFTConfig(preset="llama3-8b"))


@pytest.mark.parametrize("beta", [0.01, 0.5])
def test_authors_code_variant_ties_the_entropy_bonus_to_beta(beta):
    cfg = resolve(TrainConfig(variant="authors-code", beta=beta))
    assert cfg.entropy_coef == beta and cfg.chosen_reward == 1.0
    assert sources(cfg)["entropy_coef"] == "variant authors-code"
    mine = resolve(TrainConfig(variant="authors-code", beta=beta, entropy_coef=0.0, chosen_reward=0.9))
    assert mine.entropy_coef == 0.0 and mine.chosen_reward == 0.9
    assert resolve(TrainConfig(beta=beta)).entropy_coef == 0.0  # the paper's objective has none


@pytest.mark.parametrize(
    "values,match",
    [
        (dict(objective="dpo", chosen_reward=0.8), "only MMPO uses it"),
        (dict(objective="simpo", aux_loss=False), "only MMPO uses it"),
        (dict(objective="dpo", gamma=1.5), "only SimPO uses it"),
        (dict(objective="simpo", length_normalize=True), "SimPO always uses per-token means"),
        (dict(normalize="none", normalize_scope="step"), "normalize is 'none'"),
        (dict(lora_r=8), "LoRA is off"),
        (dict(eval_dataset=(), eval_steps=5), "there is no eval_dataset"),
        (dict(max_steps=0), "must be -1 \\(run all epochs\\) or >= 1"),
        (dict(save_total_limit=-1), "must be >= 0"),
        (dict(report_to=("tensorboard", "none")), "'none' cannot be combined"),
        (dict(report_to=("neptune",)), "trackers are"),
    ],
)
def test_settings_that_would_do_nothing_are_refused(values, match):
    with pytest.raises(ConfigError, match=match):
        resolve(TrainConfig(**values))


def test_a_value_equal_to_its_default_is_not_refused_and_saved_configs_reload(tmp_path):
    resolve(TrainConfig(objective="dpo", chosen_reward=0.9))  # equal to the default: harmless
    saved = resolve(TrainConfig(objective="dpo"))
    from mmpo.config import to_dict

    resolve(from_dict(TrainConfig, to_dict(saved), source="saved"))  # every key present, none refused


def test_yaml_scientific_notation_is_a_number(tmp_path):
    cfg = from_yaml(tmp_path, "learning_rate: 5e-4\nbeta: 1e-2\n")
    assert cfg.learning_rate == 5e-4 and cfg.beta == 0.01
    with pytest.raises(ConfigError, match="config key 'beta': must be a number"):
        resolve(from_yaml(tmp_path, "beta: fast\n"))


def test_with_values_keeps_the_record():
    cfg = with_values(TrainConfig(epochs=3), "sweep", beta=0.5)
    assert sources(cfg)["epochs"] == "api" and sources(cfg)["beta"] == "sweep" and sources(cfg)["seed"] == "default"


def test_resume_compares_the_global_batch_not_the_accumulation_derived_from_it():
    from mmpo.config import resume_mismatches, to_dict

    saved = to_dict(
        with_values(TrainConfig(global_batch_size=128), "global_batch_size", gradient_accumulation_steps=16)
    )
    assert (
        resume_mismatches(saved, TrainConfig(global_batch_size=128)) == []
    )  # re-planned: accumulation not derived yet
    assert resume_mismatches(saved, TrainConfig(global_batch_size=64)) == ["global_batch_size"]
    plain = to_dict(TrainConfig(gradient_accumulation_steps=2))
    assert resume_mismatches(plain, TrainConfig(gradient_accumulation_steps=4)) == ["gradient_accumulation_steps"]
