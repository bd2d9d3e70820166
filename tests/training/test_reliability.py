"""Reliability: SIGKILL and resume, exact mid-epoch resume, damaged checkpoints, the non-finite guard,
and the security defaults. Every test does the bad thing for real (docs/reliability.md)."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from training.attempts import Attempt, assert_bitwise_equal, make_config, run_config, train_records, weights

from helpers import save_tiny_model, write_chat
from mmpo.config import SFTConfig, TrainConfig
from mmpo.training import TrainingError, checkpoint, run_dir, sft, train


def assert_run_folder_usable(run: Path) -> None:
    """What a resume needs: readable metrics, and only complete checkpoints or dot-folders."""
    run_dir.read_metrics(run / "metrics.jsonl")
    for path in checkpoint.list_checkpoints(run):
        assert checkpoint.verify(path) is None, f"{path} is a visible but damaged checkpoint"


# --------------------------------------------------------------------------------------------
# SIGKILL at random points, then --resume


def staging_folders(run: Path) -> list[str]:
    root = checkpoint.checkpoints_dir(run)
    try:
        return [name for name in os.listdir(root) if name.startswith(".tmp-")]
    except FileNotFoundError:
        return []


def staging_step(name: str, steps_per_epoch: int = 4) -> int:
    """The step of a staging folder: ``.tmp-step-0000007`` -> 7, ``.tmp-epoch-2`` -> 8."""
    kind, number = name.removeprefix(".tmp-").split("-")
    return int(number) * (steps_per_epoch if kind == "epoch" else 1)


def writing_checkpoint_of_step_at_least(run: Path, step: int):
    """A kill condition that holds while a checkpoint of ``step`` or later is being written (a
    later one qualifies too, so a window missed on a loaded machine only moves the kill on)."""
    return lambda: any(staging_step(name) >= step for name in staging_folders(run))


def test_sigkill_at_random_points_then_resume_is_bitwise_identical(tmp_path, tiny_model_dir):
    seed = int(os.environ.get("MMPO_KILL_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    note = f"(MMPO_KILL_SEED={seed} reproduces these kill points)"
    # 3 epochs x 4 steps, a step checkpoint after every step, only the newest 2 step checkpoints kept, a
    # metrics line every 3 steps (and at each epoch's end): most resumes start inside a logging window.
    values = run_config(tmp_path, tiny_model_dir, epochs=3, save_steps=1, save_total_limit=2, logging_steps=3)

    reference_run = tmp_path / "reference"
    reference_job = tmp_path / "reference.json"
    reference_job.write_text(json.dumps({"runs": [dict(values, output_dir=str(reference_run))]}))
    Attempt(reference_job, tmp_path / "reference.log").finish()

    run = Path(values["output_dir"])
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"runs": [values]}))
    resume_job = tmp_path / "resume.json"
    resume_job.write_text(json.dumps({"runs": [dict(values, resume=True)]}))

    # 1. Killed while writing the checkpoint of step n (n = 1: before any checkpoint exists).
    n = rng.randint(1, 3)
    first = Attempt(job, tmp_path / "attempt1.log")
    assert first.kill_when(writing_checkpoint_of_step_at_least(run, n)), note
    leftovers = staging_folders(run)  # empty only if the write finished between the look and the kill
    assert_run_folder_usable(run)

    # 2. Resumed (removes the staging folder), killed at a random moment after a metrics line of step t2
    #    or later was written: inside a step, a metrics write or a checkpoint write.
    t2 = rng.randint(n + 1, 7)
    second = Attempt(resume_job, tmp_path / "attempt2.log")
    assert second.kill_when(lambda: any(r["step"] >= t2 for r in train_records(run)), delay=rng.uniform(0.0, 0.03)), (
        note
    )
    for name in leftovers:
        assert f"removed leftover {run / 'checkpoints' / name}" in second.output(), note
    assert_run_folder_usable(run)

    # 3. Resumed again, killed while writing the checkpoint of a later step t3.
    t3 = rng.randint(t2 + 3, 11)
    third = Attempt(resume_job, tmp_path / "attempt3.log")
    assert third.kill_when(writing_checkpoint_of_step_at_least(run, t3)), note
    assert "resumed from" in third.output(), note
    assert_run_folder_usable(run)

    # 4. Resumed to the end.
    output = Attempt(resume_job, tmp_path / "attempt4.log").finish()
    assert "resumed from" in output, note

    assert_bitwise_equal(weights(reference_run, "epoch-3"), weights(run, "epoch-3"))
    for name in ("epoch-1", "epoch-2"):
        assert_bitwise_equal(weights(reference_run, name), weights(run, name))
    assert not [p.name for p in checkpoint.checkpoints_dir(run).iterdir() if p.name.startswith(".")], note
    names = sorted(p.name for p in checkpoint.list_checkpoints(run))
    assert names == ["epoch-1", "epoch-2", "epoch-3", "step-0000010", "step-0000011"], names  # save_total_limit=2
    # Every metrics line written exactly once, with the uninterrupted run's numbers (the logging window
    # of a step between two metrics lines is restored from the checkpoint).
    got, want = train_records(run), train_records(reference_run)
    assert [r["step"] for r in got] == [r["step"] for r in want] == [3, 4, 6, 8, 9, 12], note
    for a, b in zip(got, want):
        for key in ("loss", "grad_norm", "learning_rate", "rewards/margins"):
            assert a[key] == b[key], (a["step"], key, note)
    evals = [r["step"] for r in run_dir.read_metrics(run / "metrics.jsonl") if "eval_loss" in r]
    assert evals == [0, 4, 8, 12], note


# --------------------------------------------------------------------------------------------
# Damaged checkpoints, leftovers, torn metrics


def corrupt(path: Path) -> None:
    """Flip one byte in the middle: same size, wrong checksum."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damaged_checkpoints_are_skipped_with_a_reason_and_the_previous_one_is_used(tmp_path, tiny_model_dir, capsys):
    values = run_config(tmp_path, tiny_model_dir, save_steps=1, eval_dataset=[])
    train(make_config(values))
    run = Path(values["output_dir"])
    original = weights(run, "epoch-1")
    names = [p.name for p in checkpoint.list_checkpoints(run)]
    assert names == ["step-0000001", "step-0000002", "step-0000003", "epoch-1"]

    corrupt(run / "checkpoints/epoch-1/state/model.safetensors")  # bit rot
    (run / "checkpoints/step-0000003/state/optimizer.bin").write_bytes(b"")  # truncated
    (run / "checkpoints/step-0000002/manifest.json").unlink()  # write never finished
    capsys.readouterr()
    train(make_config(dict(values, resume=True)))
    out = capsys.readouterr().out
    assert "skipping checkpoint" in out and "epoch-1: file state/model.safetensors fails its checksum" in out
    assert "step-0000003: file state/optimizer.bin has the wrong size" in out
    assert "step-0000002: no manifest (the write did not finish)" in out
    assert "resumed from" in out and "step-0000001 at step 1" in out
    assert_bitwise_equal(original, weights(run, "epoch-1"))  # the damaged ones were redone, identically
    for path in checkpoint.list_checkpoints(run):
        assert checkpoint.verify(path) is None
    assert [r["step"] for r in train_records(run)] == [1, 2, 3, 4]

    # Every checkpoint damaged: the run starts over, and metrics.jsonl still holds each step once.
    for path in checkpoint.list_checkpoints(run):
        (path / "manifest.json").write_text("{not json")
    train(make_config(dict(values, resume=True)))
    out = capsys.readouterr().out
    assert "manifest is damaged" in out and "no complete checkpoint" in out
    assert [r["step"] for r in train_records(run)] == [1, 2, 3, 4]
    assert_bitwise_equal(original, weights(run, "epoch-1"))


def make_checkpoint(run: Path, name: str, step: int, payload: bytes) -> Path:
    staging = checkpoint.staging_dir(run, name)
    (staging / "state").mkdir()
    (staging / "state" / "weights.bin").write_bytes(payload)
    return checkpoint.finalize(staging, name, {"global_step": step})


def test_recover_after_a_kill_between_the_two_renames_of_a_replacement(tmp_path):
    run = tmp_path / "run"
    make_checkpoint(run, "step-0000002", 2, b"first attempt")
    # Killed inside finalize() while replacing it: the old copy set aside, the new one still staged.
    root = checkpoint.checkpoints_dir(run)
    staging = checkpoint.staging_dir(run, "step-0000002")
    (staging / "weights.bin").write_bytes(b"second attempt")
    os.replace(root / "step-0000002", root / ".old-step-0000002")
    assert checkpoint.latest_valid(run) is None
    messages = []
    checkpoint.recover(run, log=messages.append)
    assert sorted(p.name for p in root.iterdir()) == ["step-0000002"]
    assert checkpoint.latest_valid(run) == root / "step-0000002"
    assert (root / "step-0000002/state/weights.bin").read_bytes() == b"first attempt"
    assert any("restored checkpoint" in m for m in messages) and any("removed leftover" in m for m in messages)


def test_recover_removes_partial_leftovers_and_keeps_complete_checkpoints(tmp_path):
    run = tmp_path / "run"
    make_checkpoint(run, "step-0000001", 1, b"good")
    make_checkpoint(run, "step-0000003", 3, b"newer")
    root = checkpoint.checkpoints_dir(run)
    (root / ".tmp-step-0000004" / "state").mkdir(parents=True)  # killed mid-write
    (root / ".trash-step-0000000").mkdir()  # killed while pruning
    shutil.copytree(root / "step-0000001", root / ".old-step-0000003")  # replacement that did complete
    (run / ".metrics.jsonl.tmp123").write_text("half")  # killed mid atomic rewrite
    checkpoint.recover(run, log=lambda _: None)
    assert sorted(p.name for p in root.iterdir()) == ["step-0000001", "step-0000003"]
    assert (root / "step-0000003/state/weights.bin").read_bytes() == b"newer"
    assert not list(run.glob(".*.tmp*"))


def test_pruning_keeps_the_newest_step_checkpoints_and_never_leaves_half_deleted_ones(tmp_path):
    run = tmp_path / "run"
    for step in range(1, 5):
        make_checkpoint(run, f"step-{step:07d}", step, b"x" * step)
    make_checkpoint(run, "epoch-1", 4, b"epoch")
    checkpoint.prune_step_checkpoints(run, 2)
    names = sorted(p.name for p in checkpoint.checkpoints_dir(run).iterdir())
    assert names == ["epoch-1", "step-0000003", "step-0000004"]


def test_torn_metrics_line_is_dropped_and_the_file_rewritten_whole(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": 0, "eval_loss": 0.7}, {"step": 1, "loss": 0.69}, {"step": 2, "loss": 0.68}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 3, "lo')  # killed mid-append
    assert run_dir.read_metrics(path) == records
    assert run_dir.trim_metrics(path, 1) == records[:2]
    assert path.read_text() == "".join(json.dumps(r) + "\n" for r in records[:2])
    assert run_dir.trim_metrics(path, -1) == [] and path.read_text() == ""


def test_manifest_that_is_valid_json_of_the_wrong_shape_is_a_reason_not_a_crash(tmp_path):
    folder = make_checkpoint(tmp_path / "run", "step-0000001", 1, b"data")
    for text in ('{"files": 3}', "[]", '{"files": {"a": {"size": "x"}}}', '{"files": {}}'):
        (folder / "manifest.json").write_text(text)
        assert checkpoint.verify(folder) is not None, text
    (folder / "trainer_state.json").write_text("{torn")
    assert checkpoint.list_checkpoints(tmp_path / "run") == [folder]  # listed (as step -1), not a crash


# --------------------------------------------------------------------------------------------
# Exact resume mid-epoch: optimizer, scheduler, accumulation position, RNG


def test_mid_epoch_resume_restores_optimizer_scheduler_accumulation_and_rng(tmp_path, tokenizer):
    """SFT with dropout on: the resumed run only matches if the RNG state is restored as well."""
    model_dir = save_tiny_model(tokenizer, tmp_path / "dropout_model", attention_dropout=0.3)
    cfg = SFTConfig(
        model=str(model_dir),
        dataset=(str(write_chat(tmp_path / "chat.jsonl", 24)),),
        eval_dataset=(),
        output_dir=str(tmp_path / "a"),
        per_device_batch_size=2,
        gradient_accumulation_steps=2,
        save_steps=1,
        learning_rate=1e-2,
        warmup_ratio=0.3,
        progress=False,
        logging_steps=1,
    )
    sft(cfg)  # 6 optimizer steps of 2 micro-batches each
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(a, b)
    for path in checkpoint.list_checkpoints(b):  # as if killed during step 4 of 6
        if checkpoint.read_trainer_state(path)["global_step"] > 3:
            shutil.rmtree(path)
    sft(dataclasses.replace(cfg, output_dir=str(b), resume=True))

    assert_bitwise_equal(weights(a, "epoch-1"), weights(b, "epoch-1"))
    state_a, state_b = a / "checkpoints/epoch-1/state", b / "checkpoints/epoch-1/state"
    opt_a = torch.load(state_a / "optimizer.bin", weights_only=True)
    opt_b = torch.load(state_b / "optimizer.bin", weights_only=True)
    for index, values in opt_a["state"].items():
        for key, tensor in values.items():
            assert torch.equal(tensor, opt_b["state"][index][key]), (index, key)
    assert torch.load(state_a / "mmpo_scheduler.pt", weights_only=True) == torch.load(
        state_b / "mmpo_scheduler.pt", weights_only=True
    )
    rng_a = torch.load(state_a / "random_states_0.pkl", weights_only=False)
    rng_b = torch.load(state_b / "random_states_0.pkl", weights_only=False)
    assert rng_a["step"] == rng_b["step"] == 12  # Accelerate's micro-step counter: the accumulation position
    assert torch.equal(rng_a["torch_manual_seed"], rng_b["torch_manual_seed"])
    got, want = train_records(b), train_records(a)
    assert [r["step"] for r in got] == list(range(1, 7))
    for x, y in zip(got, want):
        assert (x["loss"], x["learning_rate"], x["grad_norm"]) == (y["loss"], y["learning_rate"], y["grad_norm"])


# --------------------------------------------------------------------------------------------
# Non-finite guard


def poison_policy_logps(monkeypatch, poison_ids: set[str]) -> None:
    """Training forward passes return -inf chosen log-probs for the poisoned pairs (as an fp16
    overflow would); the reference pass (eval mode) is left alone."""
    import mmpo.training.preference as preference

    real = preference.preference_logps

    def poisoned(model, examples, **kwargs):
        out = real(model, examples, **kwargs)
        hit = torch.tensor([ex["id"] in poison_ids for ex in examples])
        if model.training and hit.any():
            scale = torch.where(hit, torch.tensor(float("inf")), torch.tensor(1.0)).to(out.chosen_logps)
            out = dataclasses.replace(out, chosen_logps=out.chosen_logps * scale)
        return out

    monkeypatch.setattr(preference, "preference_logps", poisoned)


def poison_reference_logps(monkeypatch, poison_ids: set[str]) -> None:
    """Cached reference log-probs of +inf for the poisoned pairs: DPO's loss is then +inf while its
    gradient stays finite (the log-sigmoid saturates), so only a loss check catches it."""
    from mmpo.training import refcache

    real = refcache.attach

    def poisoned(examples, chosen, rejected):
        real(examples, chosen, rejected)
        for ex in examples:
            if ex["id"] in poison_ids:
                ex["ref_chosen_logps"] = float("inf")

    monkeypatch.setattr(refcache, "attach", poisoned)


def steps_containing(values: dict, ids: set[str]) -> list[int]:
    """Which optimizer steps see one of ``ids``, from the engine's own data order."""
    from mmpo.data import DatasetSpec, load_rows, prepare_preference_examples
    from mmpo.data.order import epoch_order, step_micro_batches
    from mmpo.modeling import load_tokenizer

    cfg = make_config(values)
    rows = load_rows([DatasetSpec.parse(d) for d in cfg.dataset], seed=cfg.seed)
    examples, _ = prepare_preference_examples(rows, load_tokenizer(cfg.model))
    global_batch = cfg.per_device_batch_size * cfg.gradient_accumulation_steps
    steps_per_epoch = len(examples) // global_batch
    hits = []
    for step in range(steps_per_epoch * cfg.epochs):
        epoch, within = divmod(step, steps_per_epoch)
        _, indices = step_micro_batches(
            epoch_order(len(examples), cfg.seed, epoch),
            within,
            per_device=cfg.per_device_batch_size,
            accumulation=cfg.gradient_accumulation_steps,
            world_size=1,
            rank=0,
        )
        if any(examples[i]["id"] in ids for i in indices):
            hits.append(step + 1)
    return hits


@pytest.mark.parametrize("where, objective", [("policy", "mmpo"), ("reference", "dpo")])
def test_nonfinite_steps_are_skipped_counted_and_logged_and_training_continues(
    tmp_path, tiny_model_dir, monkeypatch, capsys, where, objective
):
    values = run_config(
        tmp_path, tiny_model_dir, epochs=2, save_steps=1, eval_dataset=[], objective=objective, warmup_ratio=0.0
    )  # no zero-learning-rate warm-up step: every good step moves the weights
    poison = {"train:train:5"}
    (poison_policy_logps if where == "policy" else poison_reference_logps)(monkeypatch, poison)
    bad_steps = steps_containing(values, poison)
    assert len(bad_steps) == 2  # once per epoch

    result = train(make_config(values))
    run = Path(values["output_dir"])
    assert result.global_step == 8  # training went on to the end
    events = [r for r in result.metrics if r.get("event") == "nonfinite_step_skipped"]
    assert [e["step"] for e in events] == bad_steps
    assert all("train:train:5" in e["example_ids"] and len(e["example_ids"]) == 8 for e in events)
    assert train_records(run)[-1]["nonfinite_steps"] == 2
    assert "non-finite loss or gradient, step skipped" in capsys.readouterr().out
    names = {checkpoint.read_trainer_state(p)["global_step"]: p.name for p in checkpoint.list_checkpoints(run)}
    previous = load_file(tiny_model_dir / "model.safetensors")  # the weights before step 1
    for step in range(1, 9):
        after = weights(run, names[step])
        unchanged = all(torch.equal(previous[k], after[k]) for k in after)
        assert unchanged == (step in bad_steps), f"step {step}: weights {'un' if unchanged else ''}changed"
        assert all(torch.isfinite(t).all() for t in after.values())
        previous = after


def test_persistent_nonfinite_stops_with_a_clear_message_and_writes_no_bad_weights(
    tmp_path, tiny_model_dir, monkeypatch
):
    values = run_config(
        tmp_path, tiny_model_dir, per_device_batch_size=2, gradient_accumulation_steps=1, save_steps=4, eval_dataset=[]
    )  # 16 steps per epoch
    poison_policy_logps(monkeypatch, {f"train:train:{i}" for i in range(32)})
    with pytest.raises(TrainingError, match="10 optimizer steps in a row had a non-finite loss or gradient"):
        train(make_config(values))
    run = Path(values["output_dir"])
    initial = load_file(tiny_model_dir / "model.safetensors")
    saved = checkpoint.list_checkpoints(run)
    assert [p.name for p in saved] == ["step-0000004", "step-0000008"]  # none after the error
    for path in saved:
        for key, tensor in load_file(path / "model" / "model.safetensors").items():
            assert torch.equal(tensor, initial[key]), (path.name, key)  # never stepped on a bad gradient
    assert len([r for r in run_dir.read_metrics(run / "metrics.jsonl") if r.get("event")]) == 10
    assert not (run / "summary.json").exists()


# --------------------------------------------------------------------------------------------
# Security defaults


def test_remote_code_runs_only_when_asked(tmp_path, tiny_model_dir, monkeypatch):
    import transformers.dynamic_module_utils as dynamic

    from mmpo.modeling import load_model

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    model_dir = tmp_path / "model_with_code"
    shutil.copytree(tiny_model_dir, model_dir)
    marker = tmp_path / "remote_code_ran"
    (model_dir / "custom_model.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'llama'\n"
        "class CustomModel(LlamaForCausalLM):\n    config_class = CustomConfig\n"
    )
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "custom_model.CustomConfig", "AutoModelForCausalLM": "custom_model.CustomModel"}
    (model_dir / "config.json").write_text(json.dumps(config))

    assert TrainConfig().trust_remote_code is False and SFTConfig().trust_remote_code is False
    model = load_model(TrainConfig(model=str(model_dir)))
    assert type(model).__name__ == "LlamaForCausalLM" and not marker.exists()
    model = load_model(TrainConfig(model=str(model_dir), trust_remote_code=True))
    assert type(model).__name__ == "CustomModel" and marker.exists()  # the control: the code does run when asked


def test_resume_loads_our_state_with_weights_only_and_weights_are_safetensors(tmp_path, tiny_model_dir, monkeypatch):
    values = run_config(tmp_path, tiny_model_dir, max_steps=2, save_steps=1, eval_dataset=[])
    train(make_config(values))
    run = Path(values["output_dir"])
    calls = []
    real_load = torch.load

    def recording_load(f, *args, **kwargs):
        calls.append((str(f), kwargs.get("weights_only")))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    train(make_config(dict(values, max_steps=3, resume=True)))  # also reads the reference cache
    loaded = {Path(f).name for f, _ in calls}
    assert {"optimizer.bin", "random_states_0.pkl", "mmpo_scheduler.pt"} <= loaded, loaded
    assert any(name.endswith(".pt") and name != "mmpo_scheduler.pt" for name in loaded)  # the cache
    assert all(weights_only is True for _, weights_only in calls), calls
    for path in checkpoint.list_checkpoints(run):
        files = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
        assert {"model/model.safetensors", "state/model.safetensors"} <= files
        assert not [f for f in files if f.endswith(("pytorch_model.bin", ".pth", ".ckpt"))]


def test_configs_hold_no_secrets():
    """API keys come from the environment (judges read them at call time, see test_judges), so no
    config field, and hence no saved config.yaml, can carry one."""
    for cls in (TrainConfig, SFTConfig):
        names = [f.name for f in dataclasses.fields(cls)]
        assert not [n for n in names if any(word in n for word in ("key", "secret", "password", "token"))], names
