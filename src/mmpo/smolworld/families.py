"""Task families for a real small chat model: checkable questions, a train/held-out split, a verifier.

Each family enumerates every question it can ask (``items()``), each with a ``group`` (the fact
it tests: an unordered operand pair, a country). :func:`make_prompts` splits the *groups* with a
seeded shuffle, so no held-out fact is ever asked in training, not even reworded or with its
operands swapped. A prompt row is self-contained: it carries what its verifier needs::

    {"instruction": "What is 7 times 8? Answer with only the number.", "task": "multiply",
     "answer": "56", "operands": [7, 8], "group": "7x8", "split": "train"}

Verifiers return 1.0 (right) or 0.0 (wrong) and read the first candidate answer the reply
commits to (:mod:`mmpo.smolworld.answers`), so a right answer in a full sentence is right.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from mmpo.smolworld.answers import first_number, first_phrase
from mmpo.smolworld.tables import CAPITALS, NOT_CAPITALS

SPLITS = ("train", "heldout")
#: Share of each family's groups that only the held-out prompts ask about.
HELDOUT_SHARE = 1 / 3

NUMBER_SUFFIX = " Answer with only the number."
ADD_TEMPLATES = ("What is {a} + {b}?", "What is the sum of {a} and {b}?")
MULTIPLY_TEMPLATES = ("What is {a} times {b}?", "Multiply {a} by {b}.")
CAPITAL_TEMPLATES = ("What is the capital of {country}?", "Which city is the capital of {country}?")
CAPITAL_SUFFIX = " Answer with only the city name."
#: Operand ranges (inclusive). Chosen by measuring SmolLM2-135M-Instruct (docs/smolworld.md).
ADD_RANGE = (1, 9)
MULTIPLY_RANGE = (2, 9)


@dataclass(frozen=True)
class TaskFamily:
    name: str
    description: str
    items: Callable[[], list[dict]]
    verify: Callable[[Mapping, str], float]


def _arithmetic_items(
    task: str, templates: tuple[str, ...], low: int, high: int, op: Callable[[int, int], int], symbol: str
) -> list[dict]:
    rows = []
    for a, b in itertools.product(range(low, high + 1), repeat=2):
        small, large = sorted((a, b))
        for template in templates:
            rows.append(
                {
                    "instruction": template.format(a=a, b=b) + NUMBER_SUFFIX,
                    "task": task,
                    "answer": str(op(a, b)),
                    "operands": [a, b],
                    "group": f"{small}{symbol}{large}",
                }
            )
    return rows


def add_items() -> list[dict]:
    return _arithmetic_items("add", ADD_TEMPLATES, *ADD_RANGE, lambda a, b: a + b, "+")


def multiply_items() -> list[dict]:
    return _arithmetic_items("multiply", MULTIPLY_TEMPLATES, *MULTIPLY_RANGE, lambda a, b: a * b, "x")


def verify_number(example: Mapping, output: str) -> float:
    """Right when the first number in the reply, other than the question's operands, is the answer.

    ("7 + 5 = 12" -> 12; "The sum of 7 and 5 is 11." -> 11.) An operand that *is* the answer
    (never the case with these ranges) still counts.
    """
    answer = int(example["answer"])
    ignore = [n for n in example.get("operands", []) if n != answer]
    return float(first_number(output, ignore=ignore) == answer)


def capital_items() -> list[dict]:
    rows = []
    for country, accepted in CAPITALS.items():
        for template in CAPITAL_TEMPLATES:
            rows.append(
                {
                    "instruction": template.format(country=country) + CAPITAL_SUFFIX,
                    "task": "capital",
                    "answer": accepted[0],
                    "accepted": list(accepted),
                    "group": country,
                }
            )
    return rows


ALL_CITIES = tuple(name for accepted in CAPITALS.values() for name in accepted) + NOT_CAPITALS


def verify_capital(example: Mapping, output: str) -> float:
    """Right when the first city the reply names (any capital, or a big non-capital city) is accepted."""
    accepted = example.get("accepted") or [example["answer"]]
    first = first_phrase(output, (*ALL_CITIES, *accepted))
    return float(first is not None and first in accepted)


FAMILIES: dict[str, TaskFamily] = {
    "add": TaskFamily("add", "sum of two one-digit numbers", add_items, verify_number),
    "multiply": TaskFamily("multiply", "product of two one-digit numbers (2-9)", multiply_items, verify_number),
    "capital": TaskFamily("capital", "capital city of a country", capital_items, verify_capital),
}


def family(name: str) -> TaskFamily:
    if name not in FAMILIES:
        raise ValueError(f"unknown task family {name!r}; families are {', '.join(FAMILIES)}")
    return FAMILIES[name]


def split_items(name: str, seed: int = 0) -> dict[str, list[dict]]:
    """Every item of family ``name`` by split; groups (facts) never cross splits."""
    items = family(name).items()
    groups = sorted({row["group"] for row in items})
    random.Random(f"{seed}:{name}").shuffle(groups)
    heldout = set(groups[: round(len(groups) * HELDOUT_SHARE)])
    out: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for row in items:
        split = "heldout" if row["group"] in heldout else "train"
        out[split].append({**row, "split": split})
    return out


def make_prompts(names: list[str], split: str, *, seed: int = 0, per_family: int | None = None) -> list[dict]:
    """Prompt rows of ``split`` for the families ``names``: ``per_family`` of each (all if None), shuffled."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits are {', '.join(SPLITS)}")
    rng = random.Random(f"{seed}:{split}")
    rows = []
    for name in names:
        pool = split_items(name, seed)[split]
        if per_family is not None and per_family < len(pool):
            pool = rng.sample(pool, per_family)
        rows.extend(pool)
    rng.shuffle(rows)
    return rows
