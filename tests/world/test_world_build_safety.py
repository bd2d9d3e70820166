"""``mmpo world build`` never modifies the packaged world unless asked, and an interrupted build
(killed for real) leaves the old world whole: the new one is built aside and switched in one step."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from helpers import REPO, SMALL_WORLD
from mmpo.cli import WorldBuildArgs
from mmpo.commands import run_world_build
from mmpo.config import ConfigError
from mmpo.world import ASSETS
from mmpo.world.build import _exchange, build_world, switch_into_place
from mmpo.world.tasks import WorldSizes

SMALL = SMALL_WORLD


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_packaged_world_is_rebuilt_only_when_asked(tmp_path):
    before = snapshot(Path(ASSETS))
    for call in (
        lambda: build_world(),
        lambda: build_world(ASSETS),
        lambda: run_world_build(WorldBuildArgs()),
        lambda: run_world_build(WorldBuildArgs(data_only=True)),
    ):
        with pytest.raises(ConfigError, match="packaged world"):
            call()
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is not a world \\(no world.json\\)"):
        build_world(tmp_path)  # the switch replaces the whole folder: never one holding other files
    assert snapshot(Path(ASSETS)) == before


def old_world(folder: Path) -> dict[str, bytes]:
    for name, text in {
        "world.json": '{"old": true}',
        "sft_model/config.json": "{}",
        "data/sft_train.jsonl": "{}\n",
        "tokenizer/tokenizer.json": "{}",
    }.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return snapshot(folder)


BUILD = textwrap.dedent("""
    import sys
    from mmpo.world.build import build_world
    from mmpo.world.tasks import WorldSizes
    build_world(sys.argv[1], seed=5, sizes=WorldSizes(**{sizes}), sft_epochs=1, vocab_size=400)
""").replace("{sizes}", repr(SMALL))


def test_a_killed_build_leaves_the_old_world_whole_and_a_finished_one_replaces_it_at_once(tmp_path):
    out = tmp_path / "world"
    old = old_world(out)
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    build = subprocess.Popen(
        [sys.executable, "-c", BUILD, str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    # Kill it once the new data and tokenizer exist but the model does not (the mix the issue saw).
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob(".world.building-*/tokenizer/tokenizer.json")):
        assert build.poll() is None, build.stderr.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.005)
    time.sleep(random.uniform(0, 0.5))
    build.send_signal(signal.SIGKILL)
    build.wait()
    assert snapshot(out) == old  # untouched: no new data beside the old model

    info = build_world(out, seed=5, sizes=WorldSizes(**SMALL), sft_epochs=1, vocab_size=400)
    assert json.loads((out / "world.json").read_text()) == info
    assert (out / "sft_model" / "model.safetensors").is_file() and (out / "data" / "prefs_train.jsonl").is_file()
    assert (out / "tokenizer" / "tokenizer.json").read_bytes() != old["tokenizer/tokenizer.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["world"]  # the killed build's folder is gone too


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2(RENAME_EXCHANGE) is Linux's")
def test_on_linux_the_switch_swaps_both_folders_in_one_call(tmp_path):
    """One renameat2(RENAME_EXCHANGE) call: there is no moment without a world at ``out``."""
    new, out = tmp_path / "new", tmp_path / "out"
    for folder, text in ((new, "new"), (out, "old")):
        folder.mkdir()
        (folder / "world.json").write_text(text)
    assert _exchange(new, out)
    assert (out / "world.json").read_text() == "new" and (new / "world.json").read_text() == "old"
    switch_into_place(out, new)  # and back, through the public function (which also removes the old one)
    assert (new / "world.json").read_text() == "new" and not out.exists()
