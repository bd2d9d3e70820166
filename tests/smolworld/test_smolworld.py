"""The real-model world: answer extraction, verifiers, held-out splits, retention tasks, shipped files."""

from __future__ import annotations

import json

import pytest

from mmpo.evaluation.harness import write_local_task_yamls
from mmpo.smolworld.answers import first_number, first_phrase, numbers_in
from mmpo.smolworld.build import build_smolworld, smolworld_path
from mmpo.smolworld.families import FAMILIES, make_prompts, split_items, verify_capital, verify_number
from mmpo.smolworld.retention import retention_tasks


def test_numbers_are_read_in_order_with_thousands_and_without_decimals():
    assert numbers_in("7 + 5 = 12, not 1,200 or 3.5") == [7, 5, 12, 1200]
    assert first_number("7 + 5 = 12", ignore=[7, 5]) == 12
    assert first_number("no digits here") is None


def test_phrases_match_whole_words_ignoring_case_and_accents_longest_first():
    assert first_phrase("La capital es Bogotá.", ["Bogota", "Lima"]) == "Bogota"
    assert first_phrase("Visit San Salvador", ["Salvador", "San Salvador"]) == "San Salvador"
    assert first_phrase("Romeo went home", ["Rome"]) is None  # not inside a longer word


@pytest.mark.parametrize(
    ("reply", "right"),
    [
        ("12", True),
        ("7 + 5 = 12", True),  # the operands are not answers
        ("The sum of 7 and 5 is 12.", True),  # a full sentence is fine
        ("7 + 5 = 13, or maybe 12", False),  # the first answer it commits to is wrong
        ("To solve this, we need to add", False),
    ],
)
def test_number_verifier_rewards_the_right_answer_not_a_short_reply(reply, right):
    assert verify_number({"answer": "12", "operands": [7, 5]}, reply) == float(right)


@pytest.mark.parametrize(
    ("reply", "right"),
    [
        ("Kyiv", True),
        ("The capital of Ukraine is Kiev.", True),  # an accepted spelling, in a sentence
        ("Moscow. Kyiv is the largest city.", False),  # names a wrong capital first
        ("The capital of Australia is Sydney.", False),  # a big non-capital city is a wrong answer too
        ("Ukraine is a country.", False),
    ],
)
def test_capital_verifier(reply, right):
    assert verify_capital({"answer": "Kyiv", "accepted": ["Kyiv", "Kiev"]}, reply) == float(right)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_held_out_facts_are_never_asked_in_training_and_splits_are_reproducible(name):
    splits = split_items(name, seed=0)
    train_groups = {r["group"] for r in splits["train"]}
    heldout_groups = {r["group"] for r in splits["heldout"]}
    assert train_groups and heldout_groups and not train_groups & heldout_groups
    assert splits == split_items(name, seed=0)
    assert split_items(name, seed=1) != splits
    for row in splits["train"][:20] + splits["heldout"][:20]:
        # every row's own answer passes its verifier, and a reply of nothing fails it
        assert FAMILIES[name].verify(row, row["answer"]) == 1.0
        assert FAMILIES[name].verify(row, "") == 0.0


def test_make_prompts_samples_per_family_and_mixes_families():
    rows = make_prompts(["add", "capital"], "heldout", seed=0, per_family=10)
    assert len(rows) == 20 and {r["task"] for r in rows} == {"add", "capital"}
    assert all(r["split"] == "heldout" for r in rows)
    with pytest.raises(ValueError, match="unknown task family 'poetry'"):
        make_prompts(["poetry"], "train")


def test_retention_rows_have_one_right_answer_among_distinct_choices(tmp_path):
    for name, rows in retention_tasks(seed=0).items():
        assert len(rows) >= 25, name
        for row in rows:
            assert len(set(row["choices"])) == 4 and 0 <= row["gold"] < 4
    # the shipped task files are valid lm-eval local tasks
    assert sorted(write_local_task_yamls(smolworld_path("tasks"), tmp_path)) == sorted(retention_tasks())


def test_shipped_files_are_what_the_build_writes(tmp_path):
    counts = build_smolworld(tmp_path, seed=0)
    for relative in counts:
        assert (tmp_path / relative).read_text() == smolworld_path(relative).read_text(), relative
    heldout = [json.loads(line) for line in smolworld_path("data/prompts_heldout.jsonl").read_text().splitlines()]
    train = [json.loads(line) for line in smolworld_path("data/prompts_train.jsonl").read_text().splitlines()]
    assert not {(r["task"], r["group"]) for r in heldout} & {(r["task"], r["group"]) for r in train}
