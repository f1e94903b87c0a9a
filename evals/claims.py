"""The demo's claims, computed from eval records: each function is one figure of the report.

Records are the lines of ``samples.jsonl`` (:func:`evals.report.read_samples`): one per
(item, strategy) with its runs. Everything here is pure: numbers in, numbers out, so each
diagnostic is unit-tested on hand-made records.

- :func:`per_item` / :func:`paired`: a claim "A beats B" judged on the items both ran, by
  the paired bootstrap; it is *shown* only when the 95% interval of the difference excludes 0.
- :func:`maj_at_k_from_votes`: the self-consistency curve maj@k, k = 1..K, read from the
  votes ``sc@K`` recorded (its samples in order), so the curve costs no extra model calls.
- :func:`tool_copy_accuracy`: how often the model copied the right operands into its
  calculator calls: the diagnostic that separates "cannot read" from "cannot compute".
- :func:`recommend`: the talk's default recommendation ("first get the best performance,
  then optimise cost"): the most accurate strategy and the cheapest within a margin of it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from evals.stats import paired_bootstrap
from strategies.extract import normalize
from strategies.voting import vote

__all__ = [
    "Paired",
    "maj_at_k_from_votes",
    "paired",
    "per_item",
    "recommend",
    "tool_copy_accuracy",
]

Record = Mapping[str, Any]


def per_item(records: Sequence[Record], strategy: str,
             keep: Callable[[str], bool] | None = None) -> dict[str, float]:
    """Each item's accuracy for one strategy (mean over its runs; an errored run counts wrong).

    ``keep`` filters items by id (for example the seen or unseen half of ``facts``).
    """
    out = {}
    for r in records:
        if r["strategy"] == strategy and r["runs"] and (keep is None or keep(r["item"])):
            out[r["item"]] = sum(bool(x["correct"]) and not x.get("error") for x in r["runs"]) / len(r["runs"])
    return out


@dataclass(frozen=True)
class Paired:
    """``better`` against ``worse`` on the items both ran: accuracies and the paired delta."""

    better: str
    worse: str
    n: int
    acc_better: float
    acc_worse: float
    delta: float
    lo: float
    hi: float

    @property
    def verdict(self) -> str:
        if self.n == 0:
            return "not run"
        if self.lo > 0:
            return "shown"
        if self.hi < 0:
            return "reversed"
        return "not significant"

    def text(self) -> str:
        if self.n == 0:
            return f"`{self.better}` vs `{self.worse}`: not run"
        return (f"`{self.better}` {100 * self.acc_better:.1f}% vs `{self.worse}` {100 * self.acc_worse:.1f}% "
                f"on {self.n} items: Δ {100 * self.delta:+.1f} points "
                f"[{100 * self.lo:+.1f}, {100 * self.hi:+.1f}]")


def paired(better: Mapping[str, float], worse: Mapping[str, float], names: tuple[str, str],
           seed: int = 0) -> Paired:
    """The paired bootstrap of per-item accuracies (see :func:`per_item`)."""
    common = sorted(set(better) & set(worse))
    if not common:
        return Paired(*names, 0, 0.0, 0.0, 0.0, 0.0, 0.0)
    res = paired_bootstrap([worse[i] for i in common], [better[i] for i in common], seed=seed)
    mean = lambda d: sum(d[i] for i in common) / len(common)  # noqa: E731
    return Paired(names[0], names[1], len(common), mean(better), mean(worse), res.delta, res.lo, res.hi)


def maj_at_k_from_votes(records: Sequence[Record], strategy: str) -> dict[str, dict[int, float]]:
    """maj@k and pass@k for k = 1..K from the vote ``strategy`` (an ``sc@K``) recorded.

    The vote keeps its samples' answers in the order drawn, so the first k of them are k
    independent samples: maj@k is the accuracy of their majority, pass@k the share of
    items where one of them is right. Only runs with a vote count; K is the smallest
    number of samples any of them drew. Empty dicts when nothing voted.
    """
    votes: list[tuple[list[str | None], str]] = []
    for r in records:
        if r["strategy"] != strategy:
            continue
        for run in r["runs"]:
            cast = next((t for t in run.get("trace") or [] if t.get("step") == "vote"), None)
            if cast is not None and cast.get("answers"):
                votes.append((list(cast["answers"]), normalize(str(r["reference"]))))
    maj: dict[int, float] = {}
    pas: dict[int, float] = {}
    if votes:
        for k in range(1, min(len(a) for a, _ in votes) + 1):
            right = hit = 0
            for answers, gold in votes:
                winner, _ = vote(answers[:k])  # sc's own rule: first seen wins ties
                right += winner is not None and normalize(winner) == gold
                hit += any(a is not None and normalize(a) == gold for a in answers[:k])
            maj[k], pas[k] = right / len(votes), hit / len(votes)
    return {"maj_at_k": maj, "pass_at_k": pas}


_EXPR = re.compile(r"\s+")


def _expected_calls(start: int, changes: Sequence[Sequence[Any]], results: Sequence[str | None]) -> list[str]:
    """The expression each calculator call should carry, given what earlier calls returned.

    Call i applies change i (question order) to the amount the model last read: the start
    for the first call, the previous call's result after that. So a wrong earlier result
    (impossible with the calculator) or a wrong earlier copy does not count twice.
    """
    expected, value = [], str(start)
    for i, (op, b) in enumerate(changes):
        expected.append(f"{value}{op}{b}")
        if i < len(results) and results[i] is not None:
            value = str(results[i])
    return expected


def tool_copy_accuracy(records: Sequence[Record], samples: Mapping[str, Any],
                       strategy: str = "tools") -> dict[str, float | int]:
    """How often the calculator calls of ``strategy`` carry the question's operands.

    ``samples`` maps item id to its :class:`~evals.tasks.Sample` (an ``arith`` one, whose
    metadata holds the start and the changes). A call is right when its expression, spaces
    removed, is exactly the one expected at its position; an item is right when it made
    exactly one right call per change. Returns the call-level and item-level accuracy and
    the numbers they rest on.
    """
    calls = right_calls = items = right_items = 0
    for r in records:
        sample = samples.get(r["item"])
        if r["strategy"] != strategy or sample is None:
            continue
        changes = sample.metadata["changes"]
        for run in r["runs"]:
            steps = [t for t in run.get("trace") or [] if t.get("step") == "tool" and t.get("name") == "calculator"]
            made = [_EXPR.sub("", str((t.get("arguments") or {}).get("expression", ""))) for t in steps]
            expected = _expected_calls(sample.metadata["start"], changes, [t.get("result") for t in steps])
            ok = [m == e for m, e in zip(made, expected, strict=False)]
            calls += len(made)
            right_calls += sum(ok)
            items += 1
            right_items += len(made) == len(changes) and all(ok)
    return {"call_accuracy": right_calls / calls if calls else 0.0, "calls": calls,
            "item_accuracy": right_items / items if items else 0.0, "items": items}


def recommend(summary: Mapping[str, Mapping[str, Any]], margin: float = 0.02) -> dict[str, Any] | None:
    """The most accurate strategy, and the cheapest (tokens per item) within ``margin`` of it.

    ``summary`` maps strategy to its :func:`evals.report.summarize` row (``accuracy`` and
    ``tokens_per_item``). Ties in accuracy go to the cheaper strategy.
    """
    rows = {s: (float(r["accuracy"]), float(r["tokens_per_item"]["total"])) for s, r in summary.items()}
    if not rows:
        return None
    best = max(rows, key=lambda s: (rows[s][0], -rows[s][1]))
    near = [s for s in rows if rows[s][0] >= rows[best][0] - margin - 1e-12]
    cheapest = min(near, key=lambda s: (rows[s][1], -rows[s][0]))
    return {"best": best, "best_accuracy": rows[best][0], "best_tokens": rows[best][1],
            "cheapest": cheapest, "cheapest_accuracy": rows[cheapest][0], "cheapest_tokens": rows[cheapest][1],
            "margin": margin}
