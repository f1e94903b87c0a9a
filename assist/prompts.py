"""Prompt conventions the assistant is trained on and the strategies speak.

Training (SFT turns) and strategies (issue: inference-time strategies) both import these,
so the small model sees at inference exactly the phrasing it learned. Remote models get the
same, plain-English instructions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "COT_SUFFIX",
    "DIRECT_SUFFIX",
    "RAG_SYSTEM",
    "REFLECT_AGAIN",
    "REFLECT_DIFFER",
    "REFLECT_PROMPT",
    "REFLECT_STANDS",
    "CALCULATOR_TOOL",
    "Passage",
    "ask_with_passages",
    "render_passages",
]

# Chain of thought is the assistant's default; "direct" asks for the final line alone.
COT_SUFFIX = "Think step by step."
DIRECT_SUFFIX = "Answer with the final line only."

# Reflection: after an attempt the user asks for a check; the check ends either with this
# sentence (the answer stands) or with a corrected solution.
REFLECT_PROMPT = "Check your work step by step."
REFLECT_STANDS = "The answer stands."
# The assistant checks by solving again in another order; when the answers differ it
# solves once more and that solution is the correction.
REFLECT_AGAIN = "Solving it again in another order:"
REFLECT_DIFFER = "The answers differ. Corrected:"

RAG_SYSTEM = "Answer from the passages below and cite the passage id in brackets."  # after the question


@dataclass(frozen=True)
class Passage:
    """A retrieved passage: its stable id, its text, and the retriever's score."""

    id: str
    text: str
    score: float = 0.0


def render_passages(passages: Sequence[Passage]) -> str:
    """Retrieved passages as the block that follows the question, ids first."""
    lines = [RAG_SYSTEM, ""]
    lines += [f"[{p.id}] {p.text}" for p in passages]
    return "\n".join(lines)


def ask_with_passages(question: str, passages: Sequence[Passage]) -> str:
    """The open-book user turn: the question, its passages, then the question again.

    Passages after the question, since a small model reads a value by what precedes it;
    the question again after them, since with only the passages between the question and
    the answer the tiny model stopped reading which attribute was asked (it answered
    capital questions with the currency): asked again, seed 0's SFT model answered 81% of
    unseen kingdoms' questions instead of 72% (README: Retrieval).
    """
    return f"{question}\n\n{render_passages(passages)}\n\n{question}"


# The OpenAI function schema of the built-in calculator (the tools strategy executes it).
CALCULATOR_TOOL = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string"}},
            "required": ["expression"],
        },
    },
}
