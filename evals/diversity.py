"""Mode-collapse measures: how varied a model's samples are.

RLHF'd models lose entropy (the talk's "mode collapse"). Two views of it, over ``K``
samples per prompt at temperature 1:

- mean per-token entropy of the model's next-token distribution along its own samples;
- EAD distinct-n (expectation-adjusted distinct n-grams, Liu et al. 2022): distinct
  n-grams divided by the number a uniform draw of the same size from the vocabulary would
  give, ``V * (1 - ((V - 1) / V) ** C)``, so long and short sample sets compare fairly.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["distinct_n", "ead_distinct_n", "mean_entropy"]


def _ngrams(seqs: Sequence[Sequence[int]], n: int) -> list[tuple[int, ...]]:
    return [tuple(s[i: i + n]) for s in seqs for i in range(len(s) - n + 1)]


def distinct_n(seqs: Sequence[Sequence[int]], n: int) -> float:
    grams = _ngrams(seqs, n)
    return len(set(grams)) / len(grams) if grams else 0.0


def ead_distinct_n(seqs: Sequence[Sequence[int]], n: int, vocab_size: int) -> float:
    if vocab_size < 2:
        raise ValueError("vocab_size must be at least 2")
    grams = _ngrams(seqs, n)
    if not grams:
        return 0.0
    v = float(vocab_size)
    expected = v * (1.0 - ((v - 1.0) / v) ** len(grams))
    return len(set(grams)) / expected


def mean_entropy(per_sequence: Sequence[Sequence[float]]) -> float:
    values = [x for s in per_sequence for x in s]
    return sum(values) / len(values) if values else 0.0
