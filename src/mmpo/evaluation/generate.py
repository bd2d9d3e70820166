"""Generating answers to an instruction set, in AlpacaEval's ``model_outputs.json`` format.

Each record is ``{"instruction", "output", "generator"}`` plus the scalar metadata the instruction
row carried (task answers for a programmatic judge, a difficulty, a dataset name); list- or
object-valued fields are left out, as ``alpaca_eval`` cannot merge on them. Prompts go
through the tokenizer's chat template as a single user turn; batches are left-padded so every
row's generation starts right after its own prompt, and decoding stops at the end-of-turn/EOS.

The paper generated with at most 512 new tokens, temperature 0.01 and top_p 0.95 in bf16; the
default here is greedy decoding (``temperature=0``), which is what temperature 0.01 amounts to.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase, set_seed

from mmpo.modeling import is_adapter_folder, load_pretrained, load_tokenizer, resolve_dtype

__all__ = [
    "ALPACA_EVAL_HUB_ID",
    "load_instructions",
    "load_generation_model",
    "generate_outputs",
    "write_model_outputs",
    "alpaca_eval_record",
]

log = logging.getLogger(__name__)

#: The AlpacaEval 2 prompt set (805 instructions): config ``alpaca_eval``, split ``eval``.
ALPACA_EVAL_HUB_ID = "tatsu-lab/alpaca_eval"
_ALPACA_EVAL_FILE = "alpaca_eval.json"  # what the Hub repo's loading script reads for that config
# A prompt set's own reference answers describe another model, not ours: don't carry them along.
_REFERENCE_KEYS = ("output", "generator")


# ------------------------------------------------------------------------------------ prompt sets


def _rows_from_file(path: Path) -> list:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = []
        for line_no, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}: line {line_no} is not valid JSON ({err.msg})") from None
        return rows
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
        return data
    raise ValueError(f"{path}: unsupported prompt file type '{path.suffix}' (use .json or .jsonl)")


def _alpaca_eval_rows() -> list:
    """The 805 AlpacaEval instructions, fetched from the Hub (or the local Hub cache)."""
    from huggingface_hub import hf_hub_download

    try:
        local = hf_hub_download(ALPACA_EVAL_HUB_ID, _ALPACA_EVAL_FILE, repo_type="dataset")
    except Exception as err:  # offline mode, no network, not cached: all mean the same to the user
        raise RuntimeError(
            f"could not get the AlpacaEval prompt set ({ALPACA_EVAL_HUB_ID}, config alpaca_eval, split eval) "
            f"from the Hugging Face Hub: {err.__class__.__name__}: {str(err).splitlines()[0] if str(err) else ''}. "
            "It needs network access (unset HF_HUB_OFFLINE) or a cached copy; alternatively download "
            f"{_ALPACA_EVAL_FILE} from that dataset repo and pass its path instead."
        ) from None
    return _rows_from_file(Path(local))


def _hub_rows(hub_id: str, config: str | None, split: str | None) -> list:
    import datasets

    try:
        dataset = datasets.load_dataset(hub_id, config, split=split or "train")
    except Exception as err:
        raise RuntimeError(
            f"could not load the prompt set '{hub_id}' (config {config}, split {split or 'train'}) from the Hub: "
            f"{err.__class__.__name__}: {str(err).splitlines()[0] if str(err) else ''} "
            "(it needs network access unless cached; a local .json/.jsonl file works offline)"
        ) from None
    return list(dataset)


def load_instructions(
    path_or_hub_id: str | Path, column: str = "instruction", *, config: str | None = None, split: str | None = None
) -> list[dict]:
    """Load a prompt set as a list of ``{"instruction": ..., **metadata}`` dicts.

    ``path_or_hub_id`` is a local ``.json`` (a list of rows) or ``.jsonl`` file, whose rows are
    objects with the ``column`` key or plain strings; or a Hub dataset id. ``tatsu-lab/alpaca_eval``
    is the AlpacaEval 805 set (config ``alpaca_eval``, split ``eval``), which needs the Hub.
    Reference answers in the set (``output``/``generator``) are dropped.
    """
    path = Path(path_or_hub_id)
    if path.is_file():
        rows = _rows_from_file(path)
    elif str(path_or_hub_id) == ALPACA_EVAL_HUB_ID:
        if config not in (None, "alpaca_eval") or split not in (None, "eval"):
            raise ValueError(f"{ALPACA_EVAL_HUB_ID} is supported with config 'alpaca_eval' and split 'eval' only")
        rows = _alpaca_eval_rows()
    elif path.suffix in (".json", ".jsonl") or path.exists():
        raise FileNotFoundError(f"prompt file not found: {path}")
    else:
        rows = _hub_rows(str(path_or_hub_id), config, split)

    instructions = []
    for i, row in enumerate(rows):
        if isinstance(row, str):
            row = {column: row}
        if not isinstance(row, Mapping) or not isinstance(row.get(column), str) or not row[column].strip():
            keys = sorted(row) if isinstance(row, Mapping) else type(row).__name__
            raise ValueError(f"{path_or_hub_id}: row {i} has no non-empty string '{column}' (has: {keys})")
        metadata = {k: v for k, v in row.items() if k != column and k not in _REFERENCE_KEYS}
        instructions.append({"instruction": row[column], **metadata})
    if not instructions:
        raise ValueError(f"{path_or_hub_id}: the prompt set is empty")
    return instructions


# ---------------------------------------------------------------------------------------- models


def load_generation_model(path: str | Path, *, dtype: str = "auto", device: str | None = None) -> PreTrainedModel:
    """A model folder, Hub id, GGUF file, or a LoRA adapter folder (merged into its base for speed)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_pretrained(path, dtype=resolve_dtype(dtype), is_trainable=False)
    if is_adapter_folder(path):
        model = model.merge_and_unload()
    return model.to(device).eval()


def _stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokenizer's EOS plus any the model's generation config lists (e.g. <|eot_id|>)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    if not ids:
        raise ValueError("neither the tokenizer nor the model's generation config defines an EOS token to stop at")
    return sorted(ids)


def _as_rows(instructions: Sequence[str | Mapping]) -> list[dict]:
    if isinstance(instructions, (str, Mapping)) or not instructions:
        raise ValueError("instructions must be a non-empty list of strings or {'instruction': ...} dicts")
    rows = []
    for i, item in enumerate(instructions):
        row = {"instruction": item} if isinstance(item, str) else dict(item) if isinstance(item, Mapping) else None
        if row is None or not isinstance(row.get("instruction"), str) or not row["instruction"].strip():
            raise ValueError(f"instruction {i} must be a non-empty string or a dict with a non-empty 'instruction'")
        rows.append(row)
    return rows


@torch.inference_mode()
def generate_outputs(
    model_path_or_model: str | Path | PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    instructions: Sequence[str | Mapping],
    *,
    generator_name: str | None = None,
    max_new_tokens: int = 512,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 8,
    seed: int = 42,
    system_prompt: str | None = None,
    dtype: str = "auto",
    device: str | None = None,
    progress: bool = False,
) -> list[dict]:
    """Answer every instruction; returns AlpacaEval records in the instructions' order.

    ``model_path_or_model`` is a loaded model or a folder/Hub id (a LoRA adapter folder works
    too); ``tokenizer`` None loads it from that folder. ``temperature=0`` is greedy decoding;
    otherwise nucleus sampling with ``top_p``, seeded by ``seed``. ``generator_name`` defaults to
    the folder's name.
    """
    rows = _as_rows(instructions)
    if max_new_tokens < 1 or batch_size < 1 or temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(
            f"need max_new_tokens >= 1, batch_size >= 1, temperature >= 0 and 0 < top_p <= 1 "
            f"(got {max_new_tokens}, {batch_size}, {temperature}, {top_p})"
        )
    if isinstance(model_path_or_model, (str, Path)):
        source = str(model_path_or_model)
        tokenizer = tokenizer or load_tokenizer(source)
        model = load_generation_model(source, dtype=dtype, device=device)
        generator_name = generator_name or Path(source.rstrip("/")).name
    else:
        model = model_path_or_model.eval()
        if tokenizer is None:
            raise ValueError("pass the tokenizer along with an already-loaded model")
        generator_name = generator_name or Path(str(getattr(model.config, "name_or_path", "") or "model")).name
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; generation prompts are rendered with it")

    stop_ids = _stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    sampling = temperature > 0
    generation_config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sampling,
        eos_token_id=stop_ids,
        pad_token_id=pad_id,
        **({"temperature": temperature, "top_p": top_p} if sampling else {}),
    )

    prefix = [{"role": "system", "content": system_prompt}] if system_prompt else []
    prompts = [
        tokenizer.apply_chat_template(
            prefix + [{"role": "user", "content": r["instruction"]}], add_generation_prompt=True, tokenize=False
        )
        for r in rows
    ]
    # Longest prompts first: batches of similar length waste less compute on padding.
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    order = sorted(range(len(rows)), key=lambda i: -lengths[i])
    outputs: list[str] = [""] * len(rows)
    n_unfinished = 0
    set_seed(seed)
    batches = range(0, len(order), batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"generating ({generator_name})")
    device_ = next(model.parameters()).device
    for start in batches:
        idx = order[start : start + batch_size]
        batch = tokenizer(
            [prompts[i] for i in idx], add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt"
        ).to(device_)
        generated = model.generate(**batch, generation_config=generation_config)
        new_tokens = generated[:, batch["input_ids"].shape[1] :]
        is_stop = torch.isin(new_tokens, torch.tensor(stop_ids, device=new_tokens.device))
        for row_i, tokens, stops in zip(idx, new_tokens.tolist(), is_stop.tolist()):
            # Cut at the first stop token ourselves: a stop id need not be a "special" token that
            # skip_special_tokens would drop, and everything after it is padding.
            end = stops.index(True) if True in stops else len(tokens)
            n_unfinished += int(end == len(tokens))
            outputs[row_i] = tokenizer.decode(tokens[:end], skip_special_tokens=True).strip()
    if n_unfinished:
        log.info(
            "%d of %d outputs hit max_new_tokens=%d before an end-of-turn token",
            n_unfinished,
            len(rows),
            max_new_tokens,
        )

    return [alpaca_eval_record(r, out, generator_name) for r, out in zip(rows, outputs)]


def _is_scalar(value) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def alpaca_eval_record(row: Mapping, output: str, generator: str) -> dict:
    """AlpacaEval's fields plus the row's scalar metadata (lists and objects break ``alpaca_eval``'s merge)."""
    metadata = {k: v for k, v in row.items() if k not in _REFERENCE_KEYS and k != "instruction" and _is_scalar(v)}
    return {"instruction": row["instruction"], "output": output, "generator": generator, **metadata}


def write_model_outputs(records: Sequence[Mapping], path: str | Path) -> Path:
    """Write records as AlpacaEval's ``model_outputs.json`` (into ``path`` if it is a folder)."""
    for i, record in enumerate(records):
        missing = [k for k in ("instruction", "output", "generator") if not isinstance(record.get(k), str)]
        if missing:
            raise ValueError(f"record {i} lacks string field(s) {missing}")
        nested = [k for k, v in record.items() if not _is_scalar(v)]
        if nested:
            raise ValueError(
                f"record {i}: field(s) {nested} are not scalars; AlpacaEval's files hold scalar fields only"
            )
    path = Path(path)
    if path.suffix != ".json":
        path = path / "model_outputs.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(list(map(dict, records)), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path
