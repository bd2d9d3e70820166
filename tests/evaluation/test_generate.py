"""Generation on the tiny Llama: chat template, left padding, stopping, LoRA folders, output files."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from mmpo.evaluation.generate import generate_outputs, load_instructions, write_model_outputs

INSTRUCTIONS = [
    "Repeat the word banop please.",
    "What is the first letter of zorbat?",
    "Hi",
    "Which word is longer, mipo or tuvalak? Think about it and answer.",
    "The quick brown fox",
]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # A tiny model's forward is all thread synchronisation: on a busy 2-core machine one thread
    # is several times faster than two.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def chatty_model(tiny_model_dir):
    """The tiny model with larger random weights, so greedy outputs are varied text rather than
    a single repeated token (which would make order and padding bugs invisible)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return model.eval()


def reference_tokens(model, tokenizer, instruction, max_new_tokens):
    """Greedy continuation of one unpadded chat prompt, by hand."""
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": instruction}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        for _ in range(max_new_tokens):
            next_id = model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    return ids[0, -max_new_tokens:].tolist()


def test_greedy_outputs_match_unbatched_decoding_and_are_deterministic(chatty_model, tokenizer):
    batched = generate_outputs(
        chatty_model, tokenizer, INSTRUCTIONS, generator_name="tiny", max_new_tokens=12, batch_size=3
    )
    single = generate_outputs(
        chatty_model, tokenizer, INSTRUCTIONS, generator_name="tiny", max_new_tokens=12, batch_size=1
    )
    assert batched == single  # left padding: a row's output does not depend on its batch mates
    assert [r["instruction"] for r in batched] == INSTRUCTIONS  # original order restored
    assert len({r["output"] for r in batched}) == len(INSTRUCTIONS)
    for record in batched[:2]:
        expected_ids = reference_tokens(chatty_model, tokenizer, record["instruction"], 12)
        expected = tokenizer.decode(expected_ids, skip_special_tokens=True)
        assert record["output"] == expected.strip()


def test_generation_stops_at_an_end_of_turn_token(chatty_model, tokenizer):
    full = reference_tokens(chatty_model, tokenizer, INSTRUCTIONS[0], 12)
    stop = full[4]  # pretend the fifth greedy token ends the turn
    original = chatty_model.generation_config.eos_token_id
    chatty_model.generation_config.eos_token_id = [tokenizer.eos_token_id, stop]
    try:
        records = generate_outputs(
            chatty_model, tokenizer, INSTRUCTIONS[:2], generator_name="tiny", max_new_tokens=12, batch_size=2
        )
    finally:
        chatty_model.generation_config.eos_token_id = original
    cut = full[: full.index(stop)]
    assert records[0]["output"] == tokenizer.decode(cut, skip_special_tokens=True).strip()


def test_sampling_is_seeded(chatty_model, tokenizer):
    kwargs = dict(generator_name="tiny", max_new_tokens=10, temperature=1.0, top_p=0.95, batch_size=2)
    a = generate_outputs(chatty_model, tokenizer, INSTRUCTIONS, seed=1, **kwargs)
    b = generate_outputs(chatty_model, tokenizer, INSTRUCTIONS, seed=1, **kwargs)
    c = generate_outputs(chatty_model, tokenizer, INSTRUCTIONS, seed=2, **kwargs)
    assert a == b and a != c


def test_model_folder_output_file_and_metadata(tiny_model_dir, tmp_path):
    rows = [{"instruction": "What is the first letter of zorbat?", "answer": "z", "output": "reference answer"}, "Hi"]
    records = generate_outputs(str(tiny_model_dir), None, rows, max_new_tokens=4, batch_size=2)
    assert records[0]["answer"] == "z"  # metadata passes through for programmatic judges
    assert records[0]["generator"] == tiny_model_dir.name
    assert records[0]["output"] != "reference answer"  # the prompt set's own answer is not ours
    path = write_model_outputs(records, tmp_path / "run")
    assert path == tmp_path / "run" / "model_outputs.json"
    written = json.loads(path.read_text())
    assert written == records
    assert all({"instruction", "output", "generator"} <= set(r) for r in written)


def test_lora_adapter_folder(tiny_model_dir, tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    lora = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    )
    lora.save_pretrained(tmp_path / "adapter")  # no tokenizer files: it comes from the base folder
    expected = generate_outputs(
        lora.merge_and_unload(), tokenizer, INSTRUCTIONS[:3], generator_name="x", max_new_tokens=6
    )
    from_folder = generate_outputs(
        str(tmp_path / "adapter"), None, INSTRUCTIONS[:3], generator_name="x", max_new_tokens=6
    )
    plain = generate_outputs(str(tiny_model_dir), None, INSTRUCTIONS[:3], generator_name="x", max_new_tokens=6)
    assert from_folder == expected
    assert from_folder != plain  # the adapter was applied


def test_bad_inputs_fail_clearly(chatty_model, tokenizer):
    with pytest.raises(ValueError, match="instruction 1 must be a non-empty string"):
        generate_outputs(chatty_model, tokenizer, ["ok", {"prompt": "no instruction key"}])
    with pytest.raises(ValueError, match="non-empty list"):
        generate_outputs(chatty_model, tokenizer, "a single string")
    with pytest.raises(ValueError, match="top_p"):
        generate_outputs(chatty_model, tokenizer, ["ok"], top_p=0.0)


def test_load_instructions_from_files(tmp_path):
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text(
        '{"instruction": "a", "dataset": "d1"}\n\n{"instruction": "b", "output": "ref", "generator": "gpt4"}\n'
    )
    assert load_instructions(jsonl) == [{"instruction": "a", "dataset": "d1"}, {"instruction": "b"}]
    as_json = tmp_path / "prompts.json"
    as_json.write_text(json.dumps([{"prompt": "x"}, "y"]))
    assert load_instructions(as_json, column="prompt") == [{"instruction": "x"}, {"instruction": "y"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a"}\n{"text": "b"}\n')
    with pytest.raises(ValueError, match="row 1 has no non-empty string 'instruction'.*text"):
        load_instructions(bad)
    with pytest.raises(FileNotFoundError):
        load_instructions(tmp_path / "missing.jsonl")


def test_alpaca_eval_offline_fails_clearly(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache: nothing to fall back on
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"AlpacaEval prompt set \(tatsu-lab/alpaca_eval.*needs network access"):
        load_instructions("tatsu-lab/alpaca_eval")
