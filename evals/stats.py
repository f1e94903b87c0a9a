"""Statistics for eval results: intervals, paired tests, and the k-sample accuracies.

Everything here is a pure function of plain sequences (numpy only, no scipy), so the report
can be recomputed from ``samples.jsonl`` alone and the numbers are checkable by hand:

- ``wilson``: the Wilson score interval for a binomial proportion; unlike the normal
  interval it stays inside [0, 1] and is sane at 0/n and n/n, which small evals hit often.
- ``bootstrap_ci`` / ``paired_bootstrap``: percentile bootstrap over *items*; items are the
  unit of sampling (runs of one item are correlated), so items are what we resample.
- ``mcnemar``: the paired test on binary outcomes of two strategies over the same items.
- ``majority_at_k`` / ``pass_at_k``: how accuracy grows with the number of samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import numpy as np

__all__ = [
    "MCNEMAR_EXACT_MAX",
    "PairedResult",
    "bootstrap_ci",
    "majority_at_k",
    "majority_index",
    "mcnemar",
    "mean_pass_at_k",
    "pass_at_k",
    "percentile",
    "paired_bootstrap",
    "wilson",
]

# Up to this many discordant pairs McNemar uses the exact binomial test; above it the
# continuity-corrected chi-square, the textbook rule of thumb (its error is then negligible).
MCNEMAR_EXACT_MAX = 25

Tie = Literal["first", "none"]


class PairedResult(NamedTuple):
    """Mean paired difference ``b - a`` with its bootstrap CI and two-sided p-value."""

    delta: float
    lo: float
    hi: float
    p: float


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for ``successes / n``; ``(0, 1)`` when ``n == 0`` (no information)."""
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes}/{n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # Clamp only float noise: at 0/n the lower bound is exactly 0 in closed form.
    return max(0.0, centre - half), min(1.0, centre + half)


def _as_array(values: Sequence[float], name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence")
    return arr


def _boot_means(values: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Means of ``n_boot`` resamples (with replacement) of ``values``; seeded, so reproducible."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, values.size, size=(n_boot, values.size))
    return values[idx].mean(axis=1)


def bootstrap_ci(
    values: Sequence[float], *, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float]:
    """Percentile-bootstrap ``1 - alpha`` interval of the mean of ``values``."""
    arr = _as_array(values, "values")
    means = _boot_means(arr, n_boot, seed)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def paired_bootstrap(
    a: Sequence[float],
    b: Sequence[float],
    *,
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> PairedResult:
    """Paired bootstrap of ``mean(b - a)`` over items (``a[i]`` and ``b[i]`` are the same item).

    Resampling the per-item differences keeps the pairing, which is what makes the test far
    more sensitive than comparing two independent intervals. The two-sided p-value is the
    bootstrap sign test: the share of resampled deltas that land on the other side of 0 from
    the observed delta (a resampled delta of exactly 0 counts as "other side", so ties make
    it conservative), times 2, capped at 1; an observed delta of 0 gives p = 1. Its
    resolution is ``1 / n_boot``, so p = 0 means "below 1 / n_boot", not "impossible".
    """
    xa, xb = _as_array(a, "a"), _as_array(b, "b")
    if xa.size != xb.size:
        raise ValueError(f"paired samples differ in length: {xa.size} vs {xb.size}")
    diff = xb - xa
    delta = float(diff.mean())
    means = _boot_means(diff, n_boot, seed)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    if delta > 0:
        p = 2.0 * float(np.mean(means <= 0))
    elif delta < 0:
        p = 2.0 * float(np.mean(means >= 0))
    else:
        p = 1.0
    return PairedResult(delta, float(lo), float(hi), min(1.0, p))


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> tuple[int, int, float]:
    """McNemar's test on paired binary outcomes; returns ``(b01, b10, p)``, two-sided.

    ``b01`` counts items ``a`` got wrong and ``b`` right, ``b10`` the reverse; concordant
    items carry no information about which is better. With at most ``MCNEMAR_EXACT_MAX``
    discordant pairs, p is the exact binomial test (``Binomial(b01 + b10, 1/2)``, doubled
    smaller tail, capped at 1); above it, chi-square with 1 df and the continuity
    correction, ``(|b01 - b10| - 1)^2 / (b01 + b10)``. No discordant pairs gives p = 1.
    """
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}")
    b01 = sum(1 for x, y in zip(a, b, strict=True) if not x and y)
    b10 = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    n = b01 + b10
    if n == 0:
        return b01, b10, 1.0
    if n <= MCNEMAR_EXACT_MAX:
        # Exact integer tail sum, divided once: no float underflow or rounding in the sum.
        tail = sum(math.comb(n, i) for i in range(min(b01, b10) + 1))
        return b01, b10, min(1.0, 2.0 * tail / 2**n)
    chi2 = (abs(b01 - b10) - 1) ** 2 / n
    # Survival function of chi-square with 1 df: P(X > x) = erfc(sqrt(x / 2)).
    return b01, b10, math.erfc(math.sqrt(chi2 / 2))


def majority_index(answers: Sequence[str | None], *, tie: Tie = "first") -> int | None:
    """Index of the first run whose answer wins the vote among ``answers``, or None.

    ``None`` answers (unparsable, errored) do not vote. On a tie, ``"first"`` picks the tied
    answer seen first, ``"none"`` returns None (the tie counts as no answer). None also when
    nobody voted. Returning an index, not the answer, lets callers reuse that run's scorer
    verdict instead of re-judging the string.
    """
    if tie not in ("first", "none"):
        raise ValueError(f"tie must be 'first' or 'none', got {tie!r}")
    counts: dict[str, int] = {}
    first_at: dict[str, int] = {}
    for i, ans in enumerate(answers):
        if ans is None:
            continue
        counts[ans] = counts.get(ans, 0) + 1
        first_at.setdefault(ans, i)
    if not counts:
        return None
    top = max(counts.values())
    winners = [ans for ans in counts if counts[ans] == top]  # dict order = first seen
    if len(winners) > 1 and tie == "none":
        return None
    return first_at[winners[0]]


def majority_at_k(
    answers: Sequence[Sequence[str | None]],
    references: Sequence[str],
    k: int,
    *,
    tie: Tie = "first",
) -> float:
    """Accuracy over items of the majority answer of each item's first ``k`` runs.

    Correct means the winning answer equals the reference string exactly; callers with
    fuzzier scorers should use ``majority_index`` and the winning run's own verdict.
    """
    if len(answers) != len(references):
        raise ValueError(f"{len(answers)} answer lists for {len(references)} references")
    if not answers:
        raise ValueError("no items")
    hits = 0
    for runs, ref in zip(answers, references, strict=True):
        if len(runs) < k or k < 1:
            raise ValueError(f"k={k} but an item has {len(runs)} runs")
        idx = majority_index(runs[:k], tie=tie)
        hits += idx is not None and runs[idx] == ref
    return hits / len(answers)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct (Chen et al. 2021).

    ``1 - C(n - c, k) / C(n, k)``: the chance that ``k`` samples drawn without replacement
    from the ``n`` include a correct one. Exact integer binomials, one float division.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def mean_pass_at_k(correct_lists: Sequence[Sequence[bool]], k: int) -> float:
    """Mean over items of ``pass_at_k`` with each item's own run count and correct count."""
    if not correct_lists:
        raise ValueError("no items")
    return sum(pass_at_k(len(c), sum(map(bool, c)), k) for c in correct_lists) / len(
        correct_lists
    )


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between order statistics."""
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    arr = _as_array(values, "values")
    return float(np.percentile(arr, q, method="linear"))
