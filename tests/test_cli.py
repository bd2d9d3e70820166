"""The `mmpo` command line: one parser style for every command, --config everywhere, flags with
dashes or underscores, sections in the training help, a fast top-level help, plain-text console
output, and every command written in the README and docs parses."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmpo.cli import COMMANDS, main, parse
from mmpo.config import ConfigError, SFTConfig, TrainConfig
from mmpo.help_sections import OTHER_SECTION, section_of

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


# ------------------------------------------------------------------------------- top level


def test_help_and_version_import_no_torch_and_answer_within_a_second():
    probe = (
        "import sys, time; t = time.perf_counter(); from mmpo.cli import main; main([{arg!r}]); "
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'datasets'));"
        "print('HEAVY', heavy)"
    )
    for arg in ("--help", "--version"):
        out = subprocess.run([sys.executable, "-c", probe.format(arg=arg)], capture_output=True, text=True, check=True)
        assert "HEAVY []" in out.stdout, out.stdout[-500:]
    assert (
        "mmpo 0.1.0"
        in subprocess.run(
            [sys.executable, "-m", "mmpo.cli", "--version"], capture_output=True, text=True, check=True
        ).stdout
    )
    # Wall time of the whole process, best of three (the machine may be shared).
    walls = []
    for _ in range(3):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "mmpo.cli", "--help"], capture_output=True, check=True)
        walls.append(time.perf_counter() - started)
    assert min(walls) < 1.0, walls


def test_top_level_help_lists_every_command_and_an_unknown_one_is_refused(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert f"  {name} " in out
    assert "bench" not in COMMANDS and "--version" in out
    assert main(["bench", "vs-trl"]) == 2
    assert "unknown command 'bench vs-trl'" in capsys.readouterr().err


# ------------------------------------------------------------------------------- parsing


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "plain, dashes, underscores",
    [
        (
            ["train"],
            ["--per-device-batch-size", "3", "--no-aux-loss", "--lora-target-modules", "q_proj", "v_proj"],
            ["--per_device_batch_size", "3", "--no_aux_loss", "--lora_target_modules", "q_proj", "v_proj"],
        ),
        (
            ["sft"],
            ["--max-length", "12", "--gradient-accumulation-steps", "2", "--no-progress"],
            ["--max_length", "12", "--gradient_accumulation_steps", "2", "--no_progress"],
        ),
        (
            ["eval", "ckpt"],
            ["--max-new-tokens", "5", "--local-tasks-dir", "None", "--no-harness-chat-template"],
            ["--max_new_tokens", "5", "--local_tasks_dir", "None", "--no_harness_chat_template"],
        ),
        (["sweep"], ["--dry-run"], ["--dry_run"]),
    ],
)
def test_flags_with_underscores_parse_as_with_dashes(plain, dashes, underscores):
    with_dashes, with_underscores = parse(plain + dashes).args, parse(plain + underscores).args
    assert with_dashes == with_underscores
    assert with_dashes != parse(plain).args  # the flags did something


def test_training_flags_land_in_the_config_dataclass():
    cfg = parse(
        ["train", "--objective", "dpo", "--beta", "0.2", "--no_aux_loss", "--lora-target-modules", "q_proj"]
    ).args
    assert isinstance(cfg, TrainConfig)
    assert (cfg.objective, cfg.beta, cfg.aux_loss, cfg.lora_target_modules) == ("dpo", 0.2, False, ("q_proj",))
    assert (
        dataclasses.replace(
            cfg, objective="mmpo", beta=None, aux_loss=True, lora_target_modules=TrainConfig().lora_target_modules
        )
        == TrainConfig()
    )
    assert isinstance(parse(["sft"]).args, SFTConfig) and parse(["sft"]).args == SFTConfig()


@pytest.mark.parametrize(
    "name, yaml_text, flags, expected",
    [
        (
            "train",
            "objective: dpo\nper_device_batch_size: 4\ndataset: [a.jsonl]\n",
            ["--per-device-batch-size", "3"],
            {"objective": "dpo", "per_device_batch_size": 3, "dataset": ("a.jsonl",)},
        ),
        ("sft", "max_length: 64\nepochs: 2\n", ["--epochs", "5"], {"max_length": 64, "epochs": 5}),
        (
            "eval",
            "checkpoint: runs/x\nmax_new_tokens: 7\njudge: [programmatic, 'openai:m']\n",
            ["--max-new-tokens", "9"],
            {"checkpoint": "runs/x", "max_new_tokens": 9, "judge": ("programmatic", "openai:m")},
        ),
        ("eval", "checkpoint: runs/x\n", ["runs/y"], {"checkpoint": "runs/y"}),
        ("world build", "seed: 3\nout: /tmp/w\n", ["--seed", "4"], {"seed": 4, "out": "/tmp/w"}),
        (
            "sweep run-one",
            "sweep_dir: runs/s\n",
            ["--name", "r1"],
            {"sweep_dir": "runs/s", "name": "r1", "index": None},
        ),
        (
            "report",
            "sweep_dir: runs/s\nout: o\n",
            ["--command", "c"],
            {"sweep_dir": "runs/s", "out": "o", "command": "c"},
        ),
    ],
)
def test_every_command_takes_a_config_file_and_flags_override_it(tmp_path, name, yaml_text, flags, expected):
    config = write(tmp_path / "c.yaml", yaml_text)
    args = parse([*name.split(), "--config", config, *flags]).args
    assert {key: getattr(args, key) for key in expected} == expected


def test_a_sweep_takes_its_spec_as_config(tmp_path, capsys):
    args = parse(
        ["sweep", "--config", "spec.yaml", "--set", "epochs=1", "--set", "seed=2", "--grid", "beta=[1,2]"]
    ).args
    assert (args.config, args.set, args.grid) == ("spec.yaml", ("epochs=1", "seed=2"), ("beta=[1,2]",))
    bad = write(tmp_path / "bad.yaml", "experiments: [{objective: ppo}]\n")
    assert main(["sweep", "plan", "--config", bad, "--out", str(tmp_path / "s")]) == 2
    assert "unknown objective 'ppo'" in capsys.readouterr().err and not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    "command, yaml_text, message",
    [
        ("eval", "max_new_tokens: many\n", "config key 'max_new_tokens': must be an integer"),
        ("eval", "max_new_token: 3\n", "unknown config key 'max_new_token'; did you mean 'max_new_tokens'"),
        ("eval", "config: other.yaml\n", "cannot name another config file"),
        ("train", "max_prompt_length: long\n", "config key 'max_prompt_length': must be an integer"),
        ("train", "aux_loss: 'no'\n", "config key 'aux_loss': must be true or false"),
        ("world build", "seed: [1]\n", "config key 'seed': must be an integer"),
        ("report", "sweep_dir: 3\n", "config key 'sweep_dir': must be a string"),
    ],
)
def test_bad_config_file_values_are_named(tmp_path, command, yaml_text, message):
    config = write(tmp_path / "c.yaml", yaml_text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse([*command.split(), "--config", config])


def test_run_one_needs_exactly_one_target():
    with pytest.raises(SystemExit) as exit_:
        parse(["sweep", "run-one", "d"])
    assert exit_.value.code == 2
    with pytest.raises(SystemExit):
        parse(["sweep", "run-one", "d", "--index", "1", "--name", "x"])


# ------------------------------------------------------------------------------- help


@pytest.mark.parametrize("config", [TrainConfig, SFTConfig])
def test_every_training_setting_has_a_help_section(config):
    unplaced = [f.name for f in dataclasses.fields(config) if section_of(f.name) == OTHER_SECTION]
    assert not unplaced, f"add these settings to mmpo.help_sections.SECTIONS: {unplaced}"


def test_train_help_is_in_sections(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")  # one column of sections
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    titles = [
        "model options",
        "data options",
        "objective options",
        "optimization options",
        "speed options",
        "logging options",
        "checkpoints options",
    ]
    positions = [out.index(t) for t in titles]
    assert positions == sorted(positions)
    where = {
        flag: out.index(f"--{flag} ")
        for flag in ("model", "dataset", "beta", "learning-rate", "packing,", "logging-steps", "resume,")
    }
    assert [where[f] for f in where] == sorted(where.values())  # each flag under its own section
    assert all(positions[i] < where[f] < (positions + [len(out)])[i + 1] for i, f in enumerate(where))
    assert "--no-aux-loss" in out and "--config" in out


# ------------------------------------------------------------------------------- console


@pytest.mark.parametrize("key", ["[bold red]x[/bold red]", ":train:", "[link=http://x]y"])
def test_console_prints_user_text_as_is(tmp_path, capsys, key):
    config = write(tmp_path / "c.yaml", f"{key!r}: 1\n".replace("'", '"'))
    assert main(["train", "--config", config]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"unknown config key '{key}'" in err and "error:" in err


def test_a_row_id_with_an_emoji_code_is_printed_as_is(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MMPO_CACHE", str(tmp_path / "cache"))
    bad = write(tmp_path / "prefs.jsonl", '{"prompt": "hi", "chosen": "a"}\n')  # row id prefs:train:0
    assert main(["train", "--dataset", bad, "--output-dir", str(tmp_path / "run"), "--no-progress"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "row 'prefs:train:0'" in err and "missing column(s) ['rejected']" in err and "--on-bad-rows skip" in err


# ------------------------------------------------------------------------------- README and docs


def shell_blocks(path: Path) -> list[str]:
    return re.findall(r"```(?:bash|sh|shell|console)\n(.*?)```", path.read_text(), re.DOTALL)


def shell_commands(block: str) -> list[list[str]]:
    """Simple commands of a shell block, as bash splits them (a backslash continues a line only
    when the newline follows it at once; a comment ends the command)."""
    commands = []
    for line in block.replace("\\\n", "").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        current: list[str] = []
        for token in [*lexer, ";"]:
            if token in (";", "&&", "||", "|", "&"):
                if current:
                    commands.append(current)
                current = []
            else:
                current.append(token)
    return commands


def mmpo_arguments(command: list[str]) -> list[str] | None:
    """The arguments of an `mmpo` call (also `exec mmpo`, `python -m mmpo.cli`, `accelerate launch ... -m mmpo.cli`)."""
    words = [w for w in command if not re.fullmatch(r"[A-Z_]+=.*", w)]  # environment assignments
    words = words[1:] if words[:1] == ["exec"] else words
    if words[:1] == ["mmpo"]:
        return words[1:]
    if "mmpo.cli" in words:
        return words[words.index("mmpo.cli") + 1 :]
    return None


DOC_BLOCKS = [(path, block) for path in DOCS for block in shell_blocks(path)]
DOC_CALLS = [
    (path, command)
    for path, block in DOC_BLOCKS
    for command in shell_commands(block)
    if mmpo_arguments(command) is not None
]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("path, block", DOC_BLOCKS, ids=lambda x: x.name if isinstance(x, Path) else "")
def test_doc_shell_blocks_are_valid_bash_whose_commands_start_with_a_program(path, block):
    subprocess.run(["bash", "-n"], input=block, text=True, check=True)
    for command in shell_commands(block):
        assert not command[0].startswith("-"), f"{path.name}: a line continues a broken command: {command}"


def test_the_readme_has_mmpo_commands_to_check():
    assert sum(p.name == "README.md" for p, _ in DOC_CALLS) >= 3


@pytest.mark.parametrize("path, command", DOC_CALLS, ids=lambda x: x.name if isinstance(x, Path) else " ".join(x))
def test_doc_mmpo_commands_parse(path, command):
    args = mmpo_arguments(command)
    parse(args, read_config=False)  # a bad flag exits with status 2
    for i, word in enumerate(args[:-1]):
        if word == "--config" and args[i + 1].startswith("configs/"):
            assert (REPO / args[i + 1]).is_file(), args[i + 1]


def test_world_build_data_only_writes_the_data_files(tmp_path, capsys):
    assert main(["world", "build", "--data-only", "--out", str(tmp_path), "--seed", "1"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["data/prefs_train"] > 0
    for name, rows in counts.items():
        assert len((tmp_path / f"{name}.jsonl").read_text().splitlines()) == rows
    assert not (tmp_path / "sft_model").exists()  # no training


SCRIPTS = sorted([*(REPO / "examples").rglob("*.sh"), *(REPO / "examples").rglob("*.sbatch")])


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_example_scripts_are_valid_bash_and_their_mmpo_commands_parse(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    calls = [mmpo_arguments(c) for c in shell_commands(script.read_text())]
    calls = [[re.sub(r"\$\{?\w+\}?", "1", word) for word in c] for c in calls if c is not None]  # variables: 1
    assert calls
    for args in calls:
        parse(args, read_config=False)
