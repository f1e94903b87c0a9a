"""What a pretrained model can do with numbers, read teacher-forced from held-out problems.

Greedy accuracy says *that* a base model fails; this says *why*. Each held-out ``arith``
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

from evals.tasks import ArithTask, Sample
from evals.tasks.arith import random_solution

__all__ = ["KINDS", "arith_probe", "number_kinds", "number_probe"]

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
    device = next(model.parameters()).device
    for s in samples:
        question = tok.encode(f"{s.question}\n", add_special_tokens=False)
        ids = question + tok.encode(random_solution(s, rng), add_special_tokens=False)
        tokens = tok.convert_ids_to_tokens(ids)
        predicted = model(input_ids=torch.tensor([ids], device=device)).logits[0].argmax(-1).tolist()
        for start, end, kind in number_kinds(tokens, len(question), set(re.findall(r"\d+", s.question))):
            total[kind] += 1
            right[kind] += all(predicted[k - 1] == ids[k] for k in range(start, end))
    model.train(was_training)
    return {**{k: round(right[k] / total[k], 4) if total[k] else 0.0 for k in KINDS},
            **{f"{k}_n": total[k] for k in KINDS}, "problems": len(samples)}


def arith_probe(model: torch.nn.Module, tok: PreTrainedTokenizerFast, arith: ArithTask, n: int = 64,
                seed: int = 0) -> dict[str, float | int]:
    """:func:`number_probe` on the first ``n`` held-out test problems."""
    return number_probe(model, tok, arith.split("test", n), seed)
