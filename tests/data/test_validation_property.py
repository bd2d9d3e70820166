"""Validation up front: every bad input of docs/reliability.md's table, and a property test that
random rows give valid examples or one clear DataError, never another exception.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmpo.config import ConfigError, SFTConfig, TrainConfig, from_dict, load_yaml, resolve
from mmpo.data import DataError, load_rows, prepare_preference_examples, prepare_sft_examples
from mmpo.forward import pad_sequences
from mmpo.training import train

GOOD = {"prompt": "Repeat the word banop.", "chosen": "banop", "rejected": "I am not sure."}
SPECIAL = ["<|end|>", "<|assistant|>", "<|user|>", "<|system|>", "<|pad|>", "\n", " ", "{{", "{%"]


# --------------------------------------------------------------------------------------------
# Property: random rows -> valid examples or DataError


def check_examples(examples: list[dict], tokenizer, *, max_prompt: int, max_completion: int) -> None:
    """The data contract of docs/architecture.md, and that the examples make tensors."""
    vocab = len(tokenizer)
    for example in examples:
        assert isinstance(example["id"], str)
        assert 1 <= len(example["prompt_ids"]) <= max_prompt
        for key in ("chosen_ids", "rejected_ids"):
            assert 1 <= len(example[key]) <= max_completion
        assert example["chosen_ids"] != example["rejected_ids"]
        for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
            assert all(isinstance(t, int) and 0 <= t < vocab for t in example[key])
    if examples:
        sequences = [ex["prompt_ids"] + ex[key] for ex in examples for key in ("chosen_ids", "rejected_ids")]
        batch = pad_sequences(sequences, tokenizer.pad_token_id)
        assert batch.shape == (len(sequences), max(map(len, sequences)))


text = st.one_of(st.text(max_size=30), st.sampled_from(SPECIAL), st.text(alphabet="ab <|>end", min_size=1, max_size=8))
message = st.dictionaries(
    keys=st.sampled_from(["role", "content", "name", "tool_calls"]),
    values=st.one_of(
        st.sampled_from(["user", "assistant", "system", "tool", "robot", ""]), text, st.none(), st.integers()
    ),
    max_size=4,
)
role_message = st.builds(
    lambda role, content: {"role": role, "content": content},
    st.sampled_from(["user", "assistant", "system", "tool"]),
    text,
)
value = st.one_of(
    text,
    st.lists(st.one_of(message, role_message), max_size=4),
    st.none(),
    st.integers(),
    st.floats(allow_nan=True),
    st.booleans(),
    st.binary(max_size=8),
    st.dictionaries(text, text, max_size=2),
)
random_row = st.one_of(
    st.dictionaries(
        st.sampled_from(["prompt", "chosen", "rejected", "system", "id", "messages", "extra"]), value, max_size=5
    ),
    st.none(),
    st.integers(),
    st.lists(text, max_size=3),
    text,
)
words = st.text(alphabet="abcdefghijklmnop <|>.\n", min_size=1, max_size=40).filter(str.strip)
plain_row = st.builds(lambda p, c, r: {"prompt": p, "chosen": c, "rejected": r}, words, words, words)
chat_row = st.builds(
    lambda p, c, r: {"prompt": p, "chosen": c, "rejected": r},
    st.lists(role_message, min_size=1, max_size=3),
    st.lists(role_message, min_size=1, max_size=2),
    st.lists(role_message, min_size=1, max_size=2),
)
# Lists of mostly well-formed rows reach tokenization and truncation; mixed lists reach validation.
rows = st.one_of(
    st.lists(st.one_of(plain_row, chat_row), max_size=5),
    st.lists(st.one_of(random_row, plain_row, chat_row), max_size=5),
)
limits = st.tuples(st.integers(1, 40), st.integers(1, 12))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=rows, limits=limits)
def test_random_rows_give_valid_examples_or_a_data_error(tokenizer, rows, limits):
    max_prompt, max_completion = limits
    kwargs = dict(max_prompt_length=max_prompt, max_completion_length=max_completion)
    try:
        examples, report = prepare_preference_examples(copy.deepcopy(rows), tokenizer, **kwargs)
    except DataError as error:
        assert str(error).startswith("row "), error  # names the row
    else:
        check_examples(examples, tokenizer, max_prompt=max_prompt, max_completion=max_completion)
        assert report.kept == len(examples)
    # Skipping bad rows never raises, and every row is accounted for.
    examples, report = prepare_preference_examples(copy.deepcopy(rows), tokenizer, on_error="skip", **kwargs)
    check_examples(examples, tokenizer, max_prompt=max_prompt, max_completion=max_completion)
    assert report.kept == len(examples)
    assert report.kept + sum(report.dropped.values()) == len(rows)


sft_row = st.one_of(
    random_row,
    st.builds(lambda m: {"messages": m}, st.lists(st.one_of(role_message, message), max_size=4)),
    st.builds(lambda i, o: {"instruction": i, "output": o}, value, value),
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(sft_row, max_size=4), max_length=st.integers(2, 40))
def test_random_sft_rows_give_valid_examples_or_a_data_error(tokenizer, rows, max_length):
    try:
        examples, _ = prepare_sft_examples(copy.deepcopy(rows), tokenizer, max_length=max_length)
    except DataError as error:
        assert str(error).startswith("row "), error
        examples, report = prepare_sft_examples(copy.deepcopy(rows), tokenizer, max_length=max_length, on_error="skip")
        assert report.kept + sum(report.dropped.values()) == len(rows)
    for example in examples:
        assert 1 <= len(example["input_ids"]) <= max_length and len(example["labels"]) == len(example["input_ids"])
        assert any(label != -100 for label in example["labels"])
        assert all(label in (-100, token) for label, token in zip(example["labels"], example["input_ids"]))


# --------------------------------------------------------------------------------------------
# The bad-input table: rows


BAD_ROWS = [
    ("missing column", {"prompt": "Hi", "chosen": "a"}, "missing column(s) ['rejected']"),
    ("row is not an object", ["Hi", "a", "b"], "expected a dict of columns, got list"),
    ("row is null", None, "expected a dict of columns, got NoneType"),
    ("number instead of text", {**GOOD, "chosen": 3}, "column 'chosen' must be a string or a list of {role, content}"),
    ("bytes instead of text", {**GOOD, "prompt": b"Hi"}, "column 'prompt' must be a string, got bytes"),
    ("NaN (a pandas missing value)", {**GOOD, "prompt": math.nan}, "column 'prompt' must be a string, got float"),
    ("message is a string", {**GOOD, "chosen": ["banop"]}, "column 'chosen' message 0 is a str, not a dict"),
    ("message without a role", {**GOOD, "chosen": [{"content": "a"}]}, "message 0 has no 'role'"),
    (
        "content as parts (multimodal)",
        {**GOOD, "chosen": [{"role": "assistant", "content": [{"type": "text"}]}]},
        "message 0 has no string 'content'",
    ),
    ("empty prompt", {**GOOD, "prompt": ""}, "column 'prompt' is empty"),
    ("whitespace-only completion", {**GOOD, "rejected": "  \n"}, "column 'rejected' is empty"),
    ("empty message list", {**GOOD, "chosen": []}, "column 'chosen' is an empty message list"),
    ("chosen == rejected", {**GOOD, "rejected": GOOD["chosen"]}, "'chosen' and 'rejected' are identical"),
    (
        "completion ends with a user turn",
        {**GOOD, "chosen": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]},
        "must end with an assistant message",
    ),
    ("unknown role", {**GOOD, "chosen": [{"role": "robot", "content": "a"}]}, "last message has role 'robot'"),
    ("system column not text", {**GOOD, "system": 5}, "column 'system' must be a string, got int"),
    (
        "prompt contradicts the conversations",
        {
            "prompt": "Other question",
            "chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "a"}],
            "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "b"}],
        },
        "column 'prompt' does not match the last user turn",
    ),
    pytest.param(
        "lone surrogate (a JSON \\ud800 escape)",
        {**GOOD, "chosen": "ban\ud800op"},
        "column 'chosen' is not valid Unicode: lone surrogate '\\ud800' at character 3",
    ),
]


@pytest.mark.parametrize(
    "case, row, fragment", BAD_ROWS, ids=[case.values[0] if hasattr(case, "values") else case[0] for case in BAD_ROWS]
)
def test_bad_row_gets_one_data_error_naming_row_and_column(tokenizer, case, row, fragment):
    with pytest.raises(DataError) as error:
        prepare_preference_examples([dict(GOOD), row], tokenizer)
    assert str(error.value).startswith("row #1") and fragment in str(error.value)
    examples, report = prepare_preference_examples([dict(GOOD), row], tokenizer, on_error="skip")
    assert report.kept == 1 and report.dropped == {"invalid_row": 1} and fragment in report.errors[0]


def test_huge_fields_are_truncated_and_counted(tokenizer):
    rows = [{**GOOD, "prompt": "quick brown fox " * 10_000}, {**GOOD, "chosen": "banop " * 10_000}]
    examples, report = prepare_preference_examples(rows, tokenizer, max_prompt_length=64, max_completion_length=16)
    assert len(examples) == 2 and report.truncated == {"prompt": 1, "chosen": 1}
    assert len(examples[0]["prompt_ids"]) == 64 and len(examples[1]["chosen_ids"]) == 16


def test_pairs_identical_after_truncation_are_dropped_and_counted(tokenizer):
    rows = [{**GOOD, "chosen": "banop banop x", "rejected": "banop banop y"}]
    examples, report = prepare_preference_examples(rows, tokenizer, max_completion_length=2)
    assert examples == [] and report.dropped == {"identical_after_truncation": 1}


def test_duplicated_pairs_are_kept_as_separate_rows(tokenizer):
    examples, report = prepare_preference_examples([dict(GOOD, id="d:train:0"), dict(GOOD, id="d:train:1")], tokenizer)
    assert report.kept == 2 and [ex["id"] for ex in examples] == ["d:train:0", "d:train:1"]
    assert examples[0]["chosen_ids"] == examples[1]["chosen_ids"]


def test_control_characters_are_text(tokenizer):
    examples, _ = prepare_preference_examples([{**GOOD, "prompt": "Hi\x00\x1b[31m there"}], tokenizer)
    assert len(examples) == 1


# --------------------------------------------------------------------------------------------
# Files


def load(tmp_path: Path, name: str, content: bytes) -> list[dict]:
    path = tmp_path / name
    path.write_bytes(content)
    return load_rows([str(path)])


LINE = json.dumps(GOOD).encode() + b"\n"


BAD_FILES = [
    ("bad.jsonl", LINE + b'{"prompt": "Hi", "chosen": "a"\n', "line 2 is not valid JSON"),
    (
        "latin1.jsonl",
        LINE + b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n',
        "line 2 is not valid UTF-8 (byte 0xe9 at column 16)",
    ),
    ("latin1.json", b"[" + LINE + b', {"prompt": "caf\xe9"}]', "line 2 is not valid UTF-8 (byte 0xe9 at column 18)"),
    ("rows.txt", LINE, "unsupported file type '.txt'"),
    ("broken.parquet", b"PAR1 not really", "cannot read .parquet file"),
    ("scalar.json", b'"hello"', "expected a JSON array of rows, got str"),
]


@pytest.mark.parametrize(
    "name, content, fragment",
    [
        *[pytest.param(*case, id=case[0]) for case in BAD_FILES],
        pytest.param(
            "array.jsonl",
            LINE + b"[1, 2]\n",
            "line 2 is a JSON list, not an object of columns",
            id="line that is not an object",
        ),
        pytest.param(
            "array.json",
            b"[" + LINE + b", 5]",
            "row 1 is a JSON int, not an object of columns",
            id="array element that is not an object",
        ),
    ],
)
def test_bad_file_gets_a_data_error_naming_the_file(tmp_path, name, content, fragment):
    with pytest.raises(DataError) as error:
        load(tmp_path, name, content)
    assert name in str(error.value) and fragment in str(error.value)


def test_empty_training_file_stops_before_the_model_is_loaded(tmp_path, tiny_model_dir, monkeypatch):
    import mmpo.training.preference as preference

    (tmp_path / "empty.jsonl").write_text("")
    monkeypatch.setattr(preference, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    cfg = TrainConfig(
        model=str(tiny_model_dir),
        dataset=(str(tmp_path / "empty.jsonl"),),
        eval_dataset=(),
        output_dir=str(tmp_path / "run"),
        progress=False,
    )
    with pytest.raises(ConfigError, match="no usable training examples: preference data: 0 rows in"):
        train(cfg)


# --------------------------------------------------------------------------------------------
# Chat templates


def with_template(tokenizer, template: str | None):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    return tok


ROLE = "{{ '<|' + m['role'] + '|>\n' + m['content'] }}"
GEN = "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
NOT_ASSISTANT = "{% if m['role'] != 'assistant' %}"
OPEN_ASSISTANT = "{% for m in messages %}" + ROLE + NOT_ASSISTANT + "<|end|>{% endif %}{% endfor %}" + GEN
DROPS_ASSISTANT = "{% for m in messages %}" + NOT_ASSISTANT + ROLE + "<|end|>{% endif %}{% endfor %}" + GEN
NO_SYSTEM = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}" + ROLE + "<|end|>{% endfor %}" + GEN
)
NO_GENERATION_PROMPT = "{% for m in messages %}" + ROLE + "<|end|>{% endfor %}"


def test_tokenizer_without_chat_template_is_refused(tokenizer):
    with pytest.raises(DataError, match="has no chat template"):
        prepare_preference_examples([GOOD], with_template(tokenizer, None))


def test_template_that_raises_names_the_row(tokenizer):
    with pytest.raises(DataError, match="row 'd:train:1': the chat template failed on this conversation: System role"):
        prepare_preference_examples(
            [dict(GOOD, id="d:train:0"), dict(GOOD, id="d:train:1", system="Be brief.")],
            with_template(tokenizer, NO_SYSTEM),
        )


def model_with_template(tmp_path: Path, tiny_model_dir: Path, template: str) -> Path:
    """A copy of the tiny model folder whose tokenizer carries ``template`` (saved as transformers 5 does)."""
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    (model_dir / "chat_template.jinja").write_text(template)
    return model_dir


def test_template_that_drops_assistant_turns_leaves_no_examples_and_stops_the_run(tmp_path, tokenizer, tiny_model_dir):
    examples, report = prepare_preference_examples([GOOD], with_template(tokenizer, DROPS_ASSISTANT))
    assert examples == [] and report.dropped == {"empty_completion": 1}
    model_dir = model_with_template(tmp_path, tiny_model_dir, DROPS_ASSISTANT)
    (tmp_path / "train.jsonl").write_text(json.dumps(GOOD) + "\n")
    cfg = TrainConfig(
        model=str(model_dir),
        dataset=(str(tmp_path / "train.jsonl"),),
        eval_dataset=(),
        output_dir=str(tmp_path / "run"),
        progress=False,
    )
    with pytest.raises(ConfigError, match="no usable training examples.*1 empty_completion"):
        train(cfg)


def test_template_without_generation_prompt_scores_the_assistant_header_in_both_completions(tokenizer):
    tok = with_template(tokenizer, NO_GENERATION_PROMPT)
    (example,), _ = prepare_preference_examples([GOOD], tok)
    header = tok("<|assistant|>\n", add_special_tokens=False)["input_ids"]
    assert example["chosen_ids"][: len(header)] == example["rejected_ids"][: len(header)] == header


def test_template_that_does_not_close_the_assistant_turn_is_refused(tokenizer):
    """Completions would not end with the end-of-turn/EOS token, so the model never learns to stop."""
    with pytest.raises(DataError, match="does not end the assistant turn"):
        prepare_preference_examples([GOOD], with_template(tokenizer, OPEN_ASSISTANT))
    with pytest.raises(DataError, match="does not end the assistant turn"):
        prepare_sft_examples(
            [{"prompt": GOOD["prompt"], "completion": GOOD["chosen"]}], with_template(tokenizer, OPEN_ASSISTANT)
        )


def test_chat_template_path_replaces_the_tokenizers_template(tmp_path, tiny_model_dir):
    """The way out the error above names: --chat-template-path, applied before the data is read."""
    model_dir = model_with_template(tmp_path, tiny_model_dir, OPEN_ASSISTANT)
    (tmp_path / "train.jsonl").write_text(json.dumps(GOOD) + "\n")
    common = dict(
        model=str(model_dir),
        dataset=(str(tmp_path / "train.jsonl"),),
        eval_dataset=(),
        max_steps=1,
        per_device_batch_size=1,
        progress=False,
    )
    with pytest.raises(DataError, match="does not end the assistant turn"):
        train(TrainConfig(output_dir=str(tmp_path / "open"), **common))
    fixed = tmp_path / "closed.jinja"
    fixed.write_text("{% for m in messages %}" + ROLE + "<|end|>{% endfor %}" + GEN)
    result = train(TrainConfig(output_dir=str(tmp_path / "closed"), chat_template_path=str(fixed), **common))
    assert result.metrics
    saved = (tmp_path / "closed").glob("checkpoints/*/model/chat_template.jinja")
    assert [path.read_text() for path in saved] == [fixed.read_text()]
    with pytest.raises(ConfigError, match="config key 'chat_template_path': no such file"):
        resolve(TrainConfig(chat_template_path=str(tmp_path / "missing.jinja"), **common))


# --------------------------------------------------------------------------------------------
# Configs


BAD_CONFIGS = [  # (test id, YAML values, expected message)
    ("betta", {"betta": 0.1}, "unknown config key 'betta'; did you mean 'beta'?"),
    ("beta=0", {"beta": 0.0}, "config key 'beta': must be > 0"),
    ("beta<0", {"beta": -1.0}, "config key 'beta': must be > 0"),
    ("learning_rate=0", {"learning_rate": 0.0}, "config key 'learning_rate': must be > 0"),
    ("learning_rate=nan", {"learning_rate": math.nan}, "config key 'learning_rate': must be a finite number"),
    ("epochs=0", {"epochs": 0}, "config key 'epochs': must be >= 1"),
    ("accumulation=0", {"gradient_accumulation_steps": 0}, "config key 'gradient_accumulation_steps': must be >= 1"),
    ("warmup_ratio=1", {"warmup_ratio": 1.0}, "config key 'warmup_ratio': must be in [0, 1)"),
    ("max_grad_norm<0", {"max_grad_norm": -1}, "config key 'max_grad_norm': must be >= 0"),
    (
        "chosen_reward<=rejected_reward",
        {"chosen_reward": 0.1, "rejected_reward": 0.9},
        "MMPO needs chosen_reward > rejected_reward",
    ),
    ("max_prompt_length=0", {"max_prompt_length": 0}, "config key 'max_prompt_length': must be >= 1"),
    (
        "report_to=neptune",
        {"report_to": ["neptune"]},
        "config key 'report_to': trackers are tensorboard, wandb, mlflow",
    ),
    ("dataset=[]", {"dataset": []}, "config key 'dataset': needs at least one dataset"),
]
CONFIG_GAPS = [  # wrong types, unknown choices, non-finite numbers
    {"beta": "0.1"},
    {"epochs": "3"},
    {"per_device_batch_size": 2.5},
    {"resume": "yes"},
    {"objective": "ppo"},
    {"normalize": "zscore"},
    {"normalize_scope": "global"},
    {"dtype": "float8"},
    {"optimizer": "sgd"},
    {"on_bad_rows": "ignore"},
    {"beta": math.inf},
    {"gamma": math.nan},
]


@pytest.mark.parametrize(
    "values, fragment",
    [
        *[pytest.param(values, fragment, id=case) for case, values, fragment in BAD_CONFIGS],
        *[
            pytest.param(values, f"config key '{key}'", id=f"type-{key}={value!r}")
            for values in CONFIG_GAPS
            for key, value in values.items()
        ],
    ],
)
def test_bad_config_value_is_a_config_error_naming_the_key(values, fragment):
    with pytest.raises(ConfigError) as error:
        resolve(from_dict(TrainConfig, values, source="run.yaml"))
    assert fragment in str(error.value)


def test_sft_config_checks_its_own_keys():
    with pytest.raises(ConfigError, match="config key 'max_length': must be >= 2"):
        resolve(from_dict(SFTConfig, {"max_length": 1}))
    with pytest.raises(ConfigError, match="unknown config key 'beta'"):
        from_dict(SFTConfig, {"beta": 0.1})


def test_config_file_that_is_missing_or_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_yaml(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- beta\n- 0.1\n")
    with pytest.raises(ConfigError, match="must be a mapping of keys to values"):
        load_yaml(tmp_path / "list.yaml")
