"""What a model can do with numbers and with the world's facts, read teacher-forced.

Greedy accuracy says *that* a model fails; these say *why*. :func:`facts_probe` (below)
splits the facts into recall and reading. For numbers, each held-out ``arith``
problem is written as pretraining writes it (question, newline, a worked solution) and
the model reads it once. Every number of the solution falls in one of three kinds, and a
number counts as right when the model's top token is right at each of its digits:

- ``operand_copy``: an operand's first appearance in the solution ("Max next uses 46:"),
  found only by matching the phrase before it in the question, a key several tokens deep
  ("next uses 4" must not read "then uses 45"). The ability emerges late and suddenly in
  pretraining, and a model without it fails at every strategy.
- ``context_copy``: a number the text just wrote (the running amount carried to the next
  line, an operand repeated inside its own line): the easy copy.
- ``arithmetic``: a number that appears nowhere before, the result of a computation done
  in the head.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerFast

from evals.tasks import ArithTask, FactsTask, Sample
from evals.tasks.arith import random_solution
from evals.tasks.facts import ATTRIBUTES

__all__ = ["KINDS", "arith_probe", "facts_probe", "number_kinds", "number_probe"]

KINDS = ("operand_copy", "context_copy", "arithmetic")


def number_kinds(tokens: Sequence[str], question_end: int, question_numbers: set[str]) -> list[tuple[int, int, str]]:
    """(start, end, kind) of every number after ``question_end`` in a token list whose
    digits are tokens of their own (the tokenizer splits digits one by one)."""
    spans, seen, written, i = [], set(), set(), 0
    while i < len(tokens):
        if not tokens[i].isdigit():
            i += 1
            continue
        j = i
        while j < len(tokens) and tokens[j].isdigit():
            j += 1
        number = "".join(tokens[i:j])
        if i >= question_end:
            if number not in seen:
                kind = "arithmetic"
            elif number in question_numbers and number not in written and written:
                kind = "operand_copy"  # the solution's first number restates the start: easy
            else:
                kind = "context_copy"
            spans.append((i, j, kind))
            written.add(number)
        seen.add(number)
        i = j
    return spans


def _top_tokens(model: torch.nn.Module, ids: list[int]) -> list[int]:
    """The model's top next token at every position of ``ids``, read in one pass."""
    device = next(model.parameters()).device
    return model(input_ids=torch.tensor([ids], device=device)).logits[0].argmax(-1).tolist()


def _span_right(predicted: list[int], ids: list[int], start: int, end: int) -> bool:
    """Whether the top token was right at each token of ``ids[start:end]``."""
    return all(predicted[k - 1] == ids[k] for k in range(start, end))


@torch.no_grad()
def number_probe(model: torch.nn.Module, tok: PreTrainedTokenizerFast, samples: Sequence[Sample],
                 seed: int = 0) -> dict[str, float | int]:
    """Share of each kind of number the model predicts right, how many were scored, of how
    many problems."""
    rng = random.Random(f"number-probe:{seed}")
    right = dict.fromkeys(KINDS, 0)
    total = dict.fromkeys(KINDS, 0)
    was_training = model.training
    model.eval()
    for s in samples:
        question = tok.encode(f"{s.question}\n", add_special_tokens=False)
        ids = question + tok.encode(random_solution(s, rng), add_special_tokens=False)
        tokens = tok.convert_ids_to_tokens(ids)
        predicted = _top_tokens(model, ids)
        for start, end, kind in number_kinds(tokens, len(question), set(re.findall(r"\d+", s.question))):
            total[kind] += 1
            right[kind] += _span_right(predicted, ids, start, end)
    model.train(was_training)
    return {**{k: round(right[k] / total[k], 4) if total[k] else 0.0 for k in KINDS},
            **{f"{k}_n": total[k] for k in KINDS}, "problems": len(samples)}


def arith_probe(model: torch.nn.Module, tok: PreTrainedTokenizerFast, arith: ArithTask, n: int = 64,
                seed: int = 0) -> dict[str, float | int]:
    """:func:`number_probe` on the first ``n`` held-out test problems."""
    return number_probe(model, tok, arith.split("test", n), seed)


@torch.no_grad()
def facts_probe(model: torch.nn.Module, tok: PreTrainedTokenizerFast, facts: FactsTask, n: int = 30,
                seed: int = 0) -> dict[str, float | int]:
    """What a model knows of the fictional world, and whether it can read a passage.

    Teacher-forced, on the first ``n`` seen and ``n`` unseen kingdoms, every attribute,
    right when the top token is right at each token of the value.

    - ``recall``: a seen kingdom's fact with nothing in context, in the passages' wording
      ("The capital of Nurbreakfea is"): knowledge in the weights (closed book needs it).
    - ``read``: an unseen kingdom's fact right after its passage, as an answer states it
      ("Its capital is"): copying a word out of context by what precedes it (retrieval
      needs it; a year alone is copied like an operand, so 0.25 means digits only).
    """
    rng = random.Random(f"facts-probe:{seed}")
    was_training = model.training
    model.eval()

    def right(context: str, head: str, value: str) -> bool:
        prompt = tok.encode(context + head, add_special_tokens=False)
        ids = tok.encode(f"{context}{head} {value}", add_special_tokens=False)
        return _span_right(_top_tokens(model, ids), ids, len(prompt), len(ids))

    scores: dict[str, list[bool]] = {"recall": [], "read": []}
    for kind, seen in (("recall", True), ("read", False)):
        for entity in [e for e in facts.entities if e.seen == seen][:n]:
            context = "" if seen else facts.passage(entity, rng) + "\n"
            for attribute in ATTRIBUTES:
                claim = facts.statement(entity, attribute) if seen else facts.claim(entity, attribute)
                value = entity.value(attribute)
                scores[kind].append(right(context, claim.removesuffix(f" {value}"), value))
    model.train(was_training)
    return {**{k: round(sum(v) / len(v), 4) if v else 0.0 for k, v in scores.items()},
            **{f"{k}_n": len(v) for k, v in scores.items()}}
