"""The supervised conversations: what the assistant is shown doing well.

Each builder turns one task sample into a chat (OpenAI message dicts). The kinds mirror
the inference-time strategies, so each strategy meets a behaviour the model was taught:

- ``arith_cot``: the question, the step-by-step solution ending in ``#### N``, applying
  the changes in a random order (every order is right; see :mod:`evals.tasks.arith`).
- ``arith_direct``: asked for the final line only, answers ``#### N``.
- ``arith_tools``: writes each step's expression as ``arith_cot`` does, calls the calculator
  on it, reads the result from a tool message, then states ``#### N``.
- ``arith_reflect``: an attempt (half of them with a slip), the user asks for a check, and
  the assistant solves the problem again *in another order* (the attempt's, rotated by
  one). Agreement: the answer stands. Disagreement: a third order (rotated by two)
  decides (``Corrected:``). A slipped attempt is shown
  as context only (``"train": False``): the model is never taught to slip.
- ``facts_closed``: a seen-world question answered from memory.
- ``facts_rag``: a question followed by its passage (one, by default) in the user turn,
  answered with a citation, about *practice* kingdoms that exist nowhere else, so the
  answer can only be read from the passage.

The prompt wording comes from :mod:`assist.prompts`, shared with the strategies.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence

from assist.prompts import (
    CALCULATOR_TOOL,
    COT_SUFFIX,
    DIRECT_SUFFIX,
    REFLECT_AGAIN,
    REFLECT_DIFFER,
    REFLECT_PROMPT,
    REFLECT_STANDS,
    Passage,
    ask_with_passages,
)
from evals.tasks import ArithTask, FactsTask, Sample
from evals.tasks.arith import (
    Step,
    orders,
    parse_steps,
    random_solution,
    solution_in_order,
    solution_text,
)
from evals.tasks.facts import ATTRIBUTES

__all__ = ["KINDS", "Conversation", "build", "rotate", "slipped_attempt", "stream"]

Message = dict
Conversation = dict  # {"messages": [...], "tools": [...] | None, "kind": str}


def _user(text: str) -> Message:
    return {"role": "user", "content": text}


def _assistant(text: str, train: bool = True) -> Message:
    # "train": False marks a turn shown as context only (SFT puts no loss on it).
    return {"role": "assistant", "content": text} if train else \
        {"role": "assistant", "content": text, "train": False}


def arith_cot(sample: Sample, rng: random.Random) -> Conversation:
    question = sample.question if rng.random() < 0.5 else f"{sample.question} {COT_SUFFIX}"
    return {"messages": [_user(question), _assistant(random_solution(sample, rng))]}


def arith_direct(sample: Sample, rng: random.Random) -> Conversation:
    return {"messages": [_user(f"{sample.question} {DIRECT_SUFFIX}"),
                         _assistant(f"#### {sample.answer}")]}


def arith_tools(sample: Sample, rng: random.Random) -> Conversation:
    messages: list[Message] = [_user(sample.question)]
    sentences = sample.metadata["sentences"]
    for i, step in enumerate(parse_steps(sample)):
        call_id = f"call_{i}"
        # The step's sentence, then its expression written as chain of thought writes it
        # ("Max first loses 26: 658-26"): finding the amount is the skill cot practises in
        # every arith document, and the call then copies the expression just written.
        # Without the restated expression the call had to find the amount from inside the
        # JSON, which the model practised only here, and copied 38% of operands right.
        lead = f"{sentences[0]}\n" if i == 0 else ""
        messages.append({"role": "assistant",
                         "content": f"{lead}{sentences[i + 1].rstrip('.')}: {step.expression} ",
                         "tool_calls": [{
            "id": call_id, "type": "function",
            "function": {"name": "calculator", "arguments": {"expression": step.expression}},
        }]})
        messages.append({"role": "tool", "tool_call_id": call_id, "content": str(step.result)})
    messages.append(_assistant(f"#### {sample.answer}"))
    return {"messages": messages, "tools": [CALCULATOR_TOOL]}


# The slips a model makes adding in its head: a dropped or extra carry, a digit off by one.
_SLIPS = (-100, 100, -10, 10, -1, 1, -20, 20, -2, 2)


def slipped_attempt(sample: Sample, order: Sequence[int], rng: random.Random) -> str:
    """A solution in ``order`` with one result written wrong and carried on from there."""
    changes = sample.metadata["changes"]
    at = rng.randrange(len(order))
    value, steps, written = sample.metadata["start"], [], []
    for i, j in enumerate(order):
        op, b = changes[j]
        steps.append(Step(value, op, b))
        value = steps[-1].result
        if i == at:
            value += rng.choice([d for d in _SLIPS if value + d >= 0])
        written.append(value)
    return solution_text(sample.metadata["sentences"], steps, written, order=order)


def rotate(order: Sequence[int], by: int) -> tuple[int, ...]:
    """The order shifted left by ``by``: (0, 1, 2) -> (1, 2, 0) -> (2, 0, 1).

    Reflection re-solves in the attempt's order rotated by one, then by two: each solution
    starts with another step and meets every change at another position, so it meets
    other intermediate numbers. A fixed rule is easy to learn: begin with the attempt's
    second step (one line to copy), not "any order but that one".
    """
    by %= max(1, len(order))
    return tuple(order[by:]) + tuple(order[:by])


def arith_reflect(sample: Sample, rng: random.Random) -> Conversation:
    """Check by solving again another way: the second order agrees, or a third decides."""
    all_orders = orders(sample)
    first = rng.choice(all_orders)
    slip = rng.random() < 0.5
    attempt = slipped_attempt(sample, first, rng) if slip else solution_in_order(sample, first)
    rotations = len(all_orders) > 1
    second = rotate(first, 1) if rotations else first
    check = f"{REFLECT_AGAIN}\n{solution_in_order(sample, second)}\n"
    if not slip:
        check += f"{REFLECT_STANDS}\n#### {sample.answer}"
    else:
        third = rotate(first, 2) if rotations else first
        check += f"{REFLECT_DIFFER}\n{solution_in_order(sample, third)}"
    return {"messages": [
        _user(sample.question),
        _assistant(attempt, train=not slip),
        _user(REFLECT_PROMPT),
        _assistant(check),
    ]}


def facts_closed(sample: Sample, rng: random.Random) -> Conversation:
    return {"messages": [_user(sample.question), _assistant(sample.solution)]}


def facts_rag(rng: random.Random, task: FactsTask, n_passages: int = 1) -> Conversation:
    """Open-book practice: the asked kingdom is drawn fresh, so only its passage knows it.

    The passage follows the question in the user turn, and the question is asked again
    after it (``assist.prompts.ask_with_passages`` says why). Distractors (``n_passages`` > 1) are practice kingdoms too: neither seen
    nor unseen world passages ever appear in a training conversation's context.
    """
    right = task.practice(rng)
    chosen = [right, *(task.practice(rng) for _ in range(n_passages - 1))]
    rng.shuffle(chosen)
    passages = [Passage(e.id, task.passage(e, rng)) for e in chosen]
    question = task.question(right, rng.choice(list(ATTRIBUTES)))
    return {"messages": [
        _user(ask_with_passages(question.question, passages)),
        _assistant(task.answer_with_citation(question)),
    ]}


KINDS = ("arith_cot", "arith_direct", "arith_tools", "arith_reflect", "facts_closed", "facts_rag")


def build(kind: str, sample: Sample | None, rng: random.Random, facts: FactsTask) -> Conversation:
    builders: dict[str, Callable[..., Conversation]] = {
        "arith_cot": arith_cot, "arith_direct": arith_direct, "arith_tools": arith_tools,
        "arith_reflect": arith_reflect, "facts_closed": facts_closed,
    }
    if kind == "facts_rag":
        conv = facts_rag(rng, facts)
    else:
        assert sample is not None
        conv = builders[kind](sample, rng)
    conv.setdefault("tools", None)
    conv["kind"] = kind
    return conv


def stream(
    mixture: dict[str, float], arith: ArithTask, facts: FactsTask, n: int, seed: str,
) -> Iterator[Conversation]:
    """``n`` conversations drawn by ``mixture`` from the tasks' *train* splits only."""
    unknown = set(mixture) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown conversation kinds {sorted(unknown)}; expected {KINDS}")
    rng = random.Random(f"conversations:{seed}")
    kinds = [k for k in mixture if mixture[k] > 0]
    weights = [mixture[k] for k in kinds]
    picks = rng.choices(kinds, weights, k=n)
    n_arith = sum(k.startswith("arith") for k in picks)
    arith_samples = iter(arith.split("train", n_arith)) if n_arith else iter(())
    facts_train = facts.split("train")
    for kind in picks:
        if kind.startswith("arith"):
            sample: Sample | None = next(arith_samples)
        elif kind == "facts_closed":
            sample = facts_train[rng.randrange(len(facts_train))]
        else:
            sample = None
        yield build(kind, sample, rng, facts)
