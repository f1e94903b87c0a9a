"""The supervised conversations: what the assistant is shown doing well.

Each builder turns one task sample into a chat (OpenAI message dicts). The kinds mirror
the inference-time strategies, so each strategy meets a behaviour the model was taught:

- ``arith_cot``: the question, the step-by-step solution ending in ``#### N``.
- ``arith_direct``: asked for the final line only, answers ``#### N``.
- ``arith_tools``: calls the calculator once per step, reads each result from a tool
  message, then states ``#### N``.
- ``arith_reflect``: an attempt (half of them with a slip), the user asks for a check, the
  assistant re-derives each step and either says the answer stands or corrects it.
- ``facts_closed``: a seen-world question answered from memory.
- ``facts_rag``: the same with passages in the system message (the right one among
  distractors), answered with a citation.

The prompt wording comes from :mod:`assist._prompts`, shared with the strategies.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

from assist._prompts import (
    CALCULATOR_TOOL,
    COT_SUFFIX,
    DIRECT_SUFFIX,
    REFLECT_PROMPT,
    REFLECT_STANDS,
    Passage,
    render_passages,
)
from evals.tasks import ArithTask, FactsTask, Sample
from evals.tasks.arith import Step, parse_steps, solution_text

__all__ = ["KINDS", "Conversation", "build", "stream"]

Message = dict
Conversation = dict  # {"messages": [...], "tools": [...] | None, "kind": str}


def _user(text: str) -> Message:
    return {"role": "user", "content": text}


def _assistant(text: str) -> Message:
    return {"role": "assistant", "content": text}


def arith_cot(sample: Sample, rng: random.Random) -> Conversation:
    question = sample.question if rng.random() < 0.5 else f"{sample.question} {COT_SUFFIX}"
    return {"messages": [_user(question), _assistant(sample.solution)]}


def arith_direct(sample: Sample, rng: random.Random) -> Conversation:
    return {"messages": [_user(f"{sample.question} {DIRECT_SUFFIX}"),
                         _assistant(f"#### {sample.answer}")]}


def arith_tools(sample: Sample, rng: random.Random) -> Conversation:
    messages: list[Message] = [_user(sample.question)]
    sentences = sample.metadata["sentences"]
    for i, step in enumerate(parse_steps(sample)):
        call_id = f"call_{i}"
        # The step's sentence first, so the operands sit right before the call.
        lead = f"{sentences[0]}\n" if i == 0 else ""
        messages.append({"role": "assistant", "content": f"{lead}{sentences[i + 1].rstrip('.')}: ",
                         "tool_calls": [{
            "id": call_id, "type": "function",
            "function": {"name": "calculator", "arguments": {"expression": step.expression}},
        }]})
        messages.append({"role": "tool", "tool_call_id": call_id, "content": str(step.result)})
    messages.append(_assistant(f"#### {sample.answer}"))
    return {"messages": messages, "tools": [CALCULATOR_TOOL]}


def _attempt(steps: list[Step], rng: random.Random) -> list[tuple[Step, int]]:
    """The chain as (step, written result); half the time one result slips and is carried."""
    slip = rng.randrange(len(steps)) if rng.random() < 0.5 else -1
    out: list[tuple[Step, int]] = []
    value = steps[0].a
    for i, step in enumerate(steps):
        s = Step(value, step.op, step.b)
        written = s.result + (rng.choice((-2, -1, 1, 2)) if i == slip else 0)
        out.append((s, written))
        value = written
    return out


def arith_reflect(sample: Sample, rng: random.Random) -> Conversation:
    attempt = _attempt(parse_steps(sample), rng)
    checks = []
    for s, written in attempt:
        if written != s.result:
            checks.append(f"{s.expression}={written} wrong, {s.expression}={s.result}")
            checks.append(f"Corrected:\n{sample.solution}")
            break
        checks.append(f"{s.expression}={written} correct")
    else:
        checks.append(f"{REFLECT_STANDS}\n#### {attempt[-1][1]}")
    return {"messages": [
        _user(sample.question),
        _assistant(solution_text(sample.metadata["sentences"], [s for s, _ in attempt],
                                 [w for _, w in attempt])),
        _user(REFLECT_PROMPT),
        _assistant("\n".join(checks)),
    ]}


def facts_closed(sample: Sample, rng: random.Random) -> Conversation:
    return {"messages": [_user(sample.question), _assistant(sample.solution)]}


def facts_rag(sample: Sample, rng: random.Random, task: FactsTask, n_passages: int = 3) -> Conversation:
    right = task.entity(sample.metadata["entity"])
    # Distractors come from the seen world too: unseen kingdoms stay out of all training text.
    seen = [e for e in task.entities if e.seen and e.id != right.id]
    others = rng.sample(seen, n_passages - 1)
    chosen = [right, *others]
    rng.shuffle(chosen)
    passages = [Passage(e.id, task.passage(e)) for e in chosen]
    return {"messages": [
        {"role": "system", "content": render_passages(passages)},
        _user(sample.question),
        _assistant(task.answer_with_citation(sample)),
    ]}


KINDS = ("arith_cot", "arith_direct", "arith_tools", "arith_reflect", "facts_closed", "facts_rag")


def build(kind: str, sample: Sample, rng: random.Random, facts: FactsTask) -> Conversation:
    builders: dict[str, Callable[..., Conversation]] = {
        "arith_cot": arith_cot, "arith_direct": arith_direct, "arith_tools": arith_tools,
        "arith_reflect": arith_reflect, "facts_closed": facts_closed,
    }
    conv = facts_rag(sample, rng, facts) if kind == "facts_rag" else builders[kind](sample, rng)
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
            sample = next(arith_samples)
        else:
            sample = facts_train[rng.randrange(len(facts_train))]
        yield build(kind, sample, rng, facts)
