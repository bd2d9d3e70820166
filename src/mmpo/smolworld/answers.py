"""Reading the answer out of a free-form reply: the first candidate the reply commits to.

A small chat model rarely answers with the bare answer: "7 + 5 = 12", "The capital of Kenya is
Nairobi.". Grading "starts with the answer" would then reward brevity, not correctness. Here a
reply is right when the *first* candidate answer it mentions is an accepted one, where the
candidates are every answer of the task family (all numbers; every capital) minus the words the
question itself contains (the operands; the country). So a verbose right answer is right, a
reply that names a wrong candidate first is wrong, and listing several candidates does not win.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:,\d{3})*(?![\d])")


def fold(text: str) -> str:
    """Lower case without accents or typographic apostrophes ("Bogotá" -> "bogota")."""
    decomposed = unicodedata.normalize("NFKD", text.replace("\u2019", "'"))
    return "".join(c for c in decomposed if not unicodedata.combining(c)).lower()


def numbers_in(text: str) -> list[int]:
    """Integers in reading order ("1,200" is one number; "3.5" yields none: not an integer answer)."""
    found = []
    for match in _NUMBER.finditer(text):
        end = match.end()
        if text[end : end + 1] == "." and text[end + 1 : end + 2].isdigit():
            continue  # a decimal such as 3.5
        found.append(int(match.group().replace(",", "")))
    return found


def first_number(text: str, ignore: Iterable[int] = ()) -> int | None:
    """The first integer in ``text`` that is not in ``ignore`` (the question's own operands)."""
    skip = set(ignore)
    return next((n for n in numbers_in(text) if n not in skip), None)


def _phrase_pattern(phrase: str) -> str:
    return r"(?<![a-z0-9])" + re.escape(fold(phrase)) + r"(?![a-z0-9])"


def first_phrase(text: str, candidates: Iterable[str]) -> str | None:
    """The candidate phrase that occurs first in ``text`` (whole words, case and accents ignored).

    When two candidates start at the same place the longer wins ("San Salvador" over "Salvador").
    """
    folded = fold(text)
    best: tuple[int, int, str] | None = None
    for candidate in candidates:
        match = re.search(_phrase_pattern(candidate), folded)
        if match:
            key = (match.start(), -len(match.group()), candidate)
            best = key if best is None or key < best else best
    return best[2] if best else None
