"""Lines of local files that are not rows (bad JSON, bad UTF-8, not an object): named by file and
line, skipped and counted with ``on_bad_rows="skip"``; data folders; huge fields capped before
tokenizing, so memory follows the token limit, not the input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO
from mmpo.data import (
    DataError,
    RowError,
    load_preference_examples,
    load_rows,
    load_sft_examples,
    prepare_preference_examples,
    prepare_sft_examples,
)
from mmpo.data import cap as cap_module

GOOD = [{"prompt": f"Repeat the word w{i}.", "chosen": f"w{i}", "rejected": "I am not sure."} for i in range(4)]


def line(row: dict) -> bytes:
    return json.dumps(row).encode() + b"\n"


def file_with_bad_lines(path: Path) -> Path:
    path.write_bytes(
        line(GOOD[0])
        + b'{"prompt": "Hi", "chosen": "a"\n'  # line 2: torn JSON
        + b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n'  # line 3: Latin-1, not UTF-8
        + b"[1, 2]\n"  # line 4: JSON, but not an object
        + b"\n"  # blank lines are not rows
        + line(GOOD[1])
        + line(GOOD[2])
    )
    return path


def test_skip_covers_malformed_lines_and_encodings_with_line_numbers(tmp_path, tokenizer):
    path = file_with_bad_lines(tmp_path / "rows.jsonl")
    with pytest.raises(RowError, match="line 2 is not valid JSON"):
        load_preference_examples([str(path)], tokenizer)

    examples, report = load_preference_examples([str(path)], tokenizer, on_bad_rows="skip")
    assert len(examples) == report.kept == 3
    assert report.dropped == {"invalid_line": 3}
    assert report.dropped_ids["invalid_line"] == [f"{path}:2", f"{path}:3", f"{path}:4"]
    assert any("line 3 is not valid UTF-8 (byte 0xe9 at column 16)" in e for e in report.errors)
    assert report.rows_in == report.kept + sum(report.dropped.values())
    # A skipped line keeps its place: the rows after it keep the ids they have once it is fixed.
    ids = sorted(ex["id"] for ex in examples)
    fixed = tmp_path / "fixed" / "rows.jsonl"
    fixed.parent.mkdir()
    fixed.write_bytes(line(GOOD[0]) + line(GOOD[3]) * 3 + b"\n" + line(GOOD[1]) + line(GOOD[2]))
    assert ids == ["rows:train:0", "rows:train:4", "rows:train:5"]
    assert {r["id"]: r["prompt"] for r in load_rows([str(fixed)])}["rows:train:4"] == GOOD[1]["prompt"]


def test_sft_skips_bad_lines_too(tmp_path, tokenizer):
    path = tmp_path / "chat.jsonl"
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    path.write_bytes(line(good) + b"\xff\xfe{}\n" + line(good))
    with pytest.raises(RowError, match="line 2 is not valid UTF-8 \\(byte 0xff at column 1\\)"):
        load_sft_examples([str(path)], tokenizer)
    examples, report = load_sft_examples([str(path)], tokenizer, on_bad_rows="skip")
    assert len(examples) == 2 and report.dropped == {"invalid_line": 1}


def test_a_utf8_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + line(GOOD[0]) + line(GOOD[1]))
    assert sorted(r["prompt"] for r in load_rows([str(path)])) == [GOOD[0]["prompt"], GOOD[1]["prompt"]]
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode())
    assert len(load_rows([str(tmp_path / "bom.json")])) == 4


def test_file_level_errors_are_not_offered_the_skip_hint(tmp_path):
    with pytest.raises(DataError) as error:
        load_rows([str(tmp_path / "missing.jsonl")])
    assert not error.value.skippable
    (tmp_path / "bad.jsonl").write_bytes(b"{\n")
    with pytest.raises(DataError) as error:
        load_rows([str(tmp_path / "bad.jsonl")])
    assert error.value.skippable


def test_data_folders_read_their_split_files_with_line_numbers(tmp_path, tokenizer):
    folder = tmp_path / "prefs"
    folder.mkdir()
    file_with_bad_lines(folder / "train.jsonl")
    (folder / "test.jsonl").write_bytes(line(GOOD[3]))
    with pytest.raises(RowError, match="train.jsonl': line 2 is not valid JSON"):
        load_rows([str(folder)])
    examples, report = load_preference_examples([str(folder)], tokenizer, on_bad_rows="skip")
    assert report.kept == 3 and report.dropped == {"invalid_line": 3}
    assert [r["prompt"] for r in load_rows([f"{folder}:test"])] == [GOOD[3]["prompt"]]
    with pytest.raises(DataError, match="no split 'validation'; available splits: \\['test', 'train'\\]"):
        load_rows([f"{folder}:validation"])

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="the folder holds no data files"):
        load_rows([str(empty)])
    (empty / "notes.md").write_text("no data here")
    with pytest.raises(DataError, match="cannot read the folder's 'train' files \\(notes.md; readable here"):
        load_rows([str(empty)])


# --------------------------------------------------------------------------------------------
# Huge fields


HUGE_FIELD = Path(__file__).with_name("huge_field.py")


def test_a_50_mb_field_costs_memory_in_proportion_to_the_limit_not_the_input(tmp_path):
    """Before the cap, tokenizing such a field whole took ~10 GB and 82 s."""
    env = {"PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, str(HUGE_FIELD), str(50_000_000)], capture_output=True, text=True, env=env, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"50 MB field: {result['seconds']:.2f} s, peak memory +{result['extra_mb']:.0f} MB")  # pytest -s shows it
    assert result["truncated"] == {"prompt": 1, "chosen": 1}
    assert (result["prompt"], result["chosen"]) == (64, 32)
    # The row itself holds ~200 MB of text (prompt, chosen, their UTF-8 checks); tokenizing it whole ~10 GB.
    assert result["extra_mb"] < 600, result
    assert result["seconds"] < 30, result


def natural_text(words: int, seed: int) -> str:
    import random

    rng = random.Random(seed)
    vocabulary = ["banop", "zorbat", "mipo", "tuvalak", "fox", "dog", "quick", "lazy", "Hello", "there!", "0123"]
    return " ".join(rng.choice(vocabulary) for _ in range(words))


@pytest.mark.parametrize("limits", [(16, 8), (200, 120)])
def test_capping_gives_the_same_tokens_as_tokenizing_whole_fields(tokenizer, monkeypatch, limits):
    rows = [
        {
            "id": f"r{i}",
            "prompt": natural_text(30_000, i),
            "chosen": natural_text(30_000, 100 + i),
            "rejected": natural_text(20_000, 200 + i),
        }
        for i in range(3)
    ]
    max_prompt, max_completion = limits
    capped, capped_report = prepare_preference_examples(
        rows, tokenizer, max_prompt_length=max_prompt, max_completion_length=max_completion
    )
    longest = cap_module.longest_token_chars(tokenizer)
    assert cap_module.char_limit(longest, max_prompt) < len(rows[0]["prompt"])  # the cap does cut these fields
    monkeypatch.setattr(cap_module, "char_limit", lambda longest, limit: 1 << 62)
    whole, whole_report = prepare_preference_examples(
        rows, tokenizer, max_prompt_length=max_prompt, max_completion_length=max_completion
    )
    assert capped == whole
    assert capped_report.truncated == whole_report.truncated == {"prompt": 3, "chosen": 3, "rejected": 3}

    chats = [
        {
            "messages": [
                {"role": "user", "content": "Repeat after me."},
                {"role": "assistant", "content": natural_text(20_000, 50 + i)},
            ]
        }
        for i in range(2)
    ]
    uncapped_sft = prepare_sft_examples(chats, tokenizer, max_length=max_prompt)
    monkeypatch.undo()
    capped_sft = prepare_sft_examples(chats, tokenizer, max_length=max_prompt)
    assert capped_sft == uncapped_sft and len(capped_sft[0]) == 2 and capped_sft[1].truncated == {"sequence": 2}
