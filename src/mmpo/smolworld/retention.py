"""Multiple-choice retention tasks (lm-eval local-task rows) of things the model already knows.

Each row is ``{"query", "choices", "gold"}`` (the format :mod:`mmpo.evaluation.harness` turns
into an lm-eval task): the right answer among three distractors of the same kind, in a seeded
order. None of them overlaps the trained task families, so a drop in their accuracy after
preference training is a loss of something the model could do before. (Object colours and
"which of these is a fruit" were tried too and dropped: SmolLM2-135M-Instruct scored 0.60 and
0.27 on them, so they are not things it does well.)
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from mmpo.smolworld.tables import ANTONYMS, ELEMENT_SYMBOLS

CHOICES = 4


def _row(rng: random.Random, query: str, gold: str, pool: Sequence[str], exclude: Sequence[str] = ()) -> dict:
    distractors = rng.sample(sorted({p for p in pool if p != gold and p not in exclude}), CHOICES - 1)
    choices = [gold, *distractors]
    rng.shuffle(choices)
    return {"query": query, "choices": choices, "gold": choices.index(gold)}


def antonym_rows(rng: random.Random) -> list[dict]:
    pool = [accepted[0] for accepted in ANTONYMS.values()]
    return [
        _row(rng, f'What is the opposite of "{word}"?', accepted[0], pool, exclude=(word, *accepted))
        for word, accepted in ANTONYMS.items()
    ]


def symbol_rows(rng: random.Random) -> list[dict]:
    symbols, elements = list(ELEMENT_SYMBOLS.values()), list(ELEMENT_SYMBOLS)
    rows = [
        _row(rng, f"What is the chemical symbol for {element}?", symbol, symbols)
        for element, symbol in ELEMENT_SYMBOLS.items()
    ]
    rows += [
        _row(rng, f"Which element has the chemical symbol {symbol}?", element, elements)
        for element, symbol in ELEMENT_SYMBOLS.items()
    ]
    return rows


RETENTION_TASKS = {"smol_antonyms": antonym_rows, "smol_symbols": symbol_rows}


def retention_tasks(seed: int = 0) -> dict[str, list[dict]]:
    """Every retention task's rows, by task name (each task seeded on its own)."""
    return {name: make(random.Random(f"{seed}:{name}")) for name, make in RETENTION_TASKS.items()}
