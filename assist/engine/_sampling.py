"""The seeds behind sampled tokens, the logit adjustments before the pick, and the readouts
of logprobs.

Each sampled sequence owns a seeded ``torch.Generator``, so a request's samples never depend
on its batch-mates: a token is drawn from the inverse of its cumulative distribution at one
uniform from the sequence's own generator (:func:`assist.sampling.draw`).
"""

from __future__ import annotations

import operator
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from assist.engine._params import SEED_MODULUS, SamplingParams

__all__ = ["Adjustments", "generator_seed", "top_logprobs"]


def top_logprobs(logp: torch.Tensor, k: int) -> list[tuple[int, float]]:
    if k <= 0:
        return []
    values, ids = torch.topk(logp, k)
    return list(zip(ids.tolist(), values.tolist(), strict=True))


def generator_seed(seed: int | None, i: int) -> int:
    """Sample ``i``'s generator seed: any integer, reduced to what a generator holds."""
    if seed is None:  # not torch.seed(): that reseeds the process's global generator, slowly
        return int.from_bytes(os.urandom(8), "little") % (1 << 62)
    return (operator.index(seed) + i) % SEED_MODULUS


@dataclass
class Adjustments:
    """One request's logit adjustments (:attr:`SamplingParams.adjusts`), as vocabulary-sized
    tensors built once per request rather than once per token."""

    params: SamplingParams
    allowed: torch.Tensor | None = None  # bool: the allowed tokens
    bias_ids: torch.Tensor | None = None
    bias_values: torch.Tensor | None = None
    in_prompt: torch.Tensor | None = None  # bool: tokens of the prompt (repetition penalty)
    min_stops: torch.Tensor | None = None  # ids masked until min_tokens

    @classmethod
    def build(cls, p: SamplingParams, prompt: Sequence[int], width: int, eos_ids: Sequence[int],
              device: torch.device) -> Adjustments:
        """``width``: the logits' width."""
        out = cls(p)
        if p.allowed_token_ids is not None:
            out.allowed = torch.zeros(width, dtype=torch.bool, device=device)
            out.allowed[list(p.allowed_token_ids)] = True
        if p.logit_bias:
            out.bias_ids = torch.tensor([i for i, _ in p.logit_bias], device=device)
            out.bias_values = torch.tensor([min(100.0, max(-100.0, float(b))) for _, b in p.logit_bias],
                                           device=device)
        if p.repetition_penalty != 1.0:
            out.in_prompt = torch.zeros(width, dtype=torch.bool, device=device)
            out.in_prompt[list(prompt)] = True
        if p.min_tokens:
            # vLLM's all_stop_token_ids: the eos ids (even under ignore_eos) and stop_token_ids
            out.min_stops = torch.tensor(sorted(set(eos_ids) | set(p.stop_token_ids)), device=device)
        return out

    def apply_(self, row: torch.Tensor, generated: Sequence[int], *, constrained: bool) -> torch.Tensor:
        """One sequence's logits after allowed_token_ids, min_tokens (unconstrained rows: a
        grammar's rows are masked after the grammar's own mask, by the scheduler), logit_bias
        and the penalties, as vLLM's sampler applies them. ``row`` (a copy of the raw one) is
        changed in place; ``generated``: the sequence's tokens so far."""
        p = self.params
        if self.allowed is not None:
            row.masked_fill_(~self.allowed, float("-inf"))
        if self.min_stops is not None and not constrained and len(generated) < p.min_tokens:
            row[self.min_stops] = float("-inf")
        if self.bias_ids is not None and self.bias_values is not None:
            row[self.bias_ids] += self.bias_values
        if p.repetition_penalty != 1.0 or p.frequency_penalty or p.presence_penalty:
            counts = torch.bincount(torch.tensor(list(generated), dtype=torch.long, device=row.device),
                                    minlength=row.shape[-1])[: row.shape[-1]].to(row.dtype)
            seen = counts > 0
            if p.repetition_penalty != 1.0:
                assert self.in_prompt is not None
                hit = self.in_prompt | seen
                scale = torch.where(row > 0, 1.0 / p.repetition_penalty, p.repetition_penalty)
                row.mul_(torch.where(hit, scale, torch.ones_like(scale)))
            if p.frequency_penalty:
                row.sub_(p.frequency_penalty * counts)
            if p.presence_penalty:
                row.sub_(p.presence_penalty * seen.to(row.dtype))
        return row
