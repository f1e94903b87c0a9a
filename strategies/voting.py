"""Majority voting over extracted answers: the one rule ``sc`` and ``bon`` (and the
maj@k curve in ``evals.claims``) count votes by.

Tie rule (deterministic, documented): among answers with the same vote, the one that
appeared first in sample order wins. ``None`` answers (no parsable answer) do not vote.
"""

from __future__ import annotations

__all__ = ["vote"]


def vote(answers: list[str | None], weights: list[float] | None = None) -> tuple[str | None, dict[str, float]]:
    """(winner, tally); ties go to the answer seen first. ``None`` answers do not vote."""
    tally: dict[str, float] = {}
    for i, answer in enumerate(answers):
        if answer is not None:
            tally[answer] = tally.get(answer, 0.0) + (weights[i] if weights else 1.0)
    if not tally:
        return None, tally
    best = max(tally.values())
    winner = next(a for a in tally if tally[a] == best)  # dicts keep first-seen order
    return winner, tally
