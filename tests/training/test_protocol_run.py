"""Runs that exercise the protocol settings for real: mixed precision on CPU, trackers that write
files read back with their own readers, the start-up notes and the length check."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmpo.config import ConfigError, TrainConfig
from mmpo.training import train


def small_run(tmp_path, tiny_model_dir, prefs, **overrides) -> TrainConfig:
    values = dict(
        model=str(tiny_model_dir),
        dataset=(prefs[0],),
        eval_dataset=(prefs[1],),
        output_dir=str(tmp_path / "run"),
        per_device_batch_size=4,
        epochs=1,
        max_steps=3,
        learning_rate=1e-3,
        progress=False,
        logging_steps=1,
        cache_dir=str(tmp_path / "cache"),
        objective="dpo",
    )
    values.update(overrides)
    return TrainConfig(**values)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / "step-0000001" / "model" / "model.safetensors")


def test_small_updates_survive_mixed_precision_and_vanish_in_pure_bf16(tmp_path, tiny_model_dir, prefs):
    """lr 1e-6: an AdamW step moves each weight by ~1e-6, below half a bf16 step of weights ~0.02."""
    base = load_file(Path(tiny_model_dir) / "model.safetensors")
    common = dict(max_steps=1, save_steps=1, learning_rate=1e-6, warmup_ratio=0.0, eval_dataset=())
    train(
        small_run(
            tmp_path,
            tiny_model_dir,
            prefs,
            output_dir=str(tmp_path / "mixed"),
            dtype="float32",
            mixed_precision="bf16",
            **common,
        )
    )
    train(
        small_run(
            tmp_path,
            tiny_model_dir,
            prefs,
            output_dir=str(tmp_path / "pure"),
            dtype="bfloat16",
            mixed_precision="no",
            **common,
        )
    )
    key = "model.layers.0.mlp.down_proj.weight"
    mixed, pure = weights(tmp_path / "mixed")[key], weights(tmp_path / "pure")[key]
    assert mixed.dtype == torch.float32 and pure.dtype == torch.bfloat16
    moved = (mixed - base[key]).abs()
    assert float(moved.max()) < 1e-5  # the update is small...
    kept_mixed = float((moved > 0).float().mean())
    kept_pure = float((pure != base[key].to(torch.bfloat16)).float().mean())
    # ...and reaches nearly every weight under mixed precision, but only the few weights near zero
    # (where bf16's step is finer than the update) with pure bf16 weights.
    assert kept_mixed > 0.9 and kept_pure < 0.1, (kept_mixed, kept_pure)


def test_mixed_precision_losses_track_float32(tmp_path, tiny_model_dir, prefs):
    runs = {}
    for name, precision in (("fp32", "no"), ("bf16", "bf16")):
        result = train(
            small_run(
                tmp_path,
                tiny_model_dir,
                prefs,
                output_dir=str(tmp_path / name),
                mixed_precision=precision,
                eval_dataset=(),
            )
        )
        runs[name] = [r["loss"] for r in result.metrics if "loss" in r]
    # bf16 keeps 8 bits of mantissa: on this tiny model the losses agree to about 1%.
    assert runs["bf16"] == pytest.approx(runs["fp32"], rel=0.02, abs=0.02)
    assert runs["bf16"] != runs["fp32"]  # autocast really ran


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_scalars_match_metrics_jsonl(tmp_path, tiny_model_dir, prefs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = train(small_run(tmp_path, tiny_model_dir, prefs, report_to=("tensorboard",), run_name="tb-run"))
    events = list((Path(result.output_dir)).rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    reader = EventAccumulator(str(events[0].parent)).Reload()
    records = [r for r in metrics(Path(result.output_dir)) if "loss" in r]
    for tag in ("loss", "rewards/accuracies"):
        logged = {e.step: e.value for e in reader.Scalars(tag)}
        assert logged == pytest.approx({r["step"]: r[tag] for r in records}, rel=1e-6)
    hparams = (Path(result.output_dir) / "mmpo").rglob("*") if (Path(result.output_dir) / "mmpo").exists() else []
    assert any(hparams)  # the run's folder, with the flattened config as hyper-parameters


def test_wandb_offline_run_is_named_and_has_the_config(tmp_path, tiny_model_dir, prefs, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(small_run(tmp_path, tiny_model_dir, prefs, report_to=("wandb",), output_dir=str(tmp_path / "my-run")))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # The run file is wandb's record log (protobuf records, uncompressed): the name, the config keys
    # and the metric names are in it as they would be synced.
    seen = next(runs[0].glob("*.wandb")).read_bytes()
    assert b"my-run" in seen and b"per_device_batch_size" in seen and b"rewards/accuracies" in seen


def test_mlflow_local_store_gets_params_metrics_and_name(tmp_path, tiny_model_dir, prefs, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a local file store, no server
    result = train(small_run(tmp_path, tiny_model_dir, prefs, report_to=("mlflow",), run_name="ml-run"))
    client = mlflow.tracking.MlflowClient(tracking_uri=store.as_uri())
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.run_name == "ml-run" and run.data.params["objective"] == "dpo"
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    records = [r for r in metrics(Path(result.output_dir)) if "loss" in r]
    assert history == pytest.approx({r["step"]: r["loss"] for r in records}, rel=1e-6)


def test_missing_tracker_package_fails_before_any_work(tmp_path, tiny_model_dir, prefs):
    from accelerate.utils import is_aim_available

    if is_aim_available():
        pytest.skip("aim is installed here")
    with pytest.raises(ConfigError, match=r"report_to 'aim': the package is not installed \(pip install aim\)"):
        train(small_run(tmp_path, tiny_model_dir, prefs, report_to=("aim",)))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_report_to_none_is_accepted(tmp_path, tiny_model_dir, prefs):
    result = train(small_run(tmp_path, tiny_model_dir, prefs, report_to=("none",), max_steps=1))
    assert result.global_step == 1


def test_explicit_lengths_beyond_the_model_window_are_refused(tmp_path, tiny_model_dir, prefs, capsys):
    with pytest.raises(ConfigError, match="more than the model's context window \\(512 positions"):
        train(small_run(tmp_path, tiny_model_dir, prefs, max_prompt_length=500, max_completion_length=100))
    train(small_run(tmp_path, tiny_model_dir, prefs, max_steps=1, objective="mmpo"))  # defaults: lowered
    out = capsys.readouterr().out
    assert "length limits lowered to the model's 512 positions" in out
    assert "its gradient is the chosen answer's negative log-likelihood" in out


def test_preset_without_its_sft_stage_says_what_to_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="run `mmpo sft --preset smollm2-135m` first"):
        train(TrainConfig(preset="smollm2-135m"))
    assert not os.path.exists(tmp_path / "runs")
