"""Answer extractors: read the final answer out of a model's free text.

Strategies vote on and tasks score what these return, so both sides agree on what "the
answer" of a text is. An extractor is any ``Callable[[str], str | None]``; ``None`` means
the text has no parsable answer.

GSM8K's two conventions, as lm-eval implements them: *strict* takes the number after
``####``; *flexible* takes the last number anywhere. Both normalise the way lm-eval does
(drop ``,`` and ``$``, a trailing ``.``), so "1,000." and "$1000" both read as ``1000``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

__all__ = [
    "EXTRACTORS",
    "Extractor",
    "answer_line",
    "CITATION",
    "choice_letter",
    "default_answer",
    "final_line",
    "gsm8k_flexible",
    "gsm8k_strict",
    "json_field",
    "normalize",
    "normalize_number",
    "normalized_text",
    "without_citations",
]

Extractor = Callable[[str], "str | None"]

_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_FINAL = re.compile(r"####[ \t]*([^\n]*)")
# A citation: a bracketed id, or several separated by commas ("[kb-3, kb-9]"). Ids hold no
# spaces; a markdown link "[text](url)" is not a citation.
CITATION = re.compile(r"\[([^\[\]\s,;]+(?:\s*[,;]\s*[^\[\]\s,;]+)*)\](?!\()")
_CITATION_MARK = re.compile(r"[ \t]*" + CITATION.pattern)  # with the blanks before it


def without_citations(text: str) -> str:
    """The text with its citation markers dropped: "Its capital is Taike [kb-7]." reads
    "Its capital is Taike." (what an answer is read from; a citation is not an answer)."""
    return _CITATION_MARK.sub("", text)


def normalize_number(text: str) -> str:
    """lm-eval's normalisation of a numeric answer; also canonicalises ``7.0`` to ``7``."""
    s = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = float(s)
    except ValueError:
        return s
    if value.is_integer():
        return str(int(value))
    return s


def normalize(text: str) -> str:
    """Comparable form of any answer: numbers canonicalised, text lower-cased and trimmed."""
    number = normalize_number(text)
    if _is_number(number):
        return number
    return " ".join(text.strip().lower().rstrip(".").split())


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def gsm8k_strict(text: str) -> str | None:
    """The number after the first ``#### `` (GSM8K's own answer line)."""
    m = _STRICT.search(text)
    if m is None:
        return None
    value = normalize_number(m.group(1))
    return value if _is_number(value) else None


def gsm8k_flexible(text: str) -> str | None:
    """The last number in the text, wherever it stands."""
    matches = _FLEXIBLE.findall(text)
    for groups in reversed(matches):
        candidate = normalize_number(groups[0] or groups[1])
        if _is_number(candidate):
            return candidate
    return None


def final_line(text: str) -> str | None:
    """Whatever follows ``####`` on its line: the final answer of non-numeric tasks."""
    m = _FINAL.search(text)
    if m is None:
        return None
    value = m.group(1).strip()
    return value or None


_ANSWER = re.compile(r"(?im)^\s*(?:final\s+)?answer\s*[:\-]\s*(.+?)\s*$")
_LETTER = re.compile(r"\b([A-J])\b")
_LETTER_CUE = re.compile(r"(?i)(?:answer|option|choice)\s*(?:is|:)?\s*\(?([A-J])\)?\b")


def answer_line(text: str) -> str | None:
    """The text after the last ``Answer:`` line (case-insensitive), normalised."""
    found = _ANSWER.findall(text)
    return normalize(found[-1]) if found else None


def choice_letter(text: str) -> str | None:
    """A multiple-choice letter: after a cue ("answer is (B)") if any, else the last lone A–J."""
    cued = _LETTER_CUE.findall(text)
    if cued:
        return cued[-1].upper()
    letters = _LETTER.findall(text)
    return letters[-1] if letters else None


def json_field(name: str) -> Extractor:
    """An extractor reading ``name`` from the first JSON object in the text."""

    def extract(text: str) -> str | None:
        start = text.find("{")
        if start < 0:
            return None
        try:
            obj, _ = json.JSONDecoder().raw_decode(text[start:])
        except ValueError:
            return None
        if not isinstance(obj, dict) or name not in obj or obj[name] is None:
            return None
        value = obj[name]
        return normalize(value if isinstance(value, str) else json.dumps(value))

    extract.__name__ = f"json_field_{name}"
    return extract


def normalized_text(text: str) -> str | None:
    """The whole text, normalised (for short free-form answers)."""
    value = normalize(text)
    return value or None


def default_answer(text: str) -> str | None:
    """Our assistant's convention first (``#### value``), then an ``Answer:`` line, then
    the last number: what a vote should count when nobody said otherwise."""
    line = final_line(text)
    if line is not None:
        return normalize(line)
    return answer_line(text) or gsm8k_flexible(text)


EXTRACTORS: dict[str, Extractor] = {
    "default": default_answer,
    "strict": gsm8k_strict,
    "flexible": gsm8k_flexible,
    "final": final_line,
    "answer": answer_line,
    "letter": choice_letter,
    "text": normalized_text,
}
