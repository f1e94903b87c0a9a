"""Sampling the policy on task prompts: the shared step of RM data, RL, evals and diversity."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerFast

from assist.sampling import sample
from evals.tasks import Sample, Task
from training._model import encode_prompt, stop_ids

__all__ = ["Rollout", "accuracy", "rollouts"]


@dataclass
class Rollout:
    sample: Sample
    prompt: list[int]
    tokens: list[int]
    text: str
    finish_reason: str
    entropies: list[float]


def rollouts(
    model: torch.nn.Module, tok: PreTrainedTokenizerFast, samples: Sequence[Sample], *,
    k: int = 1, temperature: float = 0.0, max_new_tokens: int = 96, seed: int = 0,
    batch_size: int = 64,
) -> list[list[Rollout]]:
    """``k`` completions for each sample's question (one user turn), in sample order."""
    prompts = [encode_prompt(tok, [{"role": "user", "content": s.question}]) for s in samples]
    flat = [(i, p) for i, p in enumerate(prompts) for _ in range(k)]
    out: list[list[Rollout]] = [[] for _ in samples]
    was_training = model.training
    model.eval()
    for start in range(0, len(flat), batch_size):
        chunk = flat[start: start + batch_size]
        completions = sample(model, [p for _, p in chunk], max_new_tokens=max_new_tokens,
                             stop_ids=stop_ids(tok), pad_id=tok.pad_token_id,
                             temperature=temperature, seed=seed + start)
        for (i, p), c in zip(chunk, completions, strict=True):
            text = tok.decode(c.tokens, skip_special_tokens=True)
            out[i].append(Rollout(samples[i], p, c.tokens, text, c.finish_reason, c.entropies))
    model.train(was_training)
    return out


def accuracy(task: Task, groups: Sequence[Sequence[Rollout]]) -> float:
    """Share of all rollouts the task scores correct."""
    scores = [task.score(r.sample, r.text).correct for g in groups for r in g]
    return sum(scores) / max(1, len(scores))
