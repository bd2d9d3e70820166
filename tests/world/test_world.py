"""The embedded world: deterministic data, held-out words, grading, and the shipped assets."""

from __future__ import annotations

import json
import random
import re

import pytest

from helpers import SMALL_WORLD
from mmpo.world.build import (
    DEFAULT_OUT,
    build_world,
    choice_accuracy,
    generate_world_data,
    generation_quality,
    read_jsonl,
)
from mmpo.world.tasks import (
    FACT_TASK,
    WORD_TASKS,
    WorldSizes,
    generate_rows,
    grade,
    judge_pair,
    make_example,
    near_miss,
)

SMALL = WorldSizes(**SMALL_WORLD)
TRAIN_FILES = ("data/sft_train", "data/prefs_train")
HELDOUT_FILES = ("data/sft_val", "data/prefs_test", "data/prompts_eval", "tasks/world_copy")


def words_of(rows, *, tasks=WORD_TASKS):
    return {w for row in rows if row["task"] in tasks for w in row["words"]}


def test_same_seed_writes_identical_files_and_another_seed_differs(tmp_path):
    a = generate_world_data(tmp_path / "a", seed=3, sizes=SMALL)
    generate_world_data(tmp_path / "b", seed=3, sizes=SMALL)
    generate_world_data(tmp_path / "c", seed=4, sizes=SMALL)
    assert set(a) == set(TRAIN_FILES + HELDOUT_FILES + ("tasks/world_facts",))
    for name in a:
        same = (tmp_path / "a" / f"{name}.jsonl").read_bytes()
        assert same == (tmp_path / "b" / f"{name}.jsonl").read_bytes(), name
        assert same != (tmp_path / "c" / f"{name}.jsonl").read_bytes(), name


def test_heldout_words_never_appear_in_training_text():
    rows = generate_rows(seed=1, sizes=SMALL)
    heldout = set().union(*(words_of(rows[name]) for name in HELDOUT_FILES))
    trained = set().union(*(words_of(rows[name], tasks=WORD_TASKS + (FACT_TASK,)) for name in TRAIN_FILES))
    assert heldout and trained and not heldout & trained
    # ... not even as a word of any training text (instructions and answers alike).
    training_text = " ".join(json.dumps(row) for name in TRAIN_FILES for row in rows[name])
    assert not heldout & set(re.findall(r"[a-z]+", training_text))


def test_every_preference_pair_prefers_the_concise_correct_answer():
    rows = generate_rows(seed=2, sizes=SMALL)
    for name in ("data/prefs_train", "data/prefs_test"):
        for row in rows[name]:
            assert grade(row, row["chosen"]) == 2
            assert grade(row, row["rejected"]) < 2, row
            assert judge_pair(row, row["chosen"], row["rejected"]) == 1.0
    styles = {row["rejected_style"] for row in rows["data/prefs_train"]}
    assert styles == {"verbose", "deflect", "wrong"}


def test_sft_answers_are_mostly_unhelpful_but_never_wrong():
    rows = generate_rows(seed=0, sizes=SMALL)["data/sft_train"]
    grades = [grade(row, row["messages"][-1]["content"]) for row in rows]
    assert 0.25 < grades.count(2) / len(rows) < 0.45  # concise answers are the minority
    for row, g in zip(rows, grades):
        assert g == {"concise": 2, "verbose": 1, "deflect": 0}[row["style"]], row


@pytest.mark.parametrize(
    ("answer", "output", "expected"),
    [
        ("banop", "banop", 2),
        ("banop", "  banop\n", 2),
        ("banop", "Sure! The answer is banop.", 1),
        ("banop", "banopi", 0),  # a longer word is not the answer
        ("banop", "Banop", 0),
        ("b", "I am not sure about that.", 0),  # a letter inside a word does not count
        ("b", "It is b.", 1),
        ("red", "", 0),
    ],
)
def test_grade(answer, output, expected):
    assert grade({"answer": answer}, output) == expected


def test_judge_pair_follows_grades_both_ways():
    ex = {"answer": "zorbat"}
    assert judge_pair(ex, "zorbat", "It is zorbat.") == 1.0
    assert judge_pair(ex, "I am not sure about that.", "It is zorbat.") == 0.0
    assert judge_pair(ex, "no", "also no") == 0.5
    assert judge_pair(ex, "zorbat", " zorbat ") == 0.5


def test_examples_have_checkable_answers_and_bad_tasks_fail_clearly():
    rng = random.Random(0)
    assert make_example(rng, "plural", ["banop"])["answer"] == "banops"
    assert make_example(rng, "first_letter", ["banop"])["answer"] == "b"
    repeat = make_example(rng, "repeat", ["banop"])
    assert repeat == {
        "task": "repeat",
        "instruction": 'Repeat the word "banop".',
        "answer": "banop",
        "words": ["banop"],
    }
    assert make_example(rng, FACT_TASK, ["zorba"], {"zorba": "red"})["answer"] == "red"
    with pytest.raises(ValueError, match="unknown task 'spell'"):
        make_example(rng, "spell", ["banop"])
    with pytest.raises(ValueError, match="no fact known about 'banop'"):
        make_example(rng, FACT_TASK, ["banop"], {"zorba": "red"})
    miss = near_miss(rng, "banopi")
    assert miss != "banopi" and not "banopi".startswith(miss) and not miss.startswith("banopi")


def test_multiple_choice_tasks_are_well_formed():
    rows = generate_rows(seed=0, sizes=SMALL)
    for name in ("tasks/world_facts", "tasks/world_copy"):
        for row in rows[name]:
            choices = row["choices"]
            assert len(choices) == SMALL.mc_choices == len(set(choices))
            assert 0 <= row["gold"] < len(choices)
            # no choice is a prefix of another, so scoring without an end token is fair
            assert not any(a != b and b.startswith(a) for a in choices for b in choices), row
    assert {r["gold"] for r in rows["tasks/world_copy"]} == set(range(SMALL.mc_choices))


def test_build_world_end_to_end_on_a_small_world(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = build_world(tmp_path, seed=5, sizes=SMALL, sft_epochs=1, vocab_size=400)
    saved = json.loads((tmp_path / "world.json").read_text())
    assert saved == info
    assert info["sizes"]["data/sft_train"] == SMALL.sft_train
    assert info["sft"]["steps"] == SMALL.sft_train // 32
    assert info["sft"]["eval_loss_after"] < info["sft"]["eval_loss_before"]
    quality = info["sft_quality"]
    assert 0 <= quality["generation"]["concise_correct"] <= 1
    assert set(quality["generation"]["per_task"]) == set(WORD_TASKS)
    assert set(quality["retention"]) == {"world_facts", "world_copy"}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "sft_model")
    assert model.num_parameters() == info["model"]["parameters"]
    assert len(AutoTokenizer.from_pretrained(tmp_path / "tokenizer")) == 400


# ----------------------------------------------------------------------------- shipped assets


@pytest.fixture(scope="module")
def world_info():
    path = DEFAULT_OUT / "world.json"
    assert path.exists(), f"{path} is missing: rebuild with `mmpo world build`"
    return json.loads(path.read_text())


def test_shipped_data_is_what_the_generator_writes_for_its_seed(tmp_path, world_info):
    counts = generate_world_data(tmp_path, seed=world_info["seed"])
    assert counts == world_info["sizes"]
    for name in counts:
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (DEFAULT_OUT / f"{name}.jsonl").read_bytes(), name


def test_shipped_model_loads_and_matches_its_recorded_retention(world_info):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_OUT / "sft_model")
    assert AutoTokenizer.from_pretrained(DEFAULT_OUT / "tokenizer").get_vocab() == tokenizer.get_vocab()
    assert tokenizer.chat_template and tokenizer.eos_token == "<|end|>" and tokenizer.pad_token == "<|pad|>"
    model = AutoModelForCausalLM.from_pretrained(DEFAULT_OUT / "sft_model")
    assert model.num_parameters() == world_info["model"]["parameters"]
    for name in ("world_facts", "world_copy"):
        rows = read_jsonl(DEFAULT_OUT / f"tasks/{name}.jsonl")[:80]
        accuracy = choice_accuracy(model, tokenizer, rows)
        assert accuracy > 0.5, (name, accuracy)  # 4 choices: chance is 0.25
    assert world_info["sft_quality"]["retention"]["world_facts"] > 0.5


def test_shipped_model_reproduces_its_recorded_answer_quality_with_headroom(world_info):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_OUT / "sft_model")
    model = AutoModelForCausalLM.from_pretrained(DEFAULT_OUT / "sft_model")
    quality = generation_quality(model, tokenizer, read_jsonl(DEFAULT_OUT / "data/prompts_eval.jsonl"))
    recorded = world_info["sft_quality"]["generation"]
    # Greedy decoding is deterministic; the slack covers near-ties that float order may flip.
    assert quality["concise_correct"] == pytest.approx(recorded["concise_correct"], abs=0.03)
    assert quality["contains_answer"] == pytest.approx(recorded["contains_answer"], abs=0.03)
    # Competent (answers are often correct) yet with clear headroom for preference training.
    assert 0.15 < quality["concise_correct"] < 0.5 and quality["contains_answer"] > 0.1
