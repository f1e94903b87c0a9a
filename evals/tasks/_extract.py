"""Answer extractors: read the final answer out of a model's free text.

GSM8K's two conventions, as lm-eval implements them: *strict* takes the number after
``####``; *flexible* takes the last number anywhere. Both normalise the way lm-eval does
(drop ``,`` and ``$``, a trailing ``.``), so "1,000." and "$1000" both read as ``1000``.
"""

from __future__ import annotations

import re

__all__ = ["final_line", "gsm8k_flexible", "gsm8k_strict", "normalize", "normalize_number"]

_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_FINAL = re.compile(r"####[ \t]*([^\n]*)")


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
