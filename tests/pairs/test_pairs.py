"""mmpo pairs: sampling from the bundled world model, verifier grading, pair selection, resume, training on the output."""

from __future__ import annotations

import json
import random
import textwrap
from pathlib import Path

import pytest

from mmpo.config import ConfigError, TrainConfig
from mmpo.pairs import PairsOptions, make_pairs, resolve_verifier, select_pairs
from mmpo.pairs.build import SAMPLES_FILE, outcome
from mmpo.pairs.verifiers import score, verify_by_task
from mmpo.world import bundled_path

WORLD_PROMPTS = str(bundled_path("data/prefs_train.jsonl"))


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------- pair selection


def test_select_pairs_takes_the_largest_gap_first_and_only_eligible_distinct_samples():
    scores = [1.0, 0.5, 0.0, 0.0]
    texts = ["a", "b", "c", "d"]
    pairs = select_pairs(scores, [True] * 4, texts, 3, random.Random(0))
    assert pairs[0][0] == 0 and pairs[0][1] in (2, 3) and pairs[1][0] == 0 and pairs[1][1] in (2, 3)
    assert pairs[2] in [(0, 1), (1, 2), (1, 3)]  # gap 0.5 after both gaps of 1.0
    assert all(scores[i] > scores[j] for i, j in pairs)
    # the best sample is cut off: it cannot be chosen
    assert sorted(select_pairs(scores, [False, True, True, True], texts, 5, random.Random(0))) == [(1, 2), (1, 3)]
    # the same text scored differently (a random verifier) never pairs with itself
    assert select_pairs([1.0, 0.0], [True, True], ["x", "x"], 1, random.Random(0)) == []


def test_outcomes_name_why_a_prompt_gave_no_pair():
    assert outcome([1.0, 1.0, 1.0], [True] * 3, []) == "all_right"
    assert outcome([0.0, 0.0], [True, True], []) == "all_wrong"
    assert outcome([0.5, 0.5], [True, True], []) == "all_partial"
    assert outcome([1.0, 0.0, 0.0], [False, True, False], []) == "too_few_finished"
    assert outcome([1.0, 0.0], [True, True], [(0, 1)]) == "pairs"


# ------------------------------------------------------------------------------------ verifiers


def test_builtin_verifiers_dispatch_on_the_task_and_grade_correctness():
    world_row = {"task": "plural", "answer": "banops"}
    assert verify_by_task(world_row, "banops") == 1.0
    assert verify_by_task(world_row, 'Sure! The answer is "banops".') == 0.5
    assert verify_by_task(world_row, "banopi") == 0.0
    add_row = {"task": "add", "answer": "12", "operands": [7, 5]}
    assert verify_by_task(add_row, "7 + 5 = 12") == 1.0
    assert verify_by_task(add_row, "7 + 5 = 13") == 0.0
    with pytest.raises(ValueError, match="no built-in verifier for task 'poetry'"):
        verify_by_task({"task": "poetry"}, "")


def test_user_verifier_from_module_function(tmp_path, monkeypatch):
    (tmp_path / "my_checks.py").write_text(
        textwrap.dedent("""
        def shouts(example, completion):
            return completion.isupper()
        def broken(example, completion):
            return 3
        """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    shouts = resolve_verifier("my_checks:shouts")
    assert score(shouts, {}, "YES", "here") == 1.0 and score(shouts, {}, "no", "here") == 0.0
    with pytest.raises(ValueError, match="prompt 3: the verifier returned 3"):
        score(resolve_verifier("my_checks:broken"), {}, "x", "prompt 3")
    with pytest.raises(ConfigError, match="has no function 'missing'"):
        resolve_verifier("my_checks:missing")
    with pytest.raises(ConfigError, match="cannot import module 'no_such_module_xyz'"):
        resolve_verifier("no_such_module_xyz:f")
    with pytest.raises(ConfigError, match="unknown verifier 'nonsense'"):
        resolve_verifier("nonsense")


def test_rows_the_verifier_cannot_read_fail_before_the_model_loads(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"instruction": "What is 2 + 3?", "task": "add"}) + "\n")  # no answer
    with pytest.raises(ConfigError, match="prompt 0: the verifier failed: KeyError"):
        make_pairs(PairsOptions(model=str(tmp_path / "no_model_here"), prompts=str(prompts), output_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match="k must be >= 2"):
        make_pairs(PairsOptions(prompts=str(prompts), k=1, output_dir=str(tmp_path)))


# --------------------------------------------------------------------------- end to end (world)


@pytest.fixture(scope="module")
def world_pairs(tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs")
    options = PairsOptions(
        prompts=WORLD_PROMPTS, output_dir=str(out), limit=24, k=4, batch_size=8, max_new_tokens=16, progress=False
    )
    return options, make_pairs(options, say=lambda _: None)


def test_pairs_are_trl_explicit_prompt_rows_with_provenance_and_consistent_counts(world_pairs):
    options, result = world_pairs
    pairs = _read_jsonl(result.pairs_file)
    samples = {r["index"]: r["samples"] for r in _read_jsonl(result.output_dir / SAMPLES_FILE)}
    report = result.report
    assert len(samples) == 24 and all(len(s) == 4 for s in samples.values())
    assert pairs and report["pairs"] == len(pairs)
    assert sum(report["outcomes"].values()) == 24 == report["prompts"]
    assert report["outcomes"]["pairs"] == len({p["provenance"]["prompt_index"] for p in pairs})
    for pair in pairs:
        assert isinstance(pair["prompt"], str) and isinstance(pair["chosen"], str) and isinstance(pair["rejected"], str)
        prov = pair["provenance"]
        drawn = samples[prov["prompt_index"]]
        # the pair is made of the recorded samples, regraded here by the verifier
        assert pair["chosen"] == drawn[prov["chosen_sample"]]["text"]
        assert pair["rejected"] == drawn[prov["rejected_sample"]]["text"]
        assert verify_by_task(pair, pair["chosen"]) == prov["chosen_score"] > prov["rejected_score"]
        assert verify_by_task(pair, pair["rejected"]) == prov["rejected_score"]
        assert prov["sampling"]["k"] == 4 and prov["sampling"]["temperature"] == options.temperature
        assert "rejected_style" not in pair  # the source pair's own metadata is not carried over


def test_rerun_resumes_from_the_samples_on_disk_and_other_settings_are_refused(world_pairs, tmp_path):
    options, result = world_pairs
    full_samples = (result.output_dir / SAMPLES_FILE).read_text()
    pairs_before = result.pairs_file.read_text()
    # an interrupted run: the last batch (8 prompts) never reached the disk, and a half-written line
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("sampling.json",):
        (partial / name).write_text((result.output_dir / name).read_text())
    lines = full_samples.splitlines(keepends=True)
    (partial / SAMPLES_FILE).write_text("".join(lines[:16]) + lines[16][:20])
    messages = []
    resumed = make_pairs(PairsOptions(**{**options.__dict__, "output_dir": str(partial)}), say=messages.append)
    assert "resuming: 2 batches on disk" in messages[0]
    # the cut-off line was dropped, the missing batch appended after the complete ones
    assert (partial / SAMPLES_FILE).read_text() == full_samples
    assert resumed.pairs_file.read_text() == pairs_before  # same seeds per batch: same samples, same pairs
    with pytest.raises(ConfigError, match="other settings \\(sampling.temperature differ\\)"):
        make_pairs(PairsOptions(**{**options.__dict__, "temperature": 0.9}))


def test_the_pairs_file_trains_with_the_engine(world_pairs, tmp_path):
    from mmpo.training import train

    _, result = world_pairs
    out = train(
        TrainConfig(
            dataset=(str(result.pairs_file),),
            eval_dataset=(),
            max_steps=2,
            per_device_batch_size=4,
            output_dir=str(tmp_path / "run"),
            progress=False,
            cache_dir=str(tmp_path / "cache"),
        )
    )
    assert out.global_step == 2
