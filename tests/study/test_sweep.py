"""Sweeps end to end on a tiny model: grid expansion, tuning, dry run, kill + resume, plan/run-one."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from filelock import FileLock

from mmpo.config import ConfigError, TrainConfig
from mmpo.study import (
    RunBusy,
    collect,
    estimate_gpu_memory,
    load_plan,
    load_sweep,
    make_plan,
    run_locked,
    run_status,
    run_sweep,
    sweep_from_dict,
    validation_reward_accuracy,
    write_report,
)

REPO = Path(__file__).resolve().parents[2]
WORDS = ["banop", "zorbat", "mipo", "tuvalak", "fox", "dog", "quick", "lazy", "brown", "hello"]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir):
    """Tiny preference data, a prompt set the programmatic judge can grade, a local harness task."""
    root = tmp_path_factory.mktemp("sweep_world")

    def prefs(count, offset):
        rows = []
        for i in range(count):
            word = WORDS[(i + offset) % len(WORDS)] + WORDS[(3 * i + offset) % len(WORDS)]
            rows.append(
                {
                    "prompt": f"Repeat the word {word}.",
                    "chosen": word,
                    "rejected": "I am not sure about that, sorry." if i % 2 else "Sorry, I cannot help.",
                }
            )
        return rows

    (root / "tasks").mkdir()
    return {
        "model": str(tiny_model_dir),
        "train": write_jsonl(root / "train.jsonl", prefs(32, 0)),
        "test": write_jsonl(root / "test.jsonl", prefs(8, 5)),
        # grade() needs only the answer: the programmatic judge compares the graded outputs.
        "prompts": write_jsonl(
            root / "prompts.jsonl", [{"instruction": f"Repeat the word {w}.", "answer": w} for w in WORDS[:4]]
        ),
        "tasks": str(root / "tasks"),
        "task_file": write_jsonl(
            root / "tasks" / "copy.jsonl",
            [
                {"query": f"Repeat the word {w}.", "choices": [w, "lazy" if w != "lazy" else "fox"], "gold": 0}
                for w in WORDS[:4]
            ],
        ),
    }


def sweep_values(world, out: Path, **extra) -> dict:
    values = {
        "name": "tiny",
        "output_dir": str(out),
        "base": {
            "model": world["model"],
            "dataset": [world["train"]],
            "eval_dataset": [world["test"]],
            "epochs": 2,
            "per_device_batch_size": 8,
            "learning_rate": 1e-3,
            "logging_steps": 1,
        },
        "eval": {
            "prompts": world["prompts"],
            "max_new_tokens": 6,
            "batch_size": 8,
            "harness": ["local"],
            "local_tasks_dir": world["tasks"],
        },
        "experiments": [
            {"name": "main", "objective": ["mmpo", "dpo"], "beta": {"mmpo": [0.01, 0.1], "dpo": [0.1, 0.5]}}
        ],
    }
    values.update(extra)
    return values


# ------------------------------------------------------------------------------- planning


def test_grid_expands_per_objective_values_variants_and_shares_equal_runs(tmp_path, world):
    values = sweep_values(
        world,
        tmp_path / "s",
        experiments=[
            {"name": "main", "objective": ["mmpo", "dpo"], "beta": {"mmpo": [0.01, 0.1], "dpo": 0.1}, "seed": [1, 2]},
            {
                "name": "ablations",
                "objective": "mmpo",
                "beta": 0.01,
                "seed": 1,
                "variants": {
                    "": {},
                    "no aux loss": {"aux_loss": False},
                    "length-normalized": {"length_normalize": True},
                },
            },
        ],
    )
    plan = make_plan(sweep_from_dict(values), tmp_path / "s")
    trained = {r.name: r for r in plan.runs if r.kind == "train"}
    # 2 MMPO betas x 2 seeds + 1 DPO beta x 2 seeds + 2 ablations; the ablation block's default
    # variant is the main block's MMPO beta=0.01 seed=1 run: one folder, two roles.
    assert len(trained) == 4 + 2 + 2
    shared = trained["mmpo-beta0.01-lr0.001-seed1"]
    assert sorted(r["block"] for r in shared.roles) == ["ablations", "main"]
    ablation = trained["mmpo-beta0.01-lr0.001-seed1-auxoff"]
    assert ablation.config.aux_loss is False and ablation.roles[0]["variant"] == "no aux loss"
    assert trained["mmpo-beta0.01-lr0.001-seed1-lnormon"].config.length_normalize is True
    for run in trained.values():
        assert Path(run.config.output_dir) == tmp_path / "s" / "runs" / run.name
        assert run.config.resume and run.config.epochs == 2 and run.evaluate
    assert [r.kind for r in plan.runs][-1] == "baseline" and [r.kind for r in plan.runs].count("baseline") == 1


@pytest.mark.parametrize(
    "change, message",
    [
        ({"colour": 1}, "unknown sweep key 'colour'"),
        ({"base": {"betta": 0.1}}, "unknown config key 'betta'; did you mean 'beta'"),
        ({"eval": {"max_tokens": 3}}, "unknown config key 'max_tokens'"),
        ({"experiments": [{"objective": ["mmpo", "ppo"]}]}, "unknown objective 'ppo'"),
        ({"experiments": [{"objective": "mmpo", "beta": {"mmpo": 0.1, "ipo": 0.2}}]}, "not objectives"),
        ({"experiments": [{"objective": "mmpo", "beta": []}]}, "empty list"),
        ({"experiments": [{"objective": "mmpo", "output_dir": "x"}]}, "output_dir"),
        ({"experiments": []}, "at least one block"),
        ({"tuning": {"stages": [{"learning_rate": [1e-3]}], "epochs": 1}}, "tuning: unknown key 'epochs'"),
    ],
)
def test_bad_sweep_config_is_named_before_anything_runs(tmp_path, world, change, message):
    with pytest.raises(ConfigError, match=message):
        sweep_from_dict(sweep_values(world, tmp_path, **change))


def test_invalid_run_value_names_the_block(tmp_path, world):
    values = sweep_values(world, tmp_path, experiments=[{"name": "neg", "objective": "dpo", "beta": [0.1, -1.0]}])
    with pytest.raises(ConfigError, match="beta"):
        make_plan(sweep_from_dict(values), tmp_path)


def test_sweep_values_override_preset_values_even_when_they_equal_the_defaults(tmp_path):
    sweep = load_sweep(
        REPO / "configs" / "sweeps" / "smollm2-135m.yaml", output_dir=str(tmp_path), set_values=["epochs=1"]
    )
    run = next(r for r in make_plan(sweep, tmp_path).runs if r.kind == "train")
    assert run.config.epochs == 1  # the preset says 5; 1 is TrainConfig's default
    assert run.config.model == "runs/sft-smollm2-135m"  # the preset starts from the paper's SFT stage


@pytest.mark.parametrize("config", sorted((REPO / "configs" / "sweeps").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_sweep_configs_plan(config, tmp_path):
    sweep = load_sweep(config, output_dir=str(tmp_path))
    plan = make_plan(sweep, tmp_path)
    assert any(r.kind == "train" for r in plan.runs) or plan.waiting


def test_dry_run_prints_runs_steps_checkpoints_and_memory_estimate(tmp_path, monkeypatch):
    from rich.console import Console

    from mmpo.cli import main

    buffer = io.StringIO()
    console = Console(file=buffer, width=200)
    out_dir = tmp_path / "never"
    monkeypatch.setattr("mmpo.commands.say", console.print)
    assert (
        main(
            [
                "sweep",
                "--config",
                str(REPO / "configs" / "sweeps" / "smollm2-360m.yaml"),
                "--dry-run",
                "--out",
                str(out_dir),
            ]
        )
        == 0
    )
    out = buffer.getvalue()
    assert "training runs" in out and "optimizer steps" in out and "checkpoints to evaluate" in out
    assert "GiB" in out and "estimate" in out
    # (12,359 + 61,135 pairs) // global batch 128 = 574 steps per epoch, 5 epochs.
    assert " 2870 " in out
    assert not out_dir.exists()  # a dry run writes nothing


def test_memory_estimate_follows_the_settings(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    base = TrainConfig(model=str(tiny_model_dir), dtype="float32", per_device_batch_size=2)
    full = estimate_gpu_memory(base)
    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    assert full.parameters == params
    assert full.parts["weights"] == params * 4 / 1024**3
    assert full.parts["optimizer"] == 2 * full.parts["gradients"]
    bf16 = estimate_gpu_memory(dataclasses.replace(base, dtype="bfloat16"))
    lora = estimate_gpu_memory(dataclasses.replace(base, lora=True, lora_r=2))
    ckpt = estimate_gpu_memory(dataclasses.replace(base, gradient_checkpointing=True))
    assert bf16.total_gib < full.total_gib and bf16.parts["weights"] == full.parts["weights"] / 2
    assert 0 < lora.trainable < full.trainable
    assert ckpt.parts["activations"] < full.parts["activations"]
    assert torch.isfinite(torch.tensor(full.total_gib))


# ------------------------------------------------------------------------------- tuning


def test_tuning_selects_stage_by_stage_by_validation_reward_accuracy(tmp_path, world, monkeypatch):
    monkeypatch.setenv("MMPO_CACHE", str(tmp_path / "mcache"))
    values = sweep_values(
        world,
        tmp_path / "s",
        eval=False,
        tuning={
            "set": {"per_device_batch_size": 4},
            # SimPO's reward accuracy needs no reference: a tiny step keeps the start's, a big one learns.
            "stages": [{"learning_rate": {"simpo": [1e-7, 1e-2]}}, {"gamma": {"simpo": [0.5, 1.0]}}],
        },
        experiments=[{"name": "main", "objective": "simpo", "beta": [2.5]}],
    )
    values["base"]["epochs"] = 1
    sweep = sweep_from_dict(values)
    first = make_plan(sweep, tmp_path / "s")
    assert [r.roles[0]["stage"] for r in first.runs] == [1, 1]  # nothing else can be configured yet
    assert any("waiting" in w for w in first.waiting)
    # A dry run also shows what will run after tuning, with the defaults for what tuning picks.
    ahead = make_plan(sweep, tmp_path / "s", provisional=True)
    assert [r.provisional for r in ahead.runs] == [False, False, True, True, True]
    assert ahead.runs[-1].roles[0]["kind"] == "experiment"

    outcome = run_sweep(sweep, sweep_dir=tmp_path / "s", say=lambda *_: None)
    assert not outcome.failed and not outcome.waiting
    stages = json.loads((tmp_path / "s" / "tuning.json").read_text())
    assert [s["stage"] for s in stages] == [1, 2]
    for stage in stages:
        accuracies = [validation_reward_accuracy(tmp_path / "s" / "runs" / c["run"]) for c in stage["candidates"]]
        assert accuracies == [c["reward_accuracy"] for c in stage["candidates"]]
        best = stage["candidates"][accuracies.index(max(accuracies))]
        assert stage["selected"] == best["values"]
    first_stage = [c["reward_accuracy"] for c in stages[0]["candidates"]]
    assert first_stage[1] > first_stage[0] and stages[0]["selected"] == {"learning_rate": 1e-2}
    assert all("lr0.01" in c["run"] for c in stages[1]["candidates"])
    main = [r for r in load_plan(tmp_path / "s").runs if any(x["kind"] == "experiment" for x in r.roles)]
    assert len(main) == 1 and main[0].config.learning_rate == 1e-2 and main[0].config.beta == 2.5
    assert main[0].config.gamma == stages[1]["selected"]["gamma"]


# ------------------------------------------------------------------------------- kill and resume


def _events(sweep_dir: Path) -> list[dict]:
    path = sweep_dir / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_killed_sweep_resumes_with_only_the_missing_work(tmp_path, world):
    """2 objectives x 2 betas x 2 epochs, every checkpoint evaluated (rewards, programmatic win-rate,
    local harness). SIGKILL while the second run trains; the rerun (2 worker processes) finishes only
    what was missing and leaves the finished runs' folders untouched."""
    sweep_dir = tmp_path / "sweep"
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(sweep_values(world, sweep_dir)))
    env = {**os.environ, "MMPO_CACHE": str(tmp_path / "mcache"), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "mmpo.cli", "sweep", "--config", str(config)]
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 300
    try:
        while time.time() < deadline:  # wait until one run is finished and the next is training
            events = _events(sweep_dir)
            finished = [e["run"] for e in events if e["event"] == "eval_done" and e["checkpoint"] == "epoch-2"]
            if finished and [e for e in events if e["event"] == "train_start" and e["run"] not in finished]:
                break
            assert proc.poll() is None, "the sweep ended before it could be killed"
            time.sleep(0.05)
        else:
            pytest.fail("the sweep did not reach its second run in time")
        time.sleep(1.0)  # inside the second run's training
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    plan = load_plan(sweep_dir)
    done_before = [r for r in plan.runs if r.kind == "train" and run_status(r, sweep_dir) == "done"]
    assert done_before and len(done_before) < 4
    snapshots = {r.name: _snapshot(sweep_dir / "runs" / r.name) for r in done_before}
    before = len(_events(sweep_dir))

    rerun = subprocess.run(command + ["--workers", "2"], env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]

    plan = load_plan(sweep_dir)
    assert all(run_status(r, sweep_dir) == "done" for r in plan.runs)
    for name, snapshot in snapshots.items():
        assert _snapshot(sweep_dir / "runs" / name) == snapshot, f"finished run {name} was touched"
    new_events = _events(sweep_dir)[before:]
    assert not [e for e in new_events if e["run"] in snapshots], "finished work was redone"
    history = _events(sweep_dir)
    trained = [r.name for r in plan.runs if r.kind == "train"]
    for name in trained:
        assert [e["event"] for e in history if e["run"] == name].count("train_done") == 1
        for epoch in ("epoch-1", "epoch-2"):
            assert (
                sum(e["event"] == "eval_done" and e.get("checkpoint") == epoch and e["run"] == name for e in history)
                == 1
            )
        steps = [
            json.loads(line)["step"]
            for line in (sweep_dir / "runs" / name / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)
        ]
        assert steps == list(range(1, 9)), f"{name}: duplicated or missing steps {steps}"
    # The killed run resumed: its worker started training again; the untouched ones did not.
    resumed = {e["run"] for e in new_events if e["event"] == "train_start"}
    assert resumed and resumed.isdisjoint(snapshots)

    # Every checkpoint has all three axes, and the report reads the same numbers.
    results = collect(sweep_dir)
    assert len(results.checkpoints) == 8
    for point in results.checkpoints:
        stored = json.loads(Path(point.results_file).read_text())
        assert point.lm_acc == stored["harness"]["average_acc"]
        assert point.win_rate == stored["winrate"]["length_controlled_winrate"]
        assert point.reward_accuracy == stored["rewards"]["reward_accuracy"]
    report = write_report(sweep_dir)
    assert "Table 1" in report.read_text() and (report.parent / "winrate_vs_lm_accuracy.png").is_file()

    # A cluster task for a finished run (plan/commands.txt indexing) is a no-op.
    lines = (sweep_dir / "commands.txt").read_text().splitlines()
    assert len(lines) == len(plan.runs) and lines[1].startswith(f"mmpo sweep run-one {sweep_dir} --index 1")
    count = len(_events(sweep_dir))
    one = subprocess.run(
        [sys.executable, "-m", "mmpo.cli", "sweep", "run-one", str(sweep_dir), "--index", "1"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert one.returncode == 0, one.stderr
    assert len(_events(sweep_dir)) == count


def test_a_run_locked_by_another_process_is_left_alone(tmp_path, world):
    sweep = sweep_from_dict(sweep_values(world, tmp_path / "s"))
    run = next(r for r in make_plan(sweep, tmp_path / "s").runs if r.kind == "train")
    (tmp_path / "s" / "locks").mkdir(parents=True)
    with FileLock(str(tmp_path / "s" / "locks" / f"{run.name}.lock")):
        with pytest.raises(RunBusy, match=run.name):
            run_locked(run, tmp_path / "s")
    assert not Path(run.config.output_dir).exists()


def test_run_one_needs_a_plan(tmp_path, capsys):
    from mmpo.cli import main

    assert main(["sweep", "run-one", str(tmp_path), "--index", "0"]) == 2
    assert "write the plan first (mmpo sweep plan" in " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize("layout", ["mmpo", "hf"])
def test_training_finished_reads_both_trainer_state_layouts(tmp_path, layout):
    from mmpo.publish.trainer_state import hf_trainer_state
    from mmpo.study.status import training_finished
    from mmpo.training import checkpoint

    def state(step: int) -> dict:
        if layout == "mmpo":
            return {"global_step": step, "epoch": step / 8, "steps_per_epoch": 8, "total_steps": 4}
        return hf_trainer_state(
            [], global_step=step, steps_per_epoch=8, total_steps=4, per_device_batch_size=1, logging_steps=1
        )

    run = tmp_path / "run"
    for step in (2, 4):
        staging = checkpoint.staging_dir(run, f"step-{step:07d}")
        (staging / "weights.bin").write_bytes(b"w")
        checkpoint.finalize(staging, f"step-{step:07d}", state(step))
    (run / "summary.json").write_text("{}")
    assert training_finished(run)  # the newest checkpoint is the last step
    shutil.rmtree(run / "checkpoints" / "step-0000004")
    assert not training_finished(run)  # step 2 of 4
