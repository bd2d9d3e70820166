"""The top-level error handler (``mmpo.errors.run_command``): each known failure, caused for real,
ends in one line naming it and a hint (exit 2); a bug in one line (exit 1); a traceback only with
``--debug``; SIGINT/SIGTERM outside training exit 130/143."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from rich.console import Console

from helpers import REPO, write_prefs
from mmpo.config import TrainConfig, from_dict, load_yaml
from mmpo.errors import run_command
from mmpo.training import train


def handled(command, argv=()) -> tuple[int, str]:
    """Exit code and what the user sees on stderr."""
    out = io.StringIO()
    code = run_command(lambda args: command(args) or 0, list(argv), console=Console(file=out, width=400))
    return code, out.getvalue()


def assert_one_clear_error(code: int, shown: str, *fragments: str, hint: str | None) -> None:
    lines = shown.strip().splitlines()
    assert code == 2, shown
    assert lines[0].startswith("error: ") and "Traceback" not in shown, shown
    for fragment in fragments:
        assert fragment in lines[0], (fragment, shown)
    if hint is None:
        assert len(lines) == 1, shown
    else:
        assert len(lines) == 2 and lines[1].startswith("hint: ") and hint in lines[1], shown


@pytest.fixture()
def config(tmp_path, tiny_model_dir):
    def make(**overrides) -> TrainConfig:
        data = tmp_path / "train.jsonl"
        if not data.exists():
            write_prefs(data, 16)
        values = dict(
            model=str(tiny_model_dir),
            dataset=(str(data),),
            eval_dataset=(),
            max_steps=1,
            output_dir=str(tmp_path / "run"),
            per_device_batch_size=4,
            progress=False,
            cache_dir=str(tmp_path / "cache"),
        )
        return TrainConfig(**{**values, **overrides})

    return make


def from_yaml(path):
    return lambda argv: from_dict(TrainConfig, load_yaml(path), source=str(path))


def test_broken_and_utf16_yaml(tmp_path):
    broken = tmp_path / "run.yaml"
    broken.write_text("objective: dpo\nbeta: [0.1\nepochs: 2\n")
    code, shown = handled(from_yaml(broken), ["--config", str(broken)])
    assert_one_clear_error(
        code, shown, f"{broken} is not valid YAML at line 3, column 7", hint="write one 'key: value' per line"
    )
    utf16 = tmp_path / "utf16.yaml"
    utf16.write_text("objective: dpo\n", encoding="utf-16")
    code, shown = handled(from_yaml(utf16), ["--config", str(utf16)])
    assert_one_clear_error(code, shown, f"{utf16} is not UTF-8 text (it is UTF-16)", hint="save it as UTF-8")


def test_dataset_errors_offer_skipping_only_for_rows(tmp_path, config):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, shown = handled(lambda argv: train(config(dataset=(str(empty),))))
    assert_one_clear_error(code, shown, "the folder holds no data files", hint=None)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n')
    code, shown = handled(lambda argv: train(config(dataset=(str(bad),))))
    assert_one_clear_error(
        code, shown, "line 1 is not valid UTF-8 (byte 0xe9 at column 16)", hint="pass --on-bad-rows skip"
    )


def test_missing_optional_package(config):
    assert __import__("importlib").util.find_spec("flash_attn") is None, "this test needs flash-attn absent"
    code, shown = handled(lambda argv: train(config(attn_implementation="flash_attention_2")))
    assert_one_clear_error(
        code,
        shown,
        "the settings need the package 'flash_attn', which is not installed",
        "--attn-implementation sdpa",
        hint=None,
    )

    from mmpo.modeling import load_model  # the library's own ImportError, were it to get that far

    code, shown = handled(lambda argv: load_model(config(attn_implementation="flash_attention_2")))
    assert_one_clear_error(code, shown, "missing optional package 'flash_attn'", hint="pip install flash-attn")


def test_bad_lora_target_is_refused_before_any_data_is_read(tmp_path, config):
    cfg = config(lora=True, lora_target_modules=("q_proj", "v_projj"), dataset=(str(tmp_path / "absent.jsonl"),))
    code, shown = handled(lambda argv: train(cfg))
    assert_one_clear_error(code, shown, "'v_projj' matches no layer of", "q_proj, up_proj, v_proj", hint=None)
    assert "absent.jsonl" not in shown  # the data was never looked at


def test_judge_without_key_or_endpoint(monkeypatch):
    from mmpo.evaluation.checkpoint_eval import parse_judge

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    code, shown = handled(lambda argv: parse_judge("openai:gpt-4o-mini").check_ready())
    assert_one_clear_error(
        code, shown, "needs an API key in the environment variable OPENAI_API_KEY", hint="export the variable"
    )

    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-key")
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{port}/v1")
    code, shown = handled(lambda argv: parse_judge("openai:gpt-4o-mini").judge("Say hi.", "hi", "hello"))
    assert_one_clear_error(
        code,
        shown,
        f"cannot reach the judge endpoint http://127.0.0.1:{port}",
        hint="check the network and the endpoint",
    )
    assert "sk-test" not in shown


def test_disk_full_deep_inside_another_library():
    def write_to_a_full_device(argv):
        with open("/dev/full", "w") as handle:  # every write: ENOSPC
            handle.write("x" * 10_000)

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    code, shown = handled(write_to_a_full_device)
    assert_one_clear_error(code, shown, "no space left on the device", hint="free some space")


def test_a_bug_is_one_line_and_the_traceback_needs_debug(capsys, config):
    code, shown = handled(lambda argv: 1 / 0)
    assert code == 1 and "Traceback" not in shown + capsys.readouterr().err
    assert shown.splitlines() == [
        "internal error: ZeroDivisionError: division by zero",
        "hint: rerun with --debug for the traceback, and please report it",
    ]
    code, shown = handled(lambda argv: 1 / 0, ["--debug"])
    assert code == 1 and "Traceback" in capsys.readouterr().err and "hint" not in shown
    code, shown = handled(lambda argv: train(config(beta=-1.0)), ["--debug"])
    assert code == 2 and "Traceback" in capsys.readouterr().err and shown.startswith("error: config key 'beta'")


SLEEPER = textwrap.dedent("""
    import sys, time
    from mmpo.errors import run_command

    def command(argv):
        print("ready", flush=True)
        time.sleep(120)

    sys.exit(run_command(command, []))
""")


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signals_outside_training_exit_130_and_143(signum, code):
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-c", SLEEPER],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        # A suite started in the background inherits SIGINT ignored, and Python keeps an inherited ignore.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.1)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err and "checkpoints written before are kept" in err
