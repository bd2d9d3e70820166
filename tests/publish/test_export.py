"""Run outputs: the final model at the top of a folder, LoRA merging, HF trainer_state.json, model card, Hub push.

The push goes to a real HTTP server on loopback that speaks the parts of the Hub protocol an
upload uses (repo creation, preupload, the LFS batch API, LFS PUT and verify, the commit
endpoint) and records every request, so the test sees exactly what would reach the Hub.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerState
from transformers.modelcard import parse_log_history

from mmpo.config import TrainConfig, resolve, to_dict
from mmpo.publish.export import (
    ExportError,
    copy_final_model,
    files_to_upload,
    merge_lora,
    model_kind,
    push_to_hub,
    save_final_model,
)
from mmpo.publish.model_card import build_model_card, invocation, write_model_card
from mmpo.publish.trainer_state import hf_trainer_state, write_trainer_state
from mmpo.training import train
from mmpo.world import bundled_path

WORLD = str(bundled_path("sft_model"))


def safetensors_keys(folder: Path) -> set[str]:
    keys = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            keys |= set(handle.keys())
    return keys


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture()
def world_tokenizer():
    return AutoTokenizer.from_pretrained(WORLD)


# --------------------------------------------------------------------------------------------
# The final model at the top of output_dir


def test_save_final_model_is_what_automodel_loads(tmp_path, world_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(WORLD, dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1.5)  # a "trained" model, not the base
    run = tmp_path / "run"
    run.mkdir()
    # Leftovers of an earlier adapter save would make transformers load the folder as an adapter.
    (run / "adapter_config.json").write_text("{}")
    (run / "adapter_model.safetensors").write_bytes(b"stale")
    save_final_model(model, world_tokenizer, run)

    assert model_kind(run) == "model" and not (run / "adapter_config.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(run)
    ids = torch.tensor([world_tokenizer("Repeat the word kelto.")["input_ids"]])
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    tokenizer = AutoTokenizer.from_pretrained(run)
    assert tokenizer.chat_template == world_tokenizer.chat_template


def test_save_final_model_writes_a_lora_adapter_and_copy_publishes_it(tmp_path, world_tokenizer):
    from peft import LoraConfig, PeftModel, get_peft_model

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(WORLD), LoraConfig(r=4, target_modules=["q_proj"]))
    checkpoint_model = tmp_path / "checkpoints" / "epoch-1" / "model"
    save_final_model(model, world_tokenizer, checkpoint_model)
    assert model_kind(checkpoint_model) == "adapter"

    run = tmp_path / "run"
    run.mkdir()
    (run / "model-00001-of-00002.safetensors").write_bytes(b"stale shard of an earlier full save")
    copy_final_model(checkpoint_model, run)
    assert not (run / "model-00001-of-00002.safetensors").exists()
    for path in checkpoint_model.iterdir():
        assert (run / path.name).read_bytes() == path.read_bytes(), path.name
    assert not list(run.glob(".*"))  # no temporary files left
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(WORLD), run)
    assert adapter.peft_config["default"].r == 4
    with pytest.raises(ExportError, match="holds no model"):
        copy_final_model(tmp_path / "checkpoints", run)


# --------------------------------------------------------------------------------------------
# Merging a LoRA adapter into a plain model


@pytest.fixture()
def lora_adapter(tmp_path, world_tokenizer):
    """A LoRA adapter on the world model whose update is not zero (as after training)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(WORLD, dtype=torch.float32),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    folder = tmp_path / "adapter"
    model.save_pretrained(folder)
    world_tokenizer.save_pretrained(folder)
    return folder, model.eval()


def test_merge_lora_writes_a_plain_model_with_the_adapters_outputs(tmp_path, lora_adapter, world_tokenizer):
    adapter_dir, peft_model = lora_adapter
    out = merge_lora(adapter_dir, tmp_path / "merged")

    assert model_kind(out) == "model" and not (out / "adapter_config.json").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and "peft" not in json.dumps(config).lower()
    # Exactly the base architecture's tensor names (what vLLM and transformers map), no PEFT ones.
    base_keys = safetensors_keys(Path(WORLD))
    assert safetensors_keys(out) == base_keys
    merged = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([world_tokenizer("What is the plural of kelto?")["input_ids"]])
    want = logits(peft_model, ids)
    assert torch.allclose(logits(merged, ids), want, atol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(WORLD)
    assert (logits(base, ids) - want).abs().max() > 1e-3  # the adapter changed the model: the check can fail
    assert AutoTokenizer.from_pretrained(out).chat_template == world_tokenizer.chat_template


def test_merge_lora_dtype_and_bad_inputs(tmp_path, lora_adapter):
    adapter_dir, _ = lora_adapter
    out = merge_lora(adapter_dir, tmp_path / "merged-bf16", dtype="bfloat16")
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        assert handle.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.bfloat16
    with pytest.raises(ExportError, match="not a LoRA adapter folder"):
        merge_lora(WORLD, tmp_path / "x")
    with pytest.raises(ExportError, match="must differ"):
        merge_lora(adapter_dir, adapter_dir)
    with pytest.raises(ExportError, match="dtype must be one of"):
        merge_lora(adapter_dir, tmp_path / "y", dtype="int8")
    with pytest.raises(ExportError, match="cannot load the base model"):
        merge_lora(adapter_dir, tmp_path / "z", base_model=str(tmp_path / "missing-base"))


# --------------------------------------------------------------------------------------------
# trainer_state.json in HF Trainer's layout, from a real run's metrics


def test_trainer_state_and_final_model_of_a_real_run(tmp_path, tiny_model_dir, prefs):
    train_file, test_file = prefs
    cfg = TrainConfig(
        model=str(tiny_model_dir),
        dataset=(train_file,),
        eval_dataset=(test_file,),
        eval_steps=2,
        output_dir=str(tmp_path / "run"),
        per_device_batch_size=4,
        gradient_accumulation_steps=2,
        epochs=2,
        learning_rate=1e-3,
        progress=False,
        cache_dir=str(tmp_path / "cache"),
        logging_steps=1,
    )
    result = train(cfg)
    records = [*result.metrics, {"step": 3, "event": "nonfinite_step_skipped", "example_ids": ["a"]}]
    state = hf_trainer_state(
        records,
        global_step=result.global_step,
        steps_per_epoch=4,
        total_steps=8,
        per_device_batch_size=4,
        logging_steps=1,
        eval_steps=2,
        save_steps=0,
        checkpoint_of_step={4: "checkpoints/epoch-1", 8: "checkpoints/epoch-2"},
        train_runtime=12.5,
        global_batch_size=8,
    )
    path = write_trainer_state(tmp_path / "trainer_state.json", state)

    loaded = TrainerState.load_from_json(str(path))
    assert (loaded.global_step, loaded.max_steps, loaded.epoch, loaded.num_train_epochs) == (8, 8, 2.0, 2)
    assert (loaded.train_batch_size, loaded.logging_steps, loaded.eval_steps, loaded.save_steps) == (4, 1, 2, 4)
    history = loaded.log_history
    assert history[:-1] == [r for r in result.metrics]  # every metrics record, in order; the event is left out
    evals = [r for r in result.metrics if "eval_loss" in r and r["step"] > 0]
    best = min(evals, key=lambda r: r["eval_loss"])
    assert (loaded.best_metric, loaded.best_global_step) == (best["eval_loss"], best["step"])
    assert loaded.best_model_checkpoint == {4: "checkpoints/epoch-1", 8: "checkpoints/epoch-2"}.get(best["step"])
    losses = [r["loss"] for r in result.metrics if "loss" in r and "eval_loss" not in r]
    assert history[-1]["train_loss"] == pytest.approx(sum(losses) / len(losses))  # logging_steps=1: one per step
    assert history[-1]["train_runtime"] == 12.5 and history[-1]["train_samples_per_second"] == 8 * 8 / 12.5

    # transformers' own reader of a Trainer history (used for its model cards) understands it.
    train_log, lines, eval_results = parse_log_history(history)
    assert train_log["train_runtime"] == 12.5
    assert [line["Step"] for line in lines] == [r["step"] for r in result.metrics if "eval_loss" in r]
    assert eval_results["Loss"] == evals[-1]["eval_loss"]

    # The wiring the engine uses at the end of a run: its last checkpoint's model published at the top.
    from mmpo.training.checkpoint import list_checkpoints

    run = Path(result.output_dir)
    copy_final_model(list_checkpoints(run)[-1] / "model", run)
    write_model_card(run, to_dict(resolve(cfg)), metrics=result.summary)
    loaded_model = AutoModelForCausalLM.from_pretrained(run)
    trained = AutoModelForCausalLM.from_pretrained(list_checkpoints(run)[-1] / "model")
    assert all(torch.equal(a, b) for a, b in zip(loaded_model.state_dict().values(), trained.state_dict().values()))
    uploaded = files_to_upload(run)
    assert {"README.md", "config.json", "model.safetensors", "config.yaml", "metrics.jsonl", "summary.json"} <= set(
        uploaded
    )
    assert not [p for p in uploaded if p.startswith("checkpoints/")]

    # A checkpoint's state holds its own history only.
    early = hf_trainer_state(
        result.metrics, global_step=4, steps_per_epoch=4, total_steps=8, per_device_batch_size=4, logging_steps=1
    )
    assert max(e["step"] for e in early["log_history"]) == 4 and early["epoch"] == 1.0


# --------------------------------------------------------------------------------------------
# Model card


def test_model_card_names_base_objective_data_metrics_and_command(tmp_path):
    cfg = resolve(
        TrainConfig(
            model="HuggingFaceTB/SmolLM2-135M-Instruct",
            objective="mmpo",
            aux_loss=False,
            dataset=("HuggingFaceH4/orca_dpo_pairs:train@0.5", str(bundled_path("data/prefs_train.jsonl"))),
            lora=True,
            lora_r=16,
        )
    )
    path = write_model_card(
        tmp_path,
        to_dict(cfg),
        adapter=True,
        command="mmpo train --objective mmpo --lora",
        metrics={"eval_rewards/accuracies": 0.9771, "eval_loss": 0.5, "curve": [1.0, 0.5]},
    )
    card = ModelCard.load(path)
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.datasets == ["HuggingFaceH4/orca_dpo_pairs"]  # Hub ids only in the metadata
    assert card.data.library_name == "peft" and "mmpo" in card.data.tags
    text = card.text
    for needle in (
        "| `beta` | 0.01 |",
        "| `aux_loss` | False |",
        "| `chosen_reward` | 0.9 |",
        "| `lora_r` | 16 |",
        "| `eval_rewards/accuracies` | 0.9771 |",
        "mmpo train --objective mmpo --lora",
        "`data/prefs_train.jsonl` of mmpo's bundled offline world",
        "(split `train`, weight 0.5)",
        "arXiv:2510.22881",
    ):
        assert needle in text, needle
    assert "`curve`" not in text  # not a number

    # A local base model is described in the text but kept out of the Hub metadata.
    local = build_model_card(to_dict(resolve(TrainConfig(objective="dpo"))), merged=True)
    assert local.data.base_model is None and local.data.library_name == "transformers"
    assert "bundled offline world" in local.text and "| `beta` | 0.1 |" in local.text
    assert "mmpo train --config config.yaml" in local.text


def test_invocation_is_the_command_line_as_typed(monkeypatch):
    monkeypatch.setattr("sys.argv", ["/usr/local/bin/mmpo", "train", "--dataset", "my data.jsonl", "--beta", "0.02"])
    assert invocation() == "mmpo train --dataset 'my data.jsonl' --beta 0.02"


# --------------------------------------------------------------------------------------------
# Push to the Hub, against a loopback server that records the upload


class RecordingHub(BaseHTTPRequestHandler):
    """The Hub endpoints an upload uses; every request is appended to ``server.requests``."""

    def log_message(self, *args):  # keep the test output clean
        pass

    def _reply(self, status: int, payload) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        hub, path = self.server, self.path.split("?")[0]
        hub.requests.append((self.command, path, dict(self.headers), body))
        base = f"http://127.0.0.1:{hub.server_port}"
        if self.command == "POST" and path == "/api/repos/create":
            request = json.loads(body)
            return self._reply(200, {"url": f"{base}/{request['organization']}/{request['name']}"})
        if self.command == "POST" and path == "/api/validate-yaml":  # the model card's metadata, before the upload
            return self._reply(200, {"errors": [], "warnings": []})
        if self.command == "POST" and "/preupload/" in path:
            files = json.loads(body)["files"]
            modes = [
                {
                    "path": f["path"],
                    "uploadMode": "lfs" if f["path"].endswith(".safetensors") else "regular",
                    "shouldIgnore": False,
                }
                for f in files
            ]
            return self._reply(200, {"files": modes})
        if self.command == "POST" and path.endswith(".git/info/lfs/objects/batch"):
            objects = [
                {
                    "oid": o["oid"],
                    "size": o["size"],
                    "actions": {"upload": {"href": f"{base}/lfs/{o['oid']}"}, "verify": {"href": f"{base}/verify"}},
                }
                for o in json.loads(body)["objects"]
            ]
            return self._reply(200, {"transfer": "basic", "objects": objects})
        if self.command == "PUT" and path.startswith("/lfs/"):
            hub.lfs[path.rsplit("/", 1)[1]] = body
            return self._reply(200, {})
        if self.command == "POST" and path == "/verify":
            return self._reply(200, {})
        if self.command == "POST" and "/commit/" in path:
            hub.commits.append([json.loads(line) for line in body.decode().splitlines()])
            repo = path.removeprefix("/api/models/").split("/commit/")[0]
            return self._reply(
                200, {"commitUrl": f"{base}/{repo}/commit/{'a' * 40}", "commitOid": "a" * 40, "pullRequestUrl": None}
            )
        return self._reply(404, {"error": f"not served by the test hub: {self.command} {path}"})

    do_GET = do_POST = do_PUT = _handle


@pytest.fixture()
def hub(monkeypatch):
    from huggingface_hub import constants

    server = ThreadingHTTPServer(("127.0.0.1", 0), RecordingHub)
    server.requests, server.commits, server.lfs = [], [], {}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    # The suite runs offline; this test's network is the loopback server. Xet (huggingface_hub's
    # default transfer, a binary protocol to its own storage) is off, so large files take the LFS path.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    yield server, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join()


@pytest.fixture()
def finished_run(tmp_path, world_tokenizer):
    """A run folder as the engine leaves it: final model, card and state on top, plus checkpoints and leftovers."""
    run = tmp_path / "run"
    save_final_model(AutoModelForCausalLM.from_pretrained(WORLD), world_tokenizer, run)
    write_model_card(run, to_dict(resolve(TrainConfig())), metrics={"eval_loss": 0.4})
    write_trainer_state(
        run / "trainer_state.json",
        hf_trainer_state(
            [{"step": 1, "epoch": 1.0, "loss": 0.5}],
            global_step=1,
            steps_per_epoch=1,
            total_steps=1,
            per_device_batch_size=8,
            logging_steps=1,
        ),
    )
    (run / "metrics.jsonl").write_text('{"step": 1, "epoch": 1.0, "loss": 0.5}\n')
    save_final_model(AutoModelForCausalLM.from_pretrained(WORLD), world_tokenizer, run / "checkpoints/epoch-1/model")
    (run / "checkpoints/epoch-1/state").mkdir()
    (run / "checkpoints/epoch-1/state/optimizer.bin").write_bytes(b"optimizer state")
    (run / ".metrics.jsonl.tmp123").write_text("torn")
    return run


def test_push_to_hub_uploads_the_model_folder_without_checkpoints(tmp_path, hub, finished_run):
    server, endpoint = hub
    info = push_to_hub(
        finished_run,
        "someone/mmpo-world",
        token="hf_test_token",
        private=True,
        endpoint=endpoint,
        commit_message="first upload",
    )
    assert info.oid == "a" * 40

    creates = [json.loads(body) for method, path, _, body in server.requests if path == "/api/repos/create"]
    assert creates == [{"name": "mmpo-world", "organization": "someone", "visibility": "private", "type": "model"}]
    assert all(
        headers.get("authorization") == "Bearer hf_test_token"
        for method, path, headers, _ in server.requests
        if path.startswith("/api/")
    )
    validated = [json.loads(body) for method, path, _, body in server.requests if path == "/api/validate-yaml"]
    assert validated and all(
        v == {"content": (finished_run / "README.md").read_text(), "repoType": "model"} for v in validated
    )
    assert not [
        r
        for r in server.requests
        if r[1].startswith("/api/")
        and "/someone/mmpo-world" not in r[1]
        and r[1] not in ("/api/repos/create", "/api/validate-yaml")
    ]

    (commit,) = server.commits
    assert commit[0] == {"key": "header", "value": {"summary": "first upload", "description": ""}}
    uploaded = {}
    for op in commit[1:]:
        if op["key"] == "file":
            uploaded[op["value"]["path"]] = base64.b64decode(op["value"]["content"])
        else:
            assert op["key"] == "lfsFile"
            uploaded[op["value"]["path"]] = server.lfs[op["value"]["oid"]]
            assert hashlib.sha256(uploaded[op["value"]["path"]]).hexdigest() == op["value"]["oid"]
    assert sorted(uploaded) == files_to_upload(finished_run)
    lfs_paths = {op["value"]["path"] for op in commit[1:] if op["key"] == "lfsFile"}
    assert lfs_paths == {"model.safetensors"}  # the weights went by the LFS transfer, as the server asked
    assert "model.safetensors" in uploaded and "README.md" in uploaded and "trainer_state.json" in uploaded
    assert not [p for p in uploaded if p.startswith(("checkpoints/", "."))]
    for rel, content in uploaded.items():
        assert content == (finished_run / rel).read_bytes(), rel

    # What reached the server is a loadable model.
    mirror = tmp_path / "mirror"
    for rel, content in uploaded.items():
        (mirror / rel).parent.mkdir(parents=True, exist_ok=True)
        (mirror / rel).write_bytes(content)
    AutoModelForCausalLM.from_pretrained(mirror)


def test_push_to_hub_checks_before_any_request(tmp_path, hub, finished_run, monkeypatch):
    server, endpoint = hub
    with pytest.raises(ExportError, match="is not a Hub repo id"):
        push_to_hub(finished_run, "not a repo id!", endpoint=endpoint)
    with pytest.raises(ExportError, match="holds no model"):
        push_to_hub(tmp_path, "someone/x", endpoint=endpoint)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ExportError, match="HF_HUB_OFFLINE"):
        push_to_hub(finished_run, "someone/x", endpoint=endpoint)
    assert server.requests == []


def test_mmpo_export_merges_a_lora_run_from_the_command_line(tmp_path):
    """`mmpo export RUN --merge-lora`: a LoRA run's final adapter becomes a plain model with a card."""
    import subprocess
    import sys

    from helpers import write_prefs

    data = write_prefs(tmp_path / "p.jsonl", 8)
    cfg = TrainConfig(
        dataset=(str(data),),
        eval_dataset=(),
        output_dir=str(tmp_path / "run"),
        lora=True,
        lora_r=4,
        per_device_batch_size=4,
        max_steps=1,
        progress=False,
        cache_dir=str(tmp_path / "c"),
    )
    train(cfg)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mmpo.cli",
            "export",
            str(tmp_path / "run"),
            "--merge-lora",
            "--out",
            str(tmp_path / "merged"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert "lora" in (tmp_path / "merged" / "README.md").read_text().lower()
    nothing = subprocess.run(
        [sys.executable, "-m", "mmpo.cli", "export", str(tmp_path / "run")], capture_output=True, text=True, timeout=120
    )
    assert nothing.returncode == 2 and "nothing to do" in nothing.stderr
