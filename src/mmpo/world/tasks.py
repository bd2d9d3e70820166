"""Checkable tasks of the embedded world: pseudo-words, task families, answer styles, grading.

Everything here is pure and seeded (``random.Random``), so the same seed gives the same data.
Words are strings of syllables, so a BPE tokenizer learns syllable-sized pieces and held-out
words (never in any training data) are still spelled with familiar pieces.

Each instruction has exactly one concise correct answer. Answers come in styles: ``concise``
(the answer alone: the good one), ``verbose`` (the answer wrapped in chatter), ``deflect`` (no
answer) and ``wrong`` (a plausible wrong answer). SFT data is mostly unhelpful styles, so the
SFT model leaves headroom that preference training (chosen = concise) can take.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

CONSONANTS = "bdfgklmnprtvz"  # no "s": plurals stay unambiguous ("Xs")
VOWELS = "aeiou"
CODAS = ("", "", "", "n", "r", "l")  # a third of syllables closed, for varied BPE pieces
COLORS = ("red", "blue", "green", "yellow", "black", "white", "purple", "orange")

#: Skills tested on held-out words. ``fact`` questions are memorized, not a skill. (Calibration:
#: a 2-layer d=128 Llama learns these three in ~1500 SFT steps; "last letter" and "which word is
#: longer" stayed near chance in that budget, so they are not part of the world.)
WORD_TASKS = ("repeat", "first_letter", "plural")
FACT_TASK = "fact"

# Words are quoted so that the byte-level pre-tokenizer splits them off without a leading space,
# exactly as at the start of a concise answer: copying is then token-for-token, which a tiny
# model learns in minutes (with "the word mivofa" the prompt has "Ġmi" where the answer has "mi").
INSTRUCTIONS = {
    "repeat": 'Repeat the word "{0}".',
    "first_letter": 'What is the first letter of "{0}"?',
    "plural": 'What is the plural of "{0}"?',
}
FACT_QUESTIONS = ('What color is the "{0}"?', 'Which color does the "{0}" have?')

VERBOSE_TEMPLATES = (  # short, so SFT stays cheap; still clearly not the concise answer
    'Sure! The answer is "{0}".',
    'Good question. I think it is "{0}".',
)
# No lowercase standalone letters or colors in here, so deflections never contain an answer.
DEFLECT_TEMPLATES = (
    "I am not sure about that.",
    "Sorry, I cannot help with that.",
)

#: Share of each style among SFT answers: 65% unhelpful (verbose or deflect).
SFT_STYLE_WEIGHTS = {"concise": 0.35, "verbose": 0.35, "deflect": 0.30}
#: Share of each style among rejected answers of preference pairs.
REJECTED_STYLE_WEIGHTS = {"verbose": 0.4, "deflect": 0.4, "wrong": 0.2}


# ----------------------------------------------------------------------------- words


def make_syllable(rng: random.Random) -> str:
    return rng.choice(CONSONANTS) + rng.choice(VOWELS) + rng.choice(CODAS)


def make_word(rng: random.Random, syllables: int | None = None) -> str:
    count = syllables if syllables is not None else rng.choice((2, 2, 3))
    return "".join(make_syllable(rng) for _ in range(count))


def make_words(rng: random.Random, count: int, exclude: Sequence[str] = ()) -> list[str]:
    """``count`` distinct pseudo-words not in ``exclude``, in generation order."""
    seen = set(exclude)
    words: list[str] = []
    while len(words) < count:
        word = make_word(rng)
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def near_miss(rng: random.Random, word: str, avoid: Sequence[str] = ()) -> str:
    """``word`` with one syllable replaced, neither a prefix of ``word`` nor of/by any of ``avoid``.

    No prefixes, so a multiple-choice scorer that sums the log-likelihood of a choice without its
    end-of-turn token cannot prefer a choice for being a truncation of the answer.
    """
    pieces = re.findall(rf"[{CONSONANTS}][{VOWELS}][nrl]?(?![{VOWELS}])", word)
    if "".join(pieces) != word:  # cannot happen for words from make_word; fail loudly if it does
        raise ValueError(f"{word!r} is not a sequence of syllables")
    while True:
        changed = list(pieces)
        changed[rng.randrange(len(changed))] = make_syllable(rng)
        candidate = "".join(changed)
        if not any(a.startswith(candidate) or candidate.startswith(a) for a in (word, *avoid)):
            return candidate


# ----------------------------------------------------------------------------- examples


def make_example(rng: random.Random, task: str, words: Sequence[str], facts: Mapping[str, str] | None = None) -> dict:
    """An instruction with its checkable answer: ``{"task", "instruction", "answer", "words"}``.

    ``words`` holds the word the instruction mentions (for ``fact``, the object whose colour comes
    from ``facts``).
    """
    w = words[0]
    if task == "repeat":
        answer = w
    elif task == "first_letter":
        answer = w[0]
    elif task == "plural":
        answer = w + "s"
    elif task == FACT_TASK:
        if facts is None or w not in facts:
            raise ValueError(f"no fact known about {w!r}")
        answer = facts[w]
        return {"task": task, "instruction": rng.choice(FACT_QUESTIONS).format(w), "answer": answer, "words": [w]}
    else:
        raise ValueError(f"unknown task {task!r}; expected one of {WORD_TASKS + (FACT_TASK,)}")
    return {"task": task, "instruction": INSTRUCTIONS[task].format(w), "answer": answer, "words": [w]}


def wrong_answer(rng: random.Random, example: Mapping) -> str:
    """A concise answer of the right form that is wrong."""
    task, answer, words = example["task"], example["answer"], example["words"]
    if task == "repeat":
        return near_miss(rng, answer)
    if task == "first_letter":
        return rng.choice([c for c in CONSONANTS if c != answer])
    if task == "plural":
        return words[0] + rng.choice(("es", "en", "i"))
    if task == FACT_TASK:
        return rng.choice([c for c in COLORS if c != answer])
    raise ValueError(f"unknown task {task!r}")


def render_answer(rng: random.Random, example: Mapping, style: str) -> str:
    """The assistant's answer to ``example`` in ``style`` (concise, verbose, deflect, wrong)."""
    if style == "concise":
        return example["answer"]
    if style == "verbose":
        return rng.choice(VERBOSE_TEMPLATES).format(example["answer"])
    if style == "deflect":
        return rng.choice(DEFLECT_TEMPLATES)
    if style == "wrong":
        return wrong_answer(rng, example)
    raise ValueError(f"unknown answer style {style!r}")


def sample_style(rng: random.Random, weights: Mapping[str, float]) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


# ----------------------------------------------------------------------------- grading


def grade(example: Mapping, output: str) -> int:
    """2: exactly the concise answer (after strip); 1: contains it among other text; 0: otherwise.

    "Contains" means as a whole word (not inside a longer run of letters), so "b" is not found in
    "about" and "banop" is not found in "banopi".
    """
    answer = example["answer"]
    text = output.strip()
    if text == answer:
        return 2
    if re.search(rf"(?<![A-Za-z]){re.escape(answer)}(?![A-Za-z])", text):
        return 1
    return 0


def judge_pair(example: Mapping, output_a: str, output_b: str) -> float:
    """1.0 if ``output_a`` grades higher than ``output_b``, 0.0 if lower, 0.5 on a tie."""
    a, b = grade(example, output_a), grade(example, output_b)
    return 1.0 if a > b else 0.0 if a < b else 0.5


# ----------------------------------------------------------------------------- data sets


@dataclass(frozen=True)
class WorldSizes:
    """How much of everything the world generates."""

    train_words: int = 1500  # words of SFT and preference-training instructions
    heldout_words: int = 600  # words of validation, test, evaluation and retention rows only
    facts: int = 100
    sft_train: int = 6000
    sft_val: int = 300
    fact_share: float = 0.2  # share of SFT rows that ask a memorized fact
    prefs_train: int = 2000
    prefs_test: int = 300
    prompts_eval: int = 200
    mc_copy: int = 200
    mc_choices: int = 4


def _sft_row(rng: random.Random, example: dict) -> dict:
    style = sample_style(rng, SFT_STYLE_WEIGHTS)
    messages = [
        {"role": "user", "content": example["instruction"]},
        {"role": "assistant", "content": render_answer(rng, example, style)},
    ]
    return {
        "messages": messages,
        "task": example["task"],
        "answer": example["answer"],
        "words": example["words"],
        "style": style,
    }


def _pref_row(rng: random.Random, example: dict) -> dict:
    style = sample_style(rng, REJECTED_STYLE_WEIGHTS)
    return {
        "prompt": example["instruction"],
        "chosen": render_answer(rng, example, "concise"),
        "rejected": render_answer(rng, example, style),
        "task": example["task"],
        "answer": example["answer"],
        "words": example["words"],
        "rejected_style": style,
    }


def _mc_row(rng: random.Random, query: str, gold: str, distractors: Sequence[str], **meta) -> dict:
    choices = [gold, *distractors]
    rng.shuffle(choices)
    return {"query": query, "choices": choices, "gold": choices.index(gold), **meta}


def generate_rows(seed: int = 0, sizes: WorldSizes = WorldSizes()) -> dict[str, list[dict]]:
    """All rows of the world, keyed by the file they go to (``"data/sft_train"``, ``"tasks/world_facts"``...).

    Word instructions in ``data/sft_train`` and ``data/prefs_train`` use training words only; all
    other files use held-out words, so evaluation asks about words the model never saw.
    """
    rng = random.Random(seed)
    train_words = make_words(rng, sizes.train_words)
    heldout_words = make_words(rng, sizes.heldout_words, exclude=train_words)
    objects = make_words(rng, sizes.facts, exclude=train_words + heldout_words)
    facts = {obj: rng.choice(COLORS) for obj in objects}

    def word_example(pool: Sequence[str], task: str | None = None) -> dict:
        task = task or rng.choice(WORD_TASKS)
        return make_example(rng, task, [rng.choice(pool)])

    def sft_rows(count: int, pool: Sequence[str]) -> list[dict]:
        rows = []
        for _ in range(count):
            if rng.random() < sizes.fact_share:
                example = make_example(rng, FACT_TASK, [rng.choice(objects)], facts)
            else:
                example = word_example(pool)
            rows.append(_sft_row(rng, example))
        return rows

    rows = {
        "data/sft_train": sft_rows(sizes.sft_train, train_words),
        "data/sft_val": sft_rows(sizes.sft_val, heldout_words),
        "data/prefs_train": [_pref_row(rng, word_example(train_words)) for _ in range(sizes.prefs_train)],
        "data/prefs_test": [_pref_row(rng, word_example(heldout_words)) for _ in range(sizes.prefs_test)],
    }
    eval_tasks = [WORD_TASKS[i % len(WORD_TASKS)] for i in range(sizes.prompts_eval)]  # balanced
    rows["data/prompts_eval"] = [
        {k: ex[k] for k in ("instruction", "task", "answer", "words")}
        for ex in (word_example(heldout_words, task) for task in eval_tasks)
    ]
    n_other = sizes.mc_choices - 1
    rows["tasks/world_facts"] = [
        _mc_row(
            rng,
            question.format(obj),
            color,
            rng.sample([c for c in COLORS if c != color], n_other),
            task=FACT_TASK,
            words=[obj],
        )
        for obj, color in facts.items()
        for question in FACT_QUESTIONS
    ]
    copy_rows = []
    for word in rng.sample(heldout_words, sizes.mc_copy):
        misses: list[str] = []
        for _ in range(n_other):
            misses.append(near_miss(rng, word, avoid=misses))
        copy_rows.append(_mc_row(rng, INSTRUCTIONS["repeat"].format(word), word, misses, task="repeat", words=[word]))
    rows["tasks/world_copy"] = copy_rows
    return rows
