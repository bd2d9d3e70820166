"""What a resume checks and restores, and caches that cannot poison a run: the logging window,
pruning that ranks only verified checkpoints, changed training data, a damaged config.yaml, a
damaged reference cache entry, and run files planted as symlinks. Each test damages for real."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from training.attempts import assert_bitwise_equal, make_config, run_config, train_records, weights

from helpers import write_chat, write_prefs
from mmpo.config import ConfigError, SFTConfig
from mmpo.training import checkpoint, refcache, run_dir, sft, train


def flip_a_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if offset is None else offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_resume_between_two_metrics_lines_writes_the_same_lines(tmp_path, tiny_model_dir):
    values = run_config(tmp_path, tiny_model_dir, epochs=2, save_steps=1, logging_steps=3, eval_dataset=[])
    train(make_config(values))
    a, b = Path(values["output_dir"]), tmp_path / "b"
    shutil.copytree(a, b)
    for path in checkpoint.list_checkpoints(b):  # as if killed during step 6: resumes at 5, mid-window
        if checkpoint.read_trainer_state(path)["global_step"] > 5:
            shutil.rmtree(path)
    train(make_config(dict(values, output_dir=str(b), resume=True)))
    got, want = train_records(b), train_records(a)
    assert [r["step"] for r in got] == [r["step"] for r in want] == [3, 4, 6, 8]
    for x, y in zip(got, want):
        assert {k: v for k, v in x.items() if k != "tokens_per_second"} == {
            k: v for k, v in y.items() if k != "tokens_per_second"
        }


def test_pruning_ranks_only_verified_checkpoints(tmp_path, tiny_model_dir):
    """Damaged later checkpoints (from an earlier attempt) must not get a fresh good one deleted."""
    values = run_config(tmp_path, tiny_model_dir, save_steps=1, save_total_limit=2, eval_dataset=[])
    train(make_config(values))
    run = Path(values["output_dir"])
    assert [p.name for p in checkpoint.list_checkpoints(run)] == ["step-0000002", "step-0000003", "epoch-1"]
    for path in checkpoint.list_checkpoints(run):
        flip_a_byte(path / "state" / "model.safetensors")  # every checkpoint damaged: the run starts over
    train(make_config(dict(values, resume=True, max_steps=1)))
    names = [p.name for p in checkpoint.list_checkpoints(run)]
    assert "step-0000001" in names and checkpoint.verify(run / "checkpoints" / "step-0000001") is None
    # Its damaged neighbours are left alone (a resume skips them; the run rewrites them at their step).
    assert checkpoint.verify(run / "checkpoints" / "step-0000003") == "file state/model.safetensors fails its checksum"

    root = tmp_path / "unit"
    for step in (1, 2, 3, 4):
        staging = checkpoint.staging_dir(root, f"step-{step:07d}")
        (staging / "weights.bin").write_bytes(bytes([step]) * 64)
        checkpoint.finalize(staging, f"step-{step:07d}", {"global_step": step})
    flip_a_byte(root / "checkpoints" / "step-0000004" / "weights.bin")
    checkpoint._verified.clear()  # as in a new process: nothing known yet
    checkpoint.prune_step_checkpoints(root, 2)
    assert sorted(p.name for p in checkpoint.list_checkpoints(root)) == ["step-0000002", "step-0000003", "step-0000004"]


def test_resume_refuses_changed_training_data_naming_what_changed(tmp_path, tiny_model_dir):
    values = run_config(tmp_path, tiny_model_dir, save_steps=1, eval_dataset=[])
    train(make_config(dict(values, max_steps=2)))
    data = Path(values["dataset"][0])
    write_prefs(data, 16)  # the file was regenerated: half the rows
    with pytest.raises(ConfigError) as error:
        train(make_config(dict(values, resume=True)))
    message = str(error.value)
    print(message)  # docs/reliability.md quotes it (pytest -s)
    assert "the training data changed since" in message
    assert "32 training examples then, 16 now (steps per epoch 4 -> 2)" in message
    assert f"dataset {str(data)!r} is " in message and "--resume-allow-data-change" in message

    write_prefs(data, 32, seed=7)  # same size and row ids, other text
    with pytest.raises(ConfigError, match="the same row ids, but their tokens differ"):
        train(make_config(dict(values, resume=True)))

    result = train(make_config(dict(values, resume=True, resume_allow_data_change=True)))
    assert result.global_step == 4
    # The new data is now the run's data: a plain resume accepts it.
    train(make_config(dict(values, resume=True, max_steps=4)))


def test_a_damaged_run_config_falls_back_to_the_checkpoint_copy(tmp_path, tiny_model_dir, capsys):
    values = run_config(tmp_path, tiny_model_dir, save_steps=1, max_steps=2, eval_dataset=[])
    train(make_config(values))
    run = Path(values["output_dir"])
    (run / "config.yaml").write_bytes(b"")  # what a kill mid-write used to leave
    with pytest.raises(ConfigError, match="different config .*step-0000002/config.yaml.*keys that differ: beta"):
        train(make_config(dict(values, resume=True, beta=0.5)))
    (run / "config.yaml").write_bytes("beta: [0.1\n".encode("utf-16"))
    result = train(make_config(dict(values, resume=True, max_steps=3)))
    assert result.global_step == 3 and "resumed from" in capsys.readouterr().out
    for path in [run / "config.yaml", *[p / "config.yaml" for p in checkpoint.list_checkpoints(run)]]:
        path.write_text(": : :")
    with pytest.raises(ConfigError, match="cannot tell which settings .* was made with: .*config.yaml is damaged"):
        train(make_config(dict(values, resume=True)))


def cache_entry(cache: Path, pairs: int) -> Path:
    """The reference cache file of the training set (the one holding ``pairs`` examples)."""
    for path in cache.glob("*.pt"):
        if len(torch.load(path, weights_only=True)["ids"]) == pairs:
            return path
    raise AssertionError(f"no cache entry with {pairs} pairs in {cache}")


def test_a_damaged_reference_cache_entry_is_recomputed_with_a_message(tmp_path, tiny_model_dir, capsys):
    values = run_config(tmp_path, tiny_model_dir, max_steps=2, eval_dataset=[])
    train(make_config(dict(values, output_dir=str(tmp_path / "clean"))))
    entry = cache_entry(Path(values["cache_dir"]), 32)
    state = torch.load(entry, weights_only=True)

    # One value's lowest bit flipped in the file: torch reads it without complaint.
    data = entry.read_bytes()
    flip_a_byte(entry, data.find(state["chosen"][5].numpy().tobytes()))
    assert not torch.equal(torch.load(entry, weights_only=True)["chosen"], state["chosen"])
    capsys.readouterr()
    train(make_config(values))
    out = capsys.readouterr().out
    assert f"reference cache entry {entry} is damaged (checksum mismatch); recomputing it" in out
    assert_bitwise_equal(
        weights(tmp_path / "clean", "step-0000002"), weights(Path(values["output_dir"]), "step-0000002")
    )
    assert torch.equal(torch.load(entry, weights_only=True)["chosen"], state["chosen"])  # rewritten whole

    for wrong, reason in [
        (torch.zeros(3), "not a cache entry"),
        ({**state, "chosen": state["chosen"][:5]}, "chosen values have shape (5,), expected (32,)"),
        ({**state, "rejected": state["rejected"].float()}, "rejected values are torch.float32, expected torch.float64"),
        ({**state, "ids": state["ids"][:-1] + [5]}, "its ids are not a list of strings"),
    ]:
        torch.save(wrong, entry)
        messages = []
        assert refcache.load(entry, state["ids"], log=messages.append) is None
        assert messages and reason in messages[0], (reason, messages)
    entry.write_bytes(b"PK\x03\x04 torn")
    messages = []
    assert refcache.load(entry, state["ids"], log=messages.append) is None and "unreadable" in messages[0]


def test_run_files_are_never_written_through_symlinks(tmp_path, tiny_model_dir):
    values = run_config(tmp_path, tiny_model_dir, max_steps=2, save_steps=1, eval_dataset=[])
    run, outside = Path(values["output_dir"]), tmp_path / "outside"
    (run / "checkpoints").mkdir(parents=True)
    outside.mkdir()
    names = ["config.yaml", "metrics.jsonl", "data_report.json", "summary.json", "data_fingerprint.json", ".lock"]

    def plant() -> None:
        for name in names:
            target = outside / name
            target.write_text("precious")
            (run / name).unlink(missing_ok=True)
            (run / name).symlink_to(target)
        (outside / "folder").mkdir(exist_ok=True)
        (outside / "folder" / "keep.txt").write_text("precious")
        (run / "checkpoints" / ".tmp-step-0000002").symlink_to(outside / "folder")

    plant()
    train(make_config(values))
    plant()
    cache = cache_entry(Path(values["cache_dir"]), 32)
    cache.unlink()
    cache.symlink_to(outside / "config.yaml")
    train(make_config(dict(values, resume=True, max_steps=3)))
    assert all((outside / name).read_text() == "precious" for name in names)
    assert (outside / "folder" / "keep.txt").read_text() == "precious"
    assert not (run / "checkpoints" / ".tmp-step-0000002").exists()
    for name in ["config.yaml", "metrics.jsonl", "data_report.json", "summary.json", ".lock"]:
        assert not (run / name).is_symlink() and (run / name).is_file(), name
    assert not cache.is_symlink() and refcache.load(cache, torch.load(cache, weights_only=True)["ids"]) is not None
    # The planted metrics.jsonl link held no records: replaced by a real file with what this run logged.
    assert [r["step"] for r in train_records(run)] == [3]


def test_sft_writes_its_data_report_with_skipped_lines(tmp_path, tiny_model_dir):
    chat = write_chat(tmp_path / "chat.jsonl", 16)
    with open(chat, "ab") as handle:
        handle.write(b'{"messages": [\n\xff\n')
    cfg = SFTConfig(
        model=str(tiny_model_dir),
        dataset=(str(chat),),
        eval_dataset=(str(chat),),
        max_steps=1,
        output_dir=str(tmp_path / "run"),
        per_device_batch_size=4,
        progress=False,
        on_bad_rows="skip",
    )
    sft(cfg)
    report = json.loads((tmp_path / "run" / run_dir.DATA_REPORT_FILE).read_text())
    assert report["train"]["kept"] == 16 and report["train"]["dropped"] == {"invalid_line": 2}
    assert report["train"]["dropped_ids"]["invalid_line"] == [f"{chat}:17", f"{chat}:18"]
    assert report["eval"]["rows_in"] == 18
