"""Stage 3: a reward model trained on ranked completions.

For each prompt the SFT model writes ``k`` completions; the task scorer ranks them (it
stands in for the human labellers of the talk: a cheap, exact labeller). A
``LlamaForSequenceClassification`` with one output, initialised from the SFT weights, reads
a scalar at the ``<|reward|>`` token appended to prompt + completion, and learns
``-log sigmoid(r_w - r_l)`` over every ranked pair of a prompt. Held-out prompts give the
pairwise accuracy.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

from evals.tasks import ArithTask
from strategies._reward import reward_scores
from training._loop import Dist, LoopResult, StepOutput, train
from training.config import RunConfig
from training.progress import Reporter
from training.rollouts import rollouts
from training.tokenizer import load_tokenizer

__all__ = ["reward_scores", "run"]

Group = tuple[list[list[int]], list[float]]  # (sequences ending in <|reward|>, scorer values)


def pairs(values: Sequence[float]) -> list[tuple[int, int]]:
    """(winner, loser) index pairs: every two completions the labeller ranks apart."""
    return [(i, j) if values[i] > values[j] else (j, i)
            for i, j in itertools.combinations(range(len(values)), 2) if values[i] != values[j]]


def pair_loss(rewards: torch.Tensor, group_pairs: list[tuple[int, int]]) -> tuple[torch.Tensor, float]:
    w = torch.tensor([a for a, _ in group_pairs])
    lo = torch.tensor([b for _, b in group_pairs])
    margin = rewards[w] - rewards[lo]
    return -F.logsigmoid(margin).mean(), float((margin > 0).float().mean())


def label_groups(cfg: RunConfig, out: Path, dist: Dist, reporter: Reporter) -> list[Group]:
    tok = load_tokenizer(out / "tokenizer")
    policy = AutoModelForCausalLM.from_pretrained(out / "sft", dtype=torch.float32).to(dist.device)
    task = ArithTask(cfg.arith)
    samples = task.train_stream("rm", cfg.rm.prompts)
    reporter.log(f"rm: sampling {cfg.rm.k} completions for {len(samples)} prompts")
    groups = []
    for group in rollouts(policy, tok, samples, k=cfg.rm.k, temperature=cfg.rm.temperature,
                          max_new_tokens=cfg.rm.max_new_tokens, seed=cfg.seed):
        values = [task.score(r.sample, r.text).value for r in group]
        groups.append(([r.prompt + r.tokens for r in group], values))
    return groups


def run(cfg: RunConfig, out: Path, dist: Dist, reporter: Reporter, resume: bool) -> tuple[torch.nn.Module, LoopResult, dict]:
    tok = load_tokenizer(out / "tokenizer")
    groups = label_groups(cfg, out, dist, reporter)
    random.Random(f"rm-split:{cfg.seed}").shuffle(groups)
    n_held = max(1, round(len(groups) * cfg.rm.heldout_fraction))
    held, train_groups = groups[:n_held], [g for g in groups[n_held:] if pairs(g[1])]
    if not train_groups:
        raise RuntimeError("rm: no prompt had completions the scorer ranks apart; sample more")
    rm = AutoModelForSequenceClassification.from_pretrained(
        out / "sft", num_labels=1, dtype=torch.float32).to(dist.device)
    rm.config.pad_token_id = tok.pad_token_id
    r = cfg.rm

    def step_fn(m: torch.nn.Module, step: int) -> StepOutput:
        rng = random.Random(f"rm-batch:{cfg.seed}:{step}")
        batch = rng.sample(train_groups, min(r.batch_size, len(train_groups)))
        seqs = [s for g in batch for s in g[0]]
        rewards = reward_scores(m, tok, seqs)
        losses, accs, offset = [], [], 0
        for g_seqs, values in batch:
            loss, acc = pair_loss(rewards[offset: offset + len(g_seqs)], pairs(values))
            losses.append(loss)
            accs.append(acc)
            offset += len(g_seqs)
        return StepOutput(torch.stack(losses).mean(), sum(len(s) for s in seqs),
                          {"pair_accuracy": sum(accs) / len(accs)})

    result = train(rm, r, step_fn, checkpoint=out / "checkpoints" / "rm.pt", dist=dist,
                   reporter=reporter, label="rm", resume=resume)
    held_pairs = correct = 0
    with torch.no_grad():
        for seqs, values in held:
            ps = pairs(values)
            if ps:
                _, acc = pair_loss(reward_scores(rm, tok, seqs), ps)
                correct += acc * len(ps)
                held_pairs += len(ps)
    n_pairs = sum(len(pairs(v)) for _, v in train_groups)
    stats = {
        "prompts": len(groups), "completions_per_prompt": r.k, "train_pairs": n_pairs,
        "heldout_pairs": held_pairs,
        "heldout_pair_accuracy": round(correct / held_pairs, 4) if held_pairs else None,
        "sampled_accuracy": round(sum(v for _, vs in groups for v in vs) / (len(groups) * r.k), 4),
        "labeller": "the arith task scorer (stands in for human rankers)",
    }
    return rm, result, stats
