"""Data pipeline: row layouts, loading/mixing, chat-template tokenization, truncation, reports."""

from __future__ import annotations

import copy
import json
import random

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mmpo.data import (
    DataError,
    DatasetSpec,
    examples_fingerprint,
    load_rows,
    normalize_preference_row,
    normalize_sft_row,
    prepare_preference_examples,
    prepare_sft_examples,
)

USER_Q = [{"role": "user", "content": "What is the first letter of zorbat?"}]

# A ChatML-like template that writes the BOS itself (as Llama-3 / Qwen templates do).
CHATML_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# A Vicuna-like template: the generation prompt ends in a space that BPE merges into the completion.
VICUNA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ 'ASSISTANT: ' + message['content'] + '<|end|>' }}"
    "{% else %}{{ message['role'].upper() + ': ' + message['content'] + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT: ' }}{% endif %}"
)


@pytest.fixture(scope="module")
def chatml_tokenizer(tokenizer):
    """The fixture tokenizer with a BOS token, ChatML markers and a template that starts with the BOS."""
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens(
        {"bos_token": "<|begin|>", "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]},
        replace_extra_special_tokens=False,
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def vicuna_tokenizer(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = VICUNA_TEMPLATE
    return tok


def render_ids(tok, messages, generation_prompt=False):
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return tok(text, add_special_tokens=False)["input_ids"]


def assert_invariant(tok, rows, examples):
    """prompt_ids + completion_ids is exactly the tokenization of the whole rendered conversation."""
    by_id = {row["id"]: row for row in rows}
    for example in examples:
        pair = normalize_preference_row(by_id[example["id"]], 0)
        for side in ("chosen", "rejected"):
            full = render_ids(tok, pair.prompt + getattr(pair, side))
            assert example["prompt_ids"] + example[f"{side}_ids"] == full


# --- formats: preference layouts --------------------------------------------------------------


def test_explicit_strings():
    pair = normalize_preference_row({"prompt": "Q?", "chosen": "good", "rejected": "bad"}, 0)
    assert pair.prompt == [{"role": "user", "content": "Q?"}]
    assert pair.chosen == [{"role": "assistant", "content": "good"}]
    assert pair.rejected == [{"role": "assistant", "content": "bad"}]


def test_conversational_lists_and_repeated_prompt_prefix():
    chosen = [{"role": "assistant", "content": "z"}]
    rejected = [{"role": "assistant", "content": "q"}]
    pair = normalize_preference_row({"prompt": USER_Q, "chosen": chosen, "rejected": rejected}, 0)
    assert (pair.prompt, pair.chosen, pair.rejected) == (USER_Q, chosen, rejected)
    # chosen/rejected repeating the prompt turns: the copy is dropped.
    repeated = normalize_preference_row({"prompt": USER_Q, "chosen": USER_Q + chosen, "rejected": USER_Q + rejected}, 0)
    assert repeated == pair


def test_implicit_prompt_is_shared_prefix_multi_turn():
    history = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "spell banop"},
    ]
    row = {
        "chosen": history + [{"role": "assistant", "content": "b-a-n-o-p"}],
        "rejected": history + [{"role": "assistant", "content": "no"}],
    }
    pair = normalize_preference_row(row, 3)
    assert pair.prompt == history
    assert pair.chosen == [{"role": "assistant", "content": "b-a-n-o-p"}]
    assert pair.rejected == [{"role": "assistant", "content": "no"}]


def test_ultrafeedback_and_orca_shapes():
    """HuggingFaceH4/ultrafeedback_binarized and orca_dpo_pairs: prompt string + whole conversations."""
    question = "Which word is longer, mipo or tuvalak?"
    ultrafeedback = {
        "prompt": question,
        "prompt_id": "abc",
        "chosen": [{"role": "user", "content": question}, {"role": "assistant", "content": "tuvalak"}],
        "rejected": [{"role": "user", "content": question}, {"role": "assistant", "content": "mipo"}],
        "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": "tuvalak"}],
        "score_chosen": 8.0,
        "score_rejected": 3.0,
    }
    pair = normalize_preference_row(ultrafeedback, 0)
    assert pair.prompt == [{"role": "user", "content": question}]
    assert pair.chosen == [{"role": "assistant", "content": "tuvalak"}]
    # The same with a system turn inside the conversations (and Arrow's None-filled extra keys).
    system = {"role": "system", "content": "You are helpful.", "name": None}
    orca = {
        "prompt": question,
        "chosen": [system, {"role": "user", "content": question}, {"role": "assistant", "content": "tuvalak"}],
        "rejected": [system, {"role": "user", "content": question}, {"role": "assistant", "content": "mipo"}],
    }
    pair = normalize_preference_row(orca, 0)
    assert pair.prompt == [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": question}]
    assert pair.rejected == [{"role": "assistant", "content": "mipo"}]


def test_prompt_string_plus_completion_only_lists_and_system_column():
    row = {
        "system": "Be brief.",
        "prompt": "Q?",
        "chosen": [{"role": "assistant", "content": "yes"}],
        "rejected": [{"role": "assistant", "content": "no"}],
    }
    pair = normalize_preference_row(row, 0)
    assert pair.prompt == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q?"}]
    assert pair.chosen == [{"role": "assistant", "content": "yes"}]


BAD_PREFERENCE_ROWS = [
    ({"id": "d:train:4", "question": "Q", "answer": "A"}, ["'d:train:4'", "chosen", "found columns", "question"]),
    ({"id": "d:train:4", "prompt": "Q", "chosen": "A"}, ["'d:train:4'", "'rejected'", "found columns"]),
    ({"id": "d:train:4", "prompt": "Q", "chosen": 7, "rejected": "B"}, ["'d:train:4'", "'chosen'", "int"]),
    ({"id": "d:train:4", "prompt": "Q", "chosen": "A", "rejected": "  "}, ["'d:train:4'", "'rejected'", "empty"]),
    ({"id": "d:train:4", "prompt": "Q", "chosen": "same", "rejected": "same"}, ["'d:train:4'", "identical"]),
    ({"id": "d:train:4", "prompt": "", "chosen": "A", "rejected": "B"}, ["'d:train:4'", "'prompt'", "empty"]),
    (
        {"id": "d:train:4", "prompt": "Q", "chosen": [{"role": "user", "content": "A"}], "rejected": "B"},
        ["'d:train:4'", "'chosen'", "must end with an assistant message", "'user'"],
    ),
    (
        {"id": "d:train:4", "prompt": "Q", "chosen": [{"content": "A"}], "rejected": "B"},
        ["'d:train:4'", "'chosen'", "no 'role'"],
    ),
    (
        {"id": "d:train:4", "prompt": "Q", "chosen": "A", "rejected": [{"role": "assistant", "text": "B"}]},
        ["'d:train:4'", "'rejected'", "no string 'content'", "text"],
    ),
    (
        {
            "id": "d:train:4",
            "prompt": "Q one",
            "chosen": [{"role": "user", "content": "Q two"}, {"role": "assistant", "content": "A"}],
            "rejected": [{"role": "user", "content": "Q two"}, {"role": "assistant", "content": "B"}],
        },
        ["'d:train:4'", "'prompt'", "does not match"],
    ),
    (
        {
            "id": "d:train:4",
            "prompt": "Q",
            "chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
            "rejected": [{"role": "user", "content": "Q "}, {"role": "assistant", "content": "B"}],
        },
        ["'d:train:4'", "'chosen'", "'user' message in its completion"],
    ),
    (
        {
            "id": "d:train:4",
            "chosen": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A"}],
            "rejected": [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "B"}],
        },
        ["'d:train:4'", "no 'prompt' column", "share no leading turns"],
    ),
]


@pytest.mark.parametrize(("row", "fragments"), BAD_PREFERENCE_ROWS)
def test_preference_errors_name_row_and_column(row, fragments):
    with pytest.raises(DataError) as caught:
        normalize_preference_row(row, 4)
    message = str(caught.value)
    assert "#4" in message
    for fragment in fragments:
        assert fragment in message


def test_missing_columns_error_lists_accepted_layouts():
    with pytest.raises(DataError, match="Accepted layouts:.*implicit prompt"):
        normalize_preference_row({"text": "x"}, 0)


# --- formats: SFT layouts ---------------------------------------------------------------------


def test_sft_layouts():
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    assert normalize_sft_row({"messages": messages}, 0) == messages
    assert normalize_sft_row({"prompt": "Q", "completion": "A"}, 0) == messages
    assert normalize_sft_row({"instruction": "Q", "output": "A"}, 0) == messages
    with_input = normalize_sft_row({"instruction": "Spell", "input": "banop", "output": "b a n o p"}, 0)
    assert with_input[0] == {"role": "user", "content": "Spell\n\nbanop"}
    with_system = normalize_sft_row({"system": "S", "messages": messages}, 0)
    assert with_system[0] == {"role": "system", "content": "S"}


@pytest.mark.parametrize(
    ("row", "fragments"),
    [
        ({"id": "s:train:2", "text": "x"}, ["'s:train:2'", "found columns", "'text'", "messages"]),
        (
            {"id": "s:train:2", "messages": [{"role": "user", "content": "Q"}]},
            ["'s:train:2'", "'messages'", "assistant"],
        ),
        ({"id": "s:train:2", "messages": [{"role": "user"}]}, ["'s:train:2'", "'messages'", "content"]),
        ({"id": "s:train:2", "prompt": "Q", "completion": ""}, ["'s:train:2'", "'completion'", "empty"]),
        ({"id": "s:train:2", "instruction": "Q", "output": None}, ["'s:train:2'", "'output'", "string"]),
    ],
)
def test_sft_errors_name_row_and_column(row, fragments):
    with pytest.raises(DataError) as caught:
        normalize_sft_row(row, 2)
    for fragment in fragments:
        assert fragment in str(caught.value)


# --- tokenization: preference -----------------------------------------------------------------


def test_preference_tokens_are_template_rendering(tokenizer):
    rows = [{"id": "t:train:0", "prompt": "Repeat banop", "chosen": "banop", "rejected": "no"}]
    examples, report = prepare_preference_examples(rows, tokenizer)
    [example] = examples
    assert tokenizer.decode(example["prompt_ids"]) == "<|user|>\nRepeat banop<|end|><|assistant|>\n"
    assert tokenizer.decode(example["chosen_ids"]) == "banop<|end|>"
    assert tokenizer.decode(example["rejected_ids"]) == "no<|end|>"
    assert example["chosen_ids"][-1] == tokenizer.eos_token_id
    assert (report.rows_in, report.kept, report.dropped, report.boundary_adjusted) == (1, 1, {}, 0)
    assert_invariant(tokenizer, rows, examples)


TRICKY = st.sampled_from(
    [
        " ",
        "  ",
        "\n",
        "\n\n",
        "\t",
        "\r\n",
        "\u00a0",
        "<",
        "|",
        ">",
        ":",
        "é",
        "\u0301",
        "日本",
        "🙂",
        "Ġ",
        "Ċ",
        "the",
        " the",
        "banop",
        "0",
        "!",
        "<|",
        "|>",
    ]
)
TEXT = st.lists(st.one_of(TRICKY, st.text(min_size=1, max_size=6)), min_size=1, max_size=8).map("".join)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.lists(st.tuples(TEXT, TEXT, TEXT), min_size=1, max_size=6))
def test_prompt_plus_completion_equals_full_tokens(tokenizer, chatml_tokenizer, vicuna_tokenizer, data):
    rows = [
        {"id": f"h:train:{i}", "prompt": p, "chosen": c, "rejected": r}
        for i, (p, c, r) in enumerate(data)
        if p.strip() and c.strip() and r.strip() and c != r
    ]
    assume(rows)
    for tok in (tokenizer, chatml_tokenizer, vicuna_tokenizer):
        examples, report = prepare_preference_examples(rows, tok, max_prompt_length=10**6, max_completion_length=10**6)
        assert report.kept == len(examples) == len(rows)
        assert_invariant(tok, rows, examples)


def test_bpe_merge_across_boundary_moves_split_and_is_counted(vicuna_tokenizer):
    # "ASSISTANT: " then "the ..." renders as "ASSISTANT: the": the space merges into "Ġthe".
    rows = [{"id": "v:train:0", "prompt": "Repeat the word", "chosen": "the quick", "rejected": "the lazy"}]
    examples, report = prepare_preference_examples(rows, vicuna_tokenizer)
    prompt_alone = render_ids(vicuna_tokenizer, [{"role": "user", "content": "Repeat the word"}], True)
    assert report.boundary_adjusted == 1
    assert len(examples[0]["prompt_ids"]) < len(prompt_alone)
    assert examples[0]["prompt_ids"] == prompt_alone[: len(examples[0]["prompt_ids"])]
    assert_invariant(vicuna_tokenizer, rows, examples)


def test_bos_appears_exactly_once(chatml_tokenizer):
    rows = [{"id": "b:train:0", "prompt": "Q", "chosen": "yes", "rejected": "no"}]
    bos = chatml_tokenizer.bos_token_id
    # The template writes the BOS; the tokenizer itself would add one too.
    tok = copy.deepcopy(chatml_tokenizer)
    tok.add_bos_token = True
    assert tok("a")["input_ids"][0] == bos
    for candidate in (chatml_tokenizer, tok):
        [example], _ = prepare_preference_examples(rows, candidate)
        assert example["prompt_ids"][0] == bos
        assert (example["prompt_ids"] + example["chosen_ids"]).count(bos) == 1
    # A template without the BOS on a tokenizer that adds one: it is prepended once.
    tok.chat_template = CHATML_TEMPLATE.replace("{{ bos_token }}", "")
    [example], _ = prepare_preference_examples(rows, tok)
    assert example["prompt_ids"][0] == bos and example["prompt_ids"].count(bos) == 1
    sft, _ = prepare_sft_examples([{"prompt": "Q", "completion": "yes"}], tok)
    assert sft[0]["input_ids"][0] == bos and sft[0]["input_ids"].count(bos) == 1


def test_truncation_prompt_left_completion_right(tokenizer):
    prompt = " ".join(["the quick brown fox"] * 10)
    rows = [
        {"id": "x:train:0", "prompt": prompt, "chosen": "the lazy dog jumps", "rejected": "I am not sure"},
        {"id": "x:train:1", "prompt": "Hi", "chosen": "ok", "rejected": "no"},
    ]
    full_examples, _ = prepare_preference_examples(
        rows, tokenizer, max_prompt_length=10**6, max_completion_length=10**6
    )
    examples, report = prepare_preference_examples(rows, tokenizer, max_prompt_length=7, max_completion_length=3)
    long_full, long_cut = full_examples[0], examples[0]
    assert long_cut["prompt_ids"] == long_full["prompt_ids"][-7:]
    assert long_cut["chosen_ids"] == long_full["chosen_ids"][:3]
    assert long_cut["rejected_ids"] == long_full["rejected_ids"][:3]
    assert report.truncated == {
        "prompt": sum(len(e["prompt_ids"]) > 7 for e in full_examples),
        "chosen": sum(len(e["chosen_ids"]) > 3 for e in full_examples),
        "rejected": sum(len(e["rejected_ids"]) > 3 for e in full_examples),
    }
    assert min(report.truncated.values()) >= 1  # the long row is cut on all three sides
    assert report.lengths["prompt"]["max"] == 7 and report.lengths["completion"]["max"] == 3


def test_drops_are_counted_with_reasons(tokenizer):
    rows = [
        {"id": f"d:train:{i}", "prompt": "Q", "chosen": f"the quick {i}", "rejected": f"the lazy {i}"} for i in range(7)
    ]
    _, report = prepare_preference_examples(rows, tokenizer, max_completion_length=0)
    assert report.kept == 0 and report.dropped == {"empty_completion": 7}
    assert report.dropped_ids["empty_completion"] == [f"d:train:{i}" for i in range(5)]
    # Completions sharing their first tokens become identical when cut to those tokens.
    width = len(tokenizer("the", add_special_tokens=False)["input_ids"])
    examples, report = prepare_preference_examples(rows, tokenizer, max_completion_length=width)
    assert examples == [] and report.dropped == {"identical_after_truncation": 7}
    _, report = prepare_preference_examples(rows, tokenizer, max_prompt_length=0)
    assert report.dropped == {"empty_prompt": 7}
    assert "7 empty_prompt (e.g. d:train:0" in report.summary()


def test_bad_row_raises_before_any_rendering(tokenizer):
    class CountingTokenizer:
        def __init__(self, inner):
            self.inner, self.renders = inner, 0

        def apply_chat_template(self, *args, **kwargs):
            self.renders += 1
            return self.inner.apply_chat_template(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __call__(self, *args, **kwargs):
            return self.inner(*args, **kwargs)

    rows = [{"id": f"r:train:{i}", "prompt": "Q", "chosen": "yes", "rejected": "no"} for i in range(50)]
    rows[40] = {"id": "r:train:40", "prompt": "Q", "chosen": "yes"}
    counting = CountingTokenizer(tokenizer)
    with pytest.raises(DataError, match="'r:train:40'.*'rejected'"):
        prepare_preference_examples(rows, counting)
    assert counting.renders == 0


def test_skip_mode_counts_invalid_rows(tokenizer):
    rows = [{"id": f"r:train:{i}", "prompt": "Q", "chosen": "yes", "rejected": "no"} for i in range(4)]
    rows[1] = {"id": "r:train:1", "prompt": "Q", "chosen": "same", "rejected": "same"}
    examples, report = prepare_preference_examples(rows, tokenizer, on_error="skip")
    assert [e["id"] for e in examples] == ["r:train:0", "r:train:2", "r:train:3"]
    assert report.dropped == {"invalid_row": 1} and report.dropped_ids["invalid_row"] == ["r:train:1"]
    assert "identical" in report.errors[0]
    assert "1 invalid_row" in report.summary() and "identical" in report.summary()
    json.dumps(report.to_dict())  # serializable for data_report.json


def test_template_failure_names_the_row(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{{ m['content'] + '<|end|>' }}{% endfor %}"
    )
    rows = [
        {"id": "s:train:0", "prompt": "Q", "chosen": "a", "rejected": "b"},
        {"id": "s:train:1", "system": "S", "prompt": "Q", "chosen": "a", "rejected": "b"},
    ]
    with pytest.raises(DataError, match="'s:train:1'.*System role not supported"):
        prepare_preference_examples(rows, tok)
    examples, report = prepare_preference_examples(rows, tok, on_error="skip")
    assert len(examples) == 1 and report.dropped == {"invalid_row": 1}


def test_missing_chat_template_is_a_clear_error(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    with pytest.raises(DataError, match="no chat template.*--chat-template"):
        prepare_preference_examples([{"prompt": "Q", "chosen": "a", "rejected": "b"}], tok)
    with pytest.raises(DataError, match="no chat template"):
        prepare_sft_examples([{"prompt": "Q", "completion": "a"}], tok)


def test_num_proc_gives_the_same_examples(tokenizer):
    rng = random.Random(0)
    words = ["the", "quick", "banop", "zorbat", "fox", " ", "\n", "é"]
    rows = [
        {
            "id": f"p:train:{i}",
            "prompt": f"Q{i} " + " ".join(rng.choices(words, k=5)),
            "chosen": f"yes {i}",
            "rejected": f"no {i}",
        }
        for i in range(600)  # more than one chunk
    ]
    serial, serial_report = prepare_preference_examples(rows, tokenizer)
    parallel, parallel_report = prepare_preference_examples(rows, tokenizer, num_proc=2)
    assert parallel == serial and parallel_report == serial_report


def test_fingerprint(tokenizer):
    rows = [{"id": f"f:train:{i}", "prompt": "Q", "chosen": f"yes {i}", "rejected": "no"} for i in range(4)]
    examples, _ = prepare_preference_examples(rows, tokenizer)
    fingerprint = examples_fingerprint(examples)
    assert len(fingerprint) == 64
    assert examples_fingerprint(list(reversed(examples))) == fingerprint
    assert examples_fingerprint([{**e, "ref_chosen_logps": 1.0} for e in examples]) == fingerprint
    changed = copy.deepcopy(examples)
    changed[2]["rejected_ids"][0] += 1
    assert examples_fingerprint(changed) != fingerprint
    renamed = copy.deepcopy(examples)
    renamed[0]["id"] = "g:train:0"
    assert examples_fingerprint(renamed) != fingerprint
    assert examples_fingerprint(examples[:3]) != fingerprint


# --- tokenization: SFT ------------------------------------------------------------------------


MULTI_TURN = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Repeat banop"},
    {"role": "assistant", "content": "banop"},
    {"role": "user", "content": "First letter of zorbat?"},
    {"role": "assistant", "content": "z"},
]


def labeled_text(tok, example):
    return tok.decode([label for label in example["labels"] if label != -100])


def test_sft_labels_cover_assistant_turns_only(tokenizer, chatml_tokenizer, vicuna_tokenizer):
    rows = [{"id": "m:train:0", "messages": MULTI_TURN}]
    [example], _ = prepare_sft_examples(rows, tokenizer)
    assert example["input_ids"] == render_ids(tokenizer, MULTI_TURN)
    assert labeled_text(tokenizer, example) == "banop<|end|>z<|end|>"
    labeled = [i for i, label in enumerate(example["labels"]) if label != -100]
    assert all(example["labels"][i] == example["input_ids"][i] for i in labeled)
    [example], _ = prepare_sft_examples(rows, chatml_tokenizer)
    assert labeled_text(chatml_tokenizer, example) == "banop<|im_end|>\nz<|im_end|>\n"
    # With BPE merging "ASSISTANT: " + "banop", the merged token belongs to the assistant span.
    [example], _ = prepare_sft_examples(rows, vicuna_tokenizer)
    assert example["input_ids"] == render_ids(vicuna_tokenizer, MULTI_TURN)
    assert labeled_text(vicuna_tokenizer, example).replace(" ", "") == "banop<|end|>z<|end|>"


def test_sft_truncation_and_drops(tokenizer):
    rows = [
        {"id": "s:train:0", "messages": MULTI_TURN},
        {"id": "s:train:1", "instruction": " ".join(["the quick brown fox"] * 20), "output": "ok"},
    ]
    full, _ = prepare_sft_examples(rows, tokenizer, max_length=10**6)
    limit = len(full[0]["input_ids"]) - 3
    examples, report = prepare_sft_examples(rows, tokenizer, max_length=limit)
    assert examples[0]["input_ids"] == full[0]["input_ids"][:limit]
    assert examples[0]["labels"] == full[0]["labels"][:limit]
    assert len(full[1]["input_ids"]) > limit  # its only assistant turn is cut off
    assert report.kept == 1 and report.dropped == {"no_assistant_tokens": 1}
    assert report.dropped_ids["no_assistant_tokens"] == ["s:train:1"]
    assert report.truncated == {"sequence": 2}
    with pytest.raises(DataError, match="'s:train:1'.*'messages'"):
        prepare_sft_examples([rows[0], {"id": "s:train:1", "messages": []}], tokenizer)


# --- loading ----------------------------------------------------------------------------------


def preference_rows(count, tag):
    return [{"prompt": f"{tag} question {i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(count)]


def test_local_file_formats(tmp_path):
    rows = preference_rows(5, "q")
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "b.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    with (
        pa.OSFile(str(tmp_path / "d.arrow"), "wb") as sink,
        pa.ipc.new_stream(sink, pa.Table.from_pylist(rows).schema) as w,
    ):
        w.write_table(pa.Table.from_pylist(rows))
    with (
        pa.OSFile(str(tmp_path / "e.arrow"), "wb") as sink,
        pa.ipc.new_file(sink, pa.Table.from_pylist(rows).schema) as w,
    ):
        w.write_table(pa.Table.from_pylist(rows))
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(preference_rows(2, "t"))}
    ).save_to_disk(tmp_path / "saved")
    for name in ("a.jsonl", "b.json", "c.parquet", "d.arrow", "e.arrow", "saved"):
        loaded = load_rows([DatasetSpec(str(tmp_path / name))])
        assert sorted(loaded, key=lambda r: r["id"]) == [
            {**row, "id": f"{name.split('.')[0]}:train:{i}"} for i, row in enumerate(rows)
        ]
    test_rows = load_rows([DatasetSpec(str(tmp_path / "saved"), split="test", label="sv")])
    assert sorted(r["id"] for r in test_rows) == ["sv:test:0", "sv:test:1"]
    with pytest.raises(DataError, match="no split 'dev'.*'test', 'train'"):
        load_rows([DatasetSpec(str(tmp_path / "saved"), split="dev")])
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n{oops\n')
    with pytest.raises(DataError, match="line 2"):
        load_rows([str(tmp_path / "bad.jsonl")])
    with pytest.raises(DataError, match="no such local file"):
        load_rows([str(tmp_path / "missing.jsonl")])


def test_real_layouts_from_parquet_through_tokenization(tmp_path, tokenizer):
    """Nested message lists survive Parquet and tokenize (ultrafeedback-like and orca-like files)."""
    ultra = [
        {
            "prompt": f"Repeat banop {i}",
            "prompt_id": str(i),
            "chosen": [{"role": "user", "content": f"Repeat banop {i}"}, {"role": "assistant", "content": "banop"}],
            "rejected": [{"role": "user", "content": f"Repeat banop {i}"}, {"role": "assistant", "content": "no"}],
            "score_chosen": 9.0,
            "score_rejected": 1.0,
        }
        for i in range(6)
    ]
    pq.write_table(pa.Table.from_pylist(ultra), tmp_path / "ultra.parquet")
    rows = load_rows(["%s:train_prefs@0.5" % (tmp_path / "ultra.parquet")], seed=1)
    assert len(rows) == 3 and all(r["id"].startswith("ultra:train_prefs:") for r in rows)
    examples, report = prepare_preference_examples(rows, tokenizer)
    assert report.kept == 3
    assert tokenizer.decode(examples[0]["chosen_ids"]) == "banop<|end|>"
    assert tokenizer.decode(examples[0]["prompt_ids"]).startswith("<|user|>\nRepeat banop")


def test_weighted_mixture_is_deterministic(tmp_path):
    (tmp_path / "small.jsonl").write_text("\n".join(json.dumps(r) for r in preference_rows(10, "s")))
    (tmp_path / "big.jsonl").write_text(
        "\n".join(json.dumps({**r, "id": i}) for i, r in enumerate(preference_rows(20, "b")))
    )
    specs = [
        DatasetSpec(str(tmp_path / "small.jsonl"), weight=2.5),
        DatasetSpec(str(tmp_path / "big.jsonl"), weight=0.25),
    ]
    mixture = load_rows(specs, seed=3)
    small = [r["id"] for r in mixture if r["id"].startswith("small:")]
    big = [r["id"] for r in mixture if r["id"].startswith("big:")]
    assert len(small) == 25 and len(big) == 5
    # Every small row twice, plus half of them a third time; big rows distinct.
    counts = {row_id: small.count(row_id) for row_id in set(small)}
    assert len(counts) == 10 and sorted(counts.values()) == [2] * 5 + [3] * 5
    assert len(set(big)) == 5
    assert all(r["source_id"] == int(r["id"].split(":")[-1]) for r in mixture if r["id"].startswith("big:"))
    # Rows keep their content under their id.
    assert all(r["prompt"] == f"s question {r['id'].split(':')[-1]}" for r in mixture if r["id"].startswith("small:"))
    assert load_rows(specs, seed=3) == mixture
    other = load_rows(specs, seed=4)
    assert [r["id"] for r in other] != [r["id"] for r in mixture]
    # Changing one dataset's weight leaves the other's picks alone.
    reweighted = load_rows([specs[0], DatasetSpec(str(tmp_path / "big.jsonl"), weight=0.5)], seed=3)
    assert sorted(r["id"] for r in reweighted if r["id"].startswith("small:")) == sorted(small)
    with pytest.raises(DataError, match="different label"):
        load_rows([specs[0], specs[0]])


def test_spec_parse(tmp_path):
    assert DatasetSpec.parse("HuggingFaceH4/orca_dpo_pairs") == DatasetSpec("HuggingFaceH4/orca_dpo_pairs", "train")
    spec = DatasetSpec.parse("HuggingFaceH4/ultrafeedback_binarized:train_prefs@0.5")
    assert (spec.path, spec.split, spec.weight, spec.label) == (
        "HuggingFaceH4/ultrafeedback_binarized",
        "train_prefs",
        0.5,
        "ultrafeedback_binarized",
    )
    assert DatasetSpec.parse("data/prefs.jsonl@2").weight == 2.0
    colon_file = DatasetSpec.parse("data/a:b.jsonl")  # "b.jsonl" is not a split name
    assert (colon_file.path, colon_file.split, colon_file.label) == ("data/a:b.jsonl", "train", "a_b")
    assert DatasetSpec.parse("x/y:test").split == "test"
    existing = tmp_path / "run:1"
    existing.write_text("")
    assert DatasetSpec.parse(str(existing)).path == str(existing)  # an existing path is taken whole
    with pytest.raises(DataError, match="weight"):
        DatasetSpec("x", weight=-1)


def test_hub_id_offline_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as caught:
        load_rows(["HuggingFaceH4/orca_dpo_pairs:test"])
    message = str(caught.value)
    assert "'HuggingFaceH4/orca_dpo_pairs'" in message and "'test'" in message
    assert "could not be loaded" in message and "could not be downloaded" in message
