"""Two processes (torchrun, gloo on CPU) give the same training as one process with the same global
batch, for MMPO with both normalization scopes; metrics cover every rank's pairs; only rank 0 writes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import REPO, TESTS_DIR, write_prefs
from mmpo.config import ConfigError, TrainConfig
from mmpo.training import checkpoint, run_dir, train

WORKER = TESTS_DIR / "training" / "train_worker.py"
SCOPES = ("micro", "step")
COMPARED = (
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
)


def run_values(tmp_path: Path, model_dir: Path, scope: str, name: str, accumulation: int) -> dict:
    """Global batch 8: 4 pairs per process per micro-batch x (2 processes, or accumulation 2)."""
    return dict(
        model=str(model_dir),
        dataset=[str(tmp_path / "train.jsonl")],
        eval_dataset=[str(tmp_path / "eval.jsonl")],
        output_dir=str(tmp_path / f"{name}-{scope}"),
        cache_dir=str(tmp_path / f"cache-{name}"),
        per_device_batch_size=4,
        gradient_accumulation_steps=accumulation,
        epochs=2,
        normalize_scope=scope,
        learning_rate=1e-3,
        warmup_ratio=0.0,
        progress=False,
        logging_steps=1,
        save_steps=3,
    )


def files_in(run: Path) -> set[str]:
    return {p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file()}


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, tiny_model_dir):
    if shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists():
        pytest.skip("torchrun is not installed")
    write_prefs(tmp_path / "train.jsonl", 32, seed=0)
    write_prefs(tmp_path / "eval.jsonl", 8, seed=1)
    runs = [run_values(tmp_path, tiny_model_dir, scope, "two", accumulation=1) for scope in SCOPES]
    job = tmp_path / "job.json"
    report_dir = tmp_path / "report"
    report_dir.mkdir()
    watched = [r["output_dir"] for r in runs] + [runs[0]["cache_dir"]]
    job.write_text(json.dumps({"runs": runs, "report_dir": str(report_dir), "watch": watched}))
    # Accelerate forms a CPU (gloo) group under torchrun only when told to use the CPU.
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER), str(job)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    reports = [json.loads((report_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["world_size"] for r in reports] == [2, 2]
    # Rank 1 writes only its own RNG state, into the checkpoint being staged (the manifest covers it).
    stray = [
        p
        for p in reports[1]["writes"]
        if not (p.endswith("/state") or p.endswith("/state/random_states_1.pkl")) or "/.tmp-" not in p
    ]
    assert not stray, stray

    for scope, two in zip(SCOPES, runs):
        one = run_values(tmp_path, tiny_model_dir, scope, "one", accumulation=2)
        train(TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in one.items()}))
        run_two, run_one = Path(two["output_dir"]), Path(one["output_dir"])

        records_two = run_dir.read_metrics(run_two / "metrics.jsonl")
        records_one = run_dir.read_metrics(run_one / "metrics.jsonl")
        assert [r["step"] for r in records_two] == [r["step"] for r in records_one]  # each record written once
        for a, b in zip(records_two, records_one):
            for key in COMPARED + tuple(k for k in b if k.startswith("eval_")):
                if key in b:
                    assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (scope, a["step"], key)
        for name in ("step-0000003", "epoch-1", "step-0000006", "epoch-2"):
            got = load_file(run_two / "checkpoints" / name / "model" / "model.safetensors")
            want = load_file(run_one / "checkpoints" / name / "model" / "model.safetensors")
            for key in want:
                torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6, msg=f"{scope} {name} {key}")
        for path in checkpoint.list_checkpoints(run_two):
            assert checkpoint.verify(path) is None
        # The same files, plus rank 1's RNG state in every checkpoint.
        extra = files_in(run_two) - files_in(run_one)
        rank1_states = {f"checkpoints/{p.name}/state/random_states_1.pkl" for p in checkpoint.list_checkpoints(run_two)}
        assert extra == rank1_states
        assert files_in(run_one) <= files_in(run_two)


def test_a_launch_whose_processes_form_no_group_is_refused(tmp_path, tiny_model_dir, monkeypatch):
    """torchrun without ACCELERATE_USE_CPU on a machine without GPUs: N lone processes would each
    train on all the data and write the same files; the engine stops before any work."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = TrainConfig(
        model=str(tiny_model_dir),
        dataset=(str(write_prefs(tmp_path / "t.jsonl", 8, seed=0)),),
        eval_dataset=(),
        output_dir=str(tmp_path / "run"),
        progress=False,
    )
    with pytest.raises(ConfigError, match="launched as 2 processes .* ACCELERATE_USE_CPU=1"):
        train(cfg)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------
# GPU launch configs (no GPU here: checked for form, and the engine's DeepSpeed settings)

CONFIGS = REPO / "configs" / "accelerate"


@pytest.mark.parametrize(
    "name, kind",
    [("multi_gpu", "MULTI_GPU"), ("deepspeed_zero2", "DEEPSPEED"), ("deepspeed_zero3", "DEEPSPEED"), ("fsdp", "FSDP")],
)
def test_shipped_accelerate_configs_load(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))  # rejects unknown keys
    assert config.distributed_type.value == kind and config.num_processes > 1 and not config.use_cpu
    if name.startswith("deepspeed"):
        assert config.deepspeed_config["zero_stage"] == int(name[-1])
        # A checkpoint's model/ folder needs the gathered weights under ZeRO-3.
        assert config.deepspeed_config.get("zero3_save_16bit_model", False) == (name == "deepspeed_zero3")
        assert "gradient_accumulation_steps" not in config.deepspeed_config  # mmpo's config decides
    if name == "fsdp":
        # FSDP2 accepts the optimizer the engine creates before prepare().
        assert config.fsdp_config["fsdp_version"] == 2
    assert f"configs/accelerate/{name}.yaml" in (CONFIGS.parent.parent / "docs" / "reliability.md").read_text()


def test_deepspeed_takes_batch_size_accumulation_and_clipping_from_the_mmpo_config():
    from types import SimpleNamespace

    from accelerate.utils import DeepSpeedPlugin

    from mmpo.training.loop import _configure_deepspeed

    plugin = DeepSpeedPlugin(zero_stage=2)
    assert plugin.is_auto("train_micro_batch_size_per_gpu")  # what made prepare() fail without a DataLoader
    cfg = TrainConfig(per_device_batch_size=3, gradient_accumulation_steps=5, max_grad_norm=0.5)
    _configure_deepspeed(SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin)), cfg)
    assert not plugin.is_auto("train_micro_batch_size_per_gpu")
    assert plugin.get_value("train_micro_batch_size_per_gpu") == 3
    # Accelerate fills "auto" from its own accumulation and otherwise keeps DeepSpeed's value.
    plugin.fill_match("gradient_accumulation_steps", must_match=False, gradient_accumulation_steps=1)
    assert plugin.get_value("gradient_accumulation_steps") == 5
    assert plugin.get_value("gradient_clipping") == 0.5
    _configure_deepspeed(SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=None)), cfg)  # not DeepSpeed: no-op
