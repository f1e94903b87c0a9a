"""Batched sampling from any Hugging Face causal LM, with a KV cache.

The minimal generation loop the training stages use for rollouts (reward-model data, RL,
diversity): left-padded prompts, one prefill, then one token per step for every row, with
temperature / top-p / top-k, per-row stop tokens, and the chosen tokens' logprobs and the
distribution's entropy recorded as it goes. About 30x faster than ``model.generate`` at
batch 64 on the CPU, where per-step Python overhead dominates.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["Completion", "draw", "filter_logits", "sample"]


@dataclass
class Completion:
    tokens: list[int]  # generated ids, the stop token included when one was produced
    finish_reason: str  # "stop" or "length"
    logprobs: list[float] = field(default_factory=list)  # of each generated token
    entropies: list[float] = field(default_factory=list)  # of each step's distribution (nats)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float, min_p: float = 0.0) -> torch.Tensor:
    """Temperature-scaled ``logits`` with the tokens outside min-p, top-k and top-p set to
    -inf, in vLLM's order (min-p first: tokens less likely than ``min_p`` x the top one)."""
    if min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        floor = probs.amax(dim=-1, keepdim=True) * min_p
        logits = logits.masked_fill(probs < floor, float("-inf"))
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) > top_p  # keep the token crossing p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def draw(probs: torch.Tensor,
         generators: torch.Generator | Sequence[torch.Generator | None] | None = None) -> torch.Tensor:
    """One token per row of ``probs`` (``[B, V]``, rows summing to 1), by the inverse of its
    cumulative distribution at one uniform per row. ``generators``: one for the batch, or one
    per row (the engine's: a seeded request's samples then never depend on its batch-mates).
    ``torch.multinomial`` draws far more random numbers for the same job (2.8 ms against 0.17
    ms at 64 x 2048 on one CPU thread, a fifth of a rollout's decode step), and so does
    Gumbel-max noise (a uniform per token: 0.34 against 0.14 ms at 16 rows, one generator
    each). A token of probability 0 is never drawn (u > 0)."""
    cdf = probs.cumsum(-1)
    if generators is None or isinstance(generators, torch.Generator):
        u = torch.rand((probs.shape[0], 1), generator=generators, device=probs.device)
    else:
        u = torch.empty((probs.shape[0], 1), device=probs.device)
        for row, g in zip(u, generators, strict=True):
            torch.rand(1, generator=g, device=probs.device, out=row)
    u = 1.0 - u  # in (0, 1]
    return torch.searchsorted(cdf, u * cdf[:, -1:]).clamp_(max=probs.shape[-1] - 1)[:, 0]


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop_ids: Iterable[int],
    pad_id: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
) -> list[Completion]:
    """Complete every prompt; greedy when ``temperature == 0``.

    Rows finish independently on a stop token or after ``max_new_tokens``; the loop ends
    when all have finished.
    """
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = next(model.parameters()).device
    stops = torch.tensor(sorted(set(stop_ids)), device=device)
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding: every row's next token is at the end
        ids[i, width - len(p):] = torch.tensor(list(p), device=device)
        mask[i, width - len(p):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)

    n = len(prompts)
    out_tokens = torch.full((n, max_new_tokens), pad_id, dtype=torch.long, device=device)
    out_logprobs = torch.zeros(n, max_new_tokens, device=device)
    out_entropy = torch.zeros(n, max_new_tokens, device=device)
    rows = torch.arange(n, device=device)  # the prompts still in the batch, by index
    done = torch.zeros(n, dtype=torch.bool, device=device)
    past = None
    step_ids, step_pos = ids, positions
    steps = 0
    for t in range(max_new_tokens):
        result = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos,
                       past_key_values=past, use_cache=True, logits_to_keep=1)
        past = result.past_key_values
        logits = result.logits[:, -1, :].float()
        logp_full = torch.log_softmax(logits, dim=-1)
        entropy = -(logp_full.exp() * logp_full).nan_to_num().sum(-1)
        if temperature <= 0.0:
            token = logits.argmax(dim=-1)
        else:
            filtered = filter_logits(logits / temperature, top_k, top_p)
            token = draw(torch.softmax(filtered, -1), generator)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        out_tokens[rows, t] = token
        out_logprobs[rows, t] = logp_full.gather(-1, token[:, None])[:, 0]
        out_entropy[rows, t] = entropy
        steps = t + 1
        done = done | torch.isin(token, stops)
        if bool(done.all()):
            break
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        step_pos = step_pos[:, -1:] + 1
        step_ids = token[:, None]
        # Finished rows leave the batch (their cache rows too) once they are a quarter of
        # it: rollouts end at very different lengths, and a finished row would otherwise be
        # computed until the longest ends. Dropping rows changes no other row's tokens.
        finished = int(done.sum())
        if finished * 4 >= len(rows):
            keep = (~done).nonzero()[:, 0]
            past.batch_select_indices(keep)
            rows, done, mask = rows[keep], done[keep], mask[keep]
            step_pos, step_ids = step_pos[keep], step_ids[keep]

    tokens = out_tokens[:, :steps].tolist()
    logprobs = out_logprobs[:, :steps].tolist()
    entropies = out_entropy[:, :steps].tolist()
    stop_set = set(stops.tolist())
    completions = []
    for row, lp, ent in zip(tokens, logprobs, entropies, strict=True):
        n, reason = len(row), "length"
        for j, t in enumerate(row):
            if t in stop_set:
                n, reason = j + 1, "stop"
                break
        completions.append(Completion(row[:n], reason, lp[:n], ent[:n]))
    return completions
