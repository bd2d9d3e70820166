"""Load one dataset or a weighted mixture into a list of row dicts with stable ids.

A dataset is named by a :class:`DatasetSpec`: a local JSON/JSONL/Parquet/Arrow file, a folder
written by ``datasets.save_to_disk`` (or a folder of such data files), or a Hugging Face Hub id.
:func:`load_rows` returns plain ``list[dict]`` rows (the original columns plus ``"id"``), which is
what the formats/tokenize steps consume; the mixtures used here fit in memory comfortably.
"""

from __future__ import annotations

import codecs
import json
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmpo.data.formats import DataError, RowError

LOCAL_SUFFIXES = {".json", ".jsonl", ".parquet", ".arrow"}
# What may follow the last ':' / '@' of a spec string to count as a split / a weight.
_SPEC_PATTERN = re.compile(r"^(?P<path>.+?)(?::(?P<split>\w+))?(?:@(?P<weight>\d+(?:\.\d*)?|\.\d+))?$")


@dataclass
class DatasetSpec:
    """One dataset of a mixture.

    ``weight`` is the fraction of the dataset's rows to use: 1.0 uses every row once, 0.25 a
    seeded random quarter, 2.5 every row twice plus a seeded random half. ``label`` names the
    dataset in row ids ("<label>:<split>:<row index>"); by default the last part of ``path``
    without its file extension (any ':' in it becomes '_').
    """

    path: str
    split: str = "train"
    weight: float = 1.0
    name: str | None = None
    label: str = field(default="")

    def __post_init__(self) -> None:
        self.path = str(self.path)
        if not self.path:
            raise DataError("dataset spec has an empty path")
        if not self.weight >= 0:  # also rejects NaN
            raise DataError(f"dataset {self.path!r}: weight must be >= 0, got {self.weight}")
        if not self.label:
            self.label = (Path(self.path.rstrip("/")).name.split(".")[0] or self.path).replace(":", "_")
        if ":" in self.label:
            raise DataError(f"dataset {self.path!r}: label {self.label!r} must not contain ':' (it separates id parts)")

    @classmethod
    def parse(cls, text: str) -> DatasetSpec:
        """Parse ``"path[:split][@weight]"``, e.g. ``"HuggingFaceH4/ultrafeedback_binarized:train_prefs@0.5"``.

        Rule: ``@weight`` is taken from the end when it is a plain number; then ``:split`` is the
        text after the last ':' when it is a split-like word (letters, digits, '_'). A string that
        names an existing local file or folder is always taken whole as the path, so
        ``data/a:b.jsonl`` and an existing file ``data/run:1`` stay paths.
        """
        text = text.strip()
        if Path(text).expanduser().exists():
            return cls(path=text)
        match = _SPEC_PATTERN.match(text)
        if match is None:  # pragma: no cover - the path group matches any non-empty text
            raise DataError(f"cannot parse dataset spec {text!r}; expected 'path[:split][@weight]'")
        path, split, weight = match["path"], match["split"], match["weight"]
        return cls(path=path, split=split or "train", weight=float(weight) if weight else 1.0)


@dataclass
class BadLines:
    """What to do with a line (or array element) of a local file that is not a row: raise its
    :class:`RowError` (``on_bad_rows="raise"``) or note it in ``skipped`` and go on."""

    on_bad_rows: str = "raise"
    skipped: list[tuple[str, str]] = field(default_factory=list)  # ("<file>:<line>", message)

    def handle(self, where: str, message: str) -> None:
        if self.on_bad_rows != "skip":
            raise RowError(message)
        self.skipped.append((where, message))


def load_dataset_rows(spec: DatasetSpec, bad: BadLines | None = None) -> list[dict[str, Any] | None]:
    """All rows of one dataset split, in their stored order, as plain dicts (no ids, no weighting).

    A skipped bad line keeps its place as ``None``, so the rows after it keep their index (and id).
    """
    bad = bad or BadLines()
    local = Path(spec.path).expanduser()
    if local.is_file():
        return _read_local_file(local, spec, bad)
    if local.is_dir():
        return _read_local_folder(local, spec, bad)
    if local.suffix in LOCAL_SUFFIXES or spec.path.startswith((".", "/", "~")):
        raise DataError(f"dataset {spec.path!r}: no such local file or folder")
    return _read_hub(spec)


def load_rows(
    specs: Iterable[DatasetSpec | str], seed: int = 0, *, on_bad_rows: str = "raise", bad: BadLines | None = None
) -> list[dict[str, Any]]:
    """Load the datasets of ``specs``, weight them, and shuffle the mixture deterministically.

    Returns a list of row dicts, each the original columns plus ``"id"`` =
    ``"<label>:<split>:<row index>"`` (the row's index in its split; a row repeated by a weight
    above 1 keeps its id, since it is the same data). An original ``id`` column is kept as
    ``"source_id"``. The same specs and seed always give the same rows in the same order. Lines
    of local files that are not rows (bad JSON, bad UTF-8, not an object) raise a
    :class:`RowError` naming the file and line, or with ``on_bad_rows="skip"`` are skipped and
    listed in ``bad.skipped`` (pass a :class:`BadLines` to see them).
    """
    bad = bad or BadLines(on_bad_rows)
    specs = [DatasetSpec.parse(spec) if isinstance(spec, str) else spec for spec in specs]
    if not specs:
        raise DataError("no datasets given")
    seen: dict[tuple[str, str], str] = {}
    for spec in specs:
        key = (spec.label, spec.split)
        if key in seen:
            raise DataError(
                f"datasets {seen[key]!r} and {spec.path!r} would both produce row ids '{spec.label}:{spec.split}:…'; "
                "give one of them a different label"
            )
        seen[key] = spec.path

    mixture: list[dict[str, Any]] = []
    for spec in specs:
        rows = load_dataset_rows(spec, bad)
        # Seed per dataset so that changing one dataset's weight leaves the others' picks alone.
        picker = random.Random(f"{seed}:{spec.label}:{spec.split}")
        for index in _weighted_indices(len(rows), spec.weight, picker):
            if rows[index] is not None:
                mixture.append(_tag(rows[index], f"{spec.label}:{spec.split}:{index}"))
    random.Random(seed).shuffle(mixture)
    return mixture


def _weighted_indices(count: int, weight: float, picker: random.Random) -> list[int]:
    whole, fraction = divmod(weight, 1.0)
    indices = list(range(count)) * int(whole)
    indices += sorted(picker.sample(range(count), round(fraction * count)))
    return indices


def _tag(row: dict[str, Any], row_id: str) -> dict[str, Any]:
    tagged = dict(row)
    if "id" in tagged:
        tagged["source_id"] = tagged["id"]
    tagged["id"] = row_id
    return tagged


# --- readers ---------------------------------------------------------------------------------


def _read_local_file(path: Path, spec: DatasetSpec, bad: BadLines) -> list[dict[str, Any] | None]:
    """A single file holds one split; ``spec.split`` then only names it in the row ids."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            return _read_jsonl(path, spec, bad)
        if suffix == ".json":
            return _read_json(path, spec, bad)
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        if suffix == ".arrow":
            return _read_arrow(path)
    except (OSError, ValueError) as error:
        if isinstance(error, DataError):
            raise
        raise DataError(f"dataset {spec.path!r}: cannot read {suffix} file: {error}") from error
    raise DataError(
        f"dataset {spec.path!r}: unsupported file type {suffix!r}; use one of {sorted(LOCAL_SUFFIXES)}, "
        "a folder written by datasets.save_to_disk, or a Hub id"
    )


def _read_jsonl(path: Path, spec: DatasetSpec, bad: BadLines) -> list[dict[str, Any] | None]:
    """One JSON object per line, read as bytes so that a bad encoding names its line, not a byte offset."""
    rows: list[dict[str, Any] | None] = []
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            if line_number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]  # a byte-order mark some editors write: not data
            where = f"{path}:{line_number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                bad.handle(
                    where,
                    f"dataset {spec.path!r}: line {line_number} is not valid UTF-8 (byte "
                    f"0x{raw[error.start]:02x} at column {error.start + 1}); save the file as UTF-8",
                )
                rows.append(None)
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                bad.handle(where, f"dataset {spec.path!r}: line {line_number} is not valid JSON ({error})")
                rows.append(None)
                continue
            if not isinstance(row, dict):
                bad.handle(
                    where,
                    f"dataset {spec.path!r}: line {line_number} is a JSON {type(row).__name__}, "
                    "not an object of columns",
                )
                rows.append(None)
                continue
            rows.append(row)
    return rows


def _read_json(path: Path, spec: DatasetSpec, bad: BadLines) -> list[dict[str, Any] | None]:
    """A JSON array of rows, or an object with one list-valued key holding them (e.g. {"data": [...]})."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise DataError(
            f"dataset {spec.path!r}: line {line} is not valid UTF-8 (byte 0x{data[error.start]:02x} "
            f"at column {column}); save the file as UTF-8"
        ) from None
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        return _read_jsonl(path, spec, bad)  # many ".json" files are really JSON Lines
    if isinstance(parsed, dict):
        lists = [value for value in parsed.values() if isinstance(value, list)]
        if len(lists) != 1:
            raise DataError(f"dataset {spec.path!r}: expected a JSON array of rows (or one key holding it)")
        parsed = lists[0]
    if not isinstance(parsed, list):
        raise DataError(f"dataset {spec.path!r}: expected a JSON array of rows, got {type(parsed).__name__}")
    rows: list[dict[str, Any] | None] = []
    for index, row in enumerate(parsed):
        if not isinstance(row, dict):
            bad.handle(
                f"{path}[{index}]",
                f"dataset {spec.path!r}: row {index} is a JSON {type(row).__name__}, not an object of columns",
            )
            row = None
        rows.append(row)
    return rows


def _read_arrow(path: Path) -> list[dict[str, Any]]:
    """Arrow IPC stream (what ``datasets`` writes) or IPC file (Feather v2) format."""
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as source:
            return pa.ipc.open_stream(source).read_all().to_pylist()
    except pa.ArrowInvalid:
        with pa.memory_map(str(path)) as source:
            return pa.ipc.open_file(source).read_all().to_pylist()


def _read_local_folder(path: Path, spec: DatasetSpec, bad: BadLines) -> list[dict[str, Any] | None]:
    """A folder written by ``datasets.save_to_disk``, or a folder of data files whose names give the
    splits (``train.jsonl``, ``data/test-00000.parquet``: the Hub's layout). Files of the types
    read here are read like single files (line numbers, ``on_bad_rows``); others go to ``datasets``."""
    import datasets
    from datasets.data_files import DataFilesList, EmptyDatasetError, get_data_patterns

    try:
        if (path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                loaded = _select_split(loaded, spec)
            return loaded.to_list()
        patterns = {str(split): files for split, files in get_data_patterns(str(path)).items()}
    except EmptyDatasetError:
        raise DataError(
            f"dataset {spec.path!r}: the folder holds no data files (expected e.g. train.jsonl, "
            f"or data/train-*.parquet; readable types: {sorted(LOCAL_SUFFIXES)})"
        ) from None
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as error:
        raise DataError(f"dataset {spec.path!r}: cannot read the folder: {type(error).__name__}: {error}") from None
    if spec.split not in patterns:
        raise DataError(f"dataset {spec.path!r}: no split {spec.split!r}; available splits: {sorted(patterns)}")
    files = sorted(Path(f) for f in DataFilesList.from_patterns(patterns[spec.split], base_path=str(path)))
    ours = [f for f in files if f.suffix.lower() in LOCAL_SUFFIXES]  # a README.md beside them is no data
    if ours:
        return [row for f in ours for row in _read_local_file(f, DatasetSpec(str(f)), bad)]
    try:  # other formats (CSV, ...): the datasets library's builders
        return _select_split(datasets.load_dataset(str(path), name=spec.name), spec).to_list()
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as error:
        found = ", ".join(f.name for f in files[:5]) or "none"
        raise DataError(
            f"dataset {spec.path!r}: cannot read the folder's {spec.split!r} files ({found}; readable "
            f"here: {sorted(LOCAL_SUFFIXES)}, others through datasets): {type(error).__name__}: "
            f"{str(error)[:200]}"
        ) from None


def _read_hub(spec: DatasetSpec) -> list[dict[str, Any]]:
    import datasets

    try:
        loaded = datasets.load_dataset(spec.path, name=spec.name, split=spec.split)
    except (ConnectionError, OSError, datasets.exceptions.DatasetNotFoundError) as error:
        config = f", config {spec.name!r}" if spec.name else ""
        raise DataError(
            f"dataset {spec.path!r} (split {spec.split!r}{config}) could not be loaded: it is not a local "
            f"file or folder, and it could not be downloaded from the Hugging Face Hub (offline, no network "
            f"or unknown id; HF_HUB_OFFLINE / HF_DATASETS_OFFLINE force offline mode). Cause: {error}"
        ) from error
    except (ValueError, datasets.exceptions.DatasetsError) as error:  # e.g. an unknown split name
        raise DataError(f"dataset {spec.path!r}: {type(error).__name__}: {error}") from error
    return loaded.to_list()


def _select_split(loaded: Any, spec: DatasetSpec) -> Any:
    if spec.split not in loaded:
        raise DataError(f"dataset {spec.path!r}: no split {spec.split!r}; available splits: {sorted(loaded)}")
    return loaded[spec.split]
