"""Write the real-model world's files: train and held-out prompts, retention tasks (seeded, reproducible).

    python -m mmpo.smolworld.build [--out src/mmpo/assets/smolworld] [--seed 0]

Layout::

    data/prompts_train.jsonl     prompts to sample preference pairs from (mmpo pairs)
    data/prompts_heldout.jsonl   prompts about facts never asked in training (accuracy, win-rate)
    tasks/<name>.jsonl           multiple-choice retention tasks (lm-eval local tasks)
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from mmpo.smolworld.families import make_prompts
from mmpo.smolworld.retention import retention_tasks

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "smolworld"
#: The families the study trains on, chosen by calibration (calibration.md in the assets folder).
STUDY_FAMILIES = ("add", "multiply", "capital")


def smolworld_path(relative: str) -> Path:
    """Path of a shipped real-model world file, e.g. ``smolworld_path("data/prompts_heldout.jsonl")``."""
    return ASSETS / relative


def _write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def build_smolworld(out: str | Path = ASSETS, *, seed: int = 0, families: Sequence[str] = STUDY_FAMILIES) -> dict:
    """Write every file; returns row counts by file."""
    out = Path(out)
    counts = {}
    for split in ("train", "heldout"):
        rows = make_prompts(list(families), split, seed=seed)
        _write_jsonl(out / "data" / f"prompts_{split}.jsonl", rows)
        counts[f"data/prompts_{split}.jsonl"] = len(rows)
    for name, rows in retention_tasks(seed).items():
        _write_jsonl(out / "tasks" / f"{name}.jsonl", rows)
        counts[f"tasks/{name}.jsonl"] = len(rows)
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mmpo.smolworld.build", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ASSETS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, count in build_smolworld(args.out, seed=args.seed).items():
        print(f"{count:6d}  {name}")


if __name__ == "__main__":
    main()
