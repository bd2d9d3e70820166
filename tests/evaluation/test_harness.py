"""lm-evaluation-harness on local multiple-choice tasks with the tiny model (fully offline)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from mmpo.evaluation.harness import _model_args, run_harness, write_local_task_yamls

QUERIES = [
    "The quick brown fox jumps over the lazy dog. Next:",
    "What is the first letter of zorbat?",
    "Repeat the word banop please.",
    "Hello there! How are you today?",
    "I am not sure about that, sorry.",
    "Which word is longer?",
    "0123456789",
    "Let me think about it.",
]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model is faster on one thread on a busy 2-core machine
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def opinionated_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with larger random weights, so its favourite answer depends on the question."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    path = tmp_path_factory.mktemp("opinionated")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return path


def continuation_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """Summed log-prob of ``continuation`` after ``context``, split the way lm-eval's HF model does
    (encode the whole string, the continuation is what follows the context's tokens)."""
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    n_context = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logprobs = model(torch.tensor([whole])).logits[0].log_softmax(-1)
    return sum(logprobs[pos - 1, whole[pos]].item() for pos in range(n_context, len(whole)))


def write_tasks(folder, model_dir) -> dict:
    """Two tasks over the same questions: gold = the model's favourite choice ("favourite"), and its
    least favourite ("least"). Returns the expected acc_norm of each (lm-eval divides by choice length)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # Words that are one token after a space, so no choice wins just by having fewer tokens.
    choices = sorted(t[1:] for t in tokenizer.get_vocab() if t.startswith("\u0120") and t[1:].isalpha())[:4]
    folder.mkdir()
    rows = {"favourite": [], "least": []}
    norm_hits = {"favourite": 0, "least": 0}
    for query in QUERIES:
        scores = np.array([continuation_logprob(model, tokenizer, query, " " + c) for c in choices])
        norm_pick = int(np.argmax(scores / np.array([len(c) for c in choices])))
        for name, gold in (("favourite", int(scores.argmax())), ("least", int(scores.argmin()))):
            rows[name].append({"query": query, "choices": choices, "gold": gold})
            norm_hits[name] += norm_pick == gold
    assert len({r["gold"] for r in rows["favourite"]}) > 1  # the answers really depend on the question
    for name, task_rows in rows.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in task_rows))
    return {name: hits / len(QUERIES) for name, hits in norm_hits.items()}


def test_lm_eval_runs_local_tasks_on_the_tiny_model(opinionated_model_dir, tmp_path, monkeypatch, capfd):
    expected_norm = write_tasks(tmp_path / "tasks", opinionated_model_dir)
    monkeypatch.chdir(tmp_path)  # outside any git repository: lm-eval's git probe must stay quiet
    result = run_harness(
        str(opinionated_model_dir), ["favourite", "least"], local_tasks_dir=tmp_path / "tasks", batch_size=4
    )
    assert "not a git repository" not in capfd.readouterr().err
    favourite, least = result["tasks"]["favourite"], result["tasks"]["least"]
    assert (favourite["acc"], least["acc"]) == (1.0, 0.0)
    assert (favourite["acc_norm"], least["acc_norm"]) == pytest.approx(
        (expected_norm["favourite"], expected_norm["least"])
    )
    assert result["average_acc"] == pytest.approx(0.5)
    assert result["average_acc_norm"] == pytest.approx((favourite["acc_norm"] + least["acc_norm"]) / 2)
    assert favourite["acc_stderr"] == 0.0 and least["acc_norm_stderr"] is not None
    assert result["config"]["num_fewshot"] == 0 and result["config"]["seed"] == 42


def test_lm_eval_applies_a_lora_adapter_folder(opinionated_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    lora = get_peft_model(
        AutoModelForCausalLM.from_pretrained(opinionated_model_dir),
        LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    lora.save_pretrained(tmp_path / "adapter")
    merged = tmp_path / "merged"
    lora.merge_and_unload().save_pretrained(merged)
    AutoTokenizer.from_pretrained(opinionated_model_dir).save_pretrained(merged)
    write_tasks(tmp_path / "tasks", merged)  # gold answers follow the *adapted* model
    result = run_harness(tmp_path / "adapter", ["favourite", "least"], local_tasks_dir=tmp_path / "tasks", batch_size=4)
    assert (result["tasks"]["favourite"]["acc"], result["tasks"]["least"]["acc"]) == (1.0, 0.0)
    assert f"peft={(tmp_path / 'adapter').resolve()}" in result["config"]["model_args"]
    base = run_harness(opinionated_model_dir, ["favourite"], local_tasks_dir=tmp_path / "tasks", batch_size=4)
    assert base["tasks"]["favourite"]["acc"] < 1.0  # without the adapter the answers differ


@pytest.mark.slow  # indexing lm-eval's ~15k built-in task configs takes ~20 s on 2 cores
def test_unknown_task_names_fail_before_running_with_close_matches(tiny_model_dir):
    with pytest.raises(ValueError, match=r"unknown lm-eval task\(s\): 'arc_easyy' \(close matches: arc_easy"):
        run_harness(str(tiny_model_dir), ["arc_easy", "arc_easyy"])


def test_local_task_yamls(tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "toy.jsonl").write_text(json.dumps({"query": "Q?", "choices": ["a", "b"], "gold": 1}) + "\n")
    include = tmp_path / "include"
    include.mkdir()
    assert write_local_task_yamls(tasks, include) == ["toy"]
    config = yaml.safe_load((include / "toy.yaml").read_text())
    assert config["task"] == "toy" and config["output_type"] == "multiple_choice"
    assert config["dataset_path"] == "json"
    data_file = config["dataset_kwargs"]["data_files"]["test"]
    assert data_file == str((tasks / "toy.jsonl").resolve()) and data_file.startswith("/")


@pytest.mark.parametrize(
    "row, message",
    [
        ({"query": "Q?", "choices": ["a", "b"], "gold": 2}, "'gold' must be an integer index"),
        ({"query": "Q?", "choices": ["a"], "gold": 0}, "'choices' must be a list of at least two strings"),
        ({"question": "Q?", "choices": ["a", "b"], "gold": 0}, "'query' must be a string"),
    ],
)
def test_bad_local_task_rows_are_named(tmp_path, row, message):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    good = {"query": "Q?", "choices": ["a", "b"], "gold": 0}
    (tasks / "toy.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=rf"toy.jsonl: line 2: {message}"):
        write_local_task_yamls(tasks, tmp_path)


def test_model_args_for_full_and_adapter_folders(tiny_model_dir, tmp_path):
    assert _model_args(tiny_model_dir, "float32") == f"pretrained={tiny_model_dir.resolve()},dtype=float32"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_model_dir)}))
    assert _model_args(adapter, "auto") == f"pretrained={tiny_model_dir},peft={adapter.resolve()},dtype=auto"


def test_model_args_for_gguf_files(tmp_path):
    """lm-eval's HFLM takes a GGUF file as its folder plus gguf_file= (it dequantizes, as from_pretrained does)."""
    gguf = tmp_path / "m.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    assert _model_args(gguf, "float32") == f"pretrained={tmp_path.resolve()},gguf_file=m.Q4_1.gguf,dtype=float32"
    hub = "owner/repo/sub/m.Q8_0.gguf"
    assert _model_args(hub, "auto") == "pretrained=owner/repo,gguf_file=sub/m.Q8_0.gguf,dtype=auto"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(gguf)}))
    assert _model_args(adapter, "auto") == (
        f"pretrained={tmp_path.resolve()},gguf_file=m.Q4_1.gguf,peft={adapter.resolve()},dtype=auto"
    )


def test_missing_model_folder_fails_before_lm_eval(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        run_harness(tmp_path / "nope", ["arc_easy"])
