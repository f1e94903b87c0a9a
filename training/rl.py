"""Stage 4: reinforcement learning, the LM loss weighted by reward.

Each step samples ``group_size`` completions for ``batch_size`` prompts from the current
policy, scores them (the reward model, the task checker, or both), normalises rewards
within each prompt's group (the advantage), and takes one step on

    loss = -mean_tokens(advantage * log p(token)) + kl_coef * KL(policy || SFT reference)

with the per-token KL estimated as ``exp(d) - d - 1``, ``d = log p_ref - log p``. One
update per batch keeps it on-policy, so no ratio clipping is needed.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from assist.chat_format import reward_scores
from evals.tasks import ArithTask, Task
from training import _ledger as ledger_file
from training._loop import Dist, LoopResult, StepOutput, train
from training._model import pad_right, token_logprobs
from training.config import RunConfig
from training.progress import Reporter
from training.rollouts import Rollout, rollouts
from training.tokenizer import load_tokenizer

__all__ = ["advantages", "rewards", "rm_share", "run", "run_rm_share", "token_logprobs"]  # token_logprobs: SFT shares it (training/_model.py)


def advantages(reward: torch.Tensor, group_size: int) -> torch.Tensor:
    """Rewards standardised within each prompt's group (the group is the baseline)."""
    grouped = reward.view(-1, group_size)
    return (grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)


def rm_share(trust: str, rm_stats: Mapping[str, Any]) -> float:
    """The weight of the reward model beside the labeller under ``rl.reward=both``: 1 when
    ``trust`` is "full"; with "skill", ``2 * acc - 1`` of its held-out pairwise accuracy
    (``rm_stats``: the rm stage's metrics), floored at 0: a coin's ranking counts for nothing."""
    if trust == "full":
        return 1.0
    acc = rm_stats.get("heldout_pair_accuracy")
    return 0.0 if acc is None else round(max(0.0, min(1.0, 2.0 * float(acc) - 1.0)), 4)


def run_rm_share(trust: str, run: Path) -> float:
    """:func:`rm_share` of the reward model trained in ``run`` (its rm stage in the ledger)."""
    return rm_share(trust, ledger_file.read(run)["stages"].get("rm", {}))


def rewards(flat: list[Rollout], task: Task, rm: torch.nn.Module | None, tok: Any, kind: str,
            device: torch.device | str = "cpu", share: float = 1.0,
            ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(checker, reward model, reward) of each rollout: the task's verdict in [0, 1], the reward
    model's scalar at ``<|reward|>`` (None without one), and what ``kind`` ("rm", "checker",
    "both": ``share`` x the reward model's plus the checker's) makes of them; without a reward
    model the checker stands in for it."""
    checker = torch.tensor([task.score(x.sample, x.text).value for x in flat], device=device)
    learned = None
    if rm is not None and kind in ("rm", "both"):
        with torch.no_grad():
            learned = reward_scores(rm, tok, [x.prompt + x.tokens for x in flat])
    reward = {"rm": learned, "checker": checker, "both": share * learned + checker if learned is not None else None}[kind]
    return checker, learned, checker if reward is None else reward


def run(cfg: RunConfig, out: Path, dist: Dist, reporter: Reporter, resume: bool) -> tuple[torch.nn.Module, LoopResult]:
    tok = load_tokenizer(out / "tokenizer")
    r = cfg.rl
    policy = AutoModelForCausalLM.from_pretrained(out / "sft", dtype=torch.float32).to(dist.device)
    reference = AutoModelForCausalLM.from_pretrained(out / "sft", dtype=torch.float32).to(dist.device)
    reference.requires_grad_(False).eval()
    share = run_rm_share(r.rm_trust, out)
    if r.reward == "both":
        reporter.log(f"rl: the reward model counts {share:g} beside the labeller (rl.rm_trust={r.rm_trust})")
    rm = None
    # Under `both` at share 0 the reward model's scores would be multiplied by 0: not computed
    # (the checker alone then gives the same advantages and reward).
    if r.reward == "rm" or (r.reward == "both" and share > 0):
        rm = AutoModelForSequenceClassification.from_pretrained(out / "rm", dtype=torch.float32).to(dist.device)
        rm.requires_grad_(False).eval()
    task = ArithTask(cfg.arith)
    prompts = task.train_stream(f"rl-{dist.rank}", r.steps * r.batch_size)

    def step_fn(m: torch.nn.Module, step: int) -> StepOutput:
        batch = prompts[step * r.batch_size: (step + 1) * r.batch_size]
        # Sampling and scoring in float32 whatever the loop's autocast: one token at a time,
        # the casts cost more than bfloat16 saves; the update below is where it pays.
        with torch.autocast(dist.device.type, enabled=False):
            groups = rollouts(policy, tok, batch, k=r.group_size, temperature=r.temperature,
                              max_new_tokens=r.max_new_tokens, seed=cfg.seed * 100_003 + step)
            flat = [x for g in groups for x in g]
            checker, learned, reward = rewards(flat, task, rm, tok, r.reward, dist.device, share)
        rows = [x.prompt + x.tokens for x in flat]
        if r.reward == "both" and learned is not None:
            # Each signal standardised within its group first: the reward model's logits have
            # their own scale, and summed raw they would drown the labeller's [0, 1] verdict.
            adv = share * advantages(learned, r.group_size) + advantages(checker, r.group_size)
        else:
            adv = advantages(reward, r.group_size)
        # Mask: 1 on completion tokens only.
        cmask = pad_right([[0] * len(x.prompt) + [1] * len(x.tokens) for x in flat], 0).to(dist.device).float()
        logp = token_logprobs(m, rows, tok.pad_token_id)
        with torch.no_grad():
            ref = token_logprobs(reference, rows, tok.pad_token_id)
        d = ref - logp
        kl = (torch.exp(d) - d - 1) * cmask
        n_tok = cmask.sum().clamp(min=1)
        pg = -(adv.reshape(-1, 1) * logp * cmask).sum() / n_tok
        loss = pg + r.kl_coef * kl.sum() / n_tok
        return StepOutput(loss, int(n_tok), {
            "reward": float(reward.mean()), "checker_accuracy": float(checker.mean()),
            "kl": float(kl.detach().sum() / n_tok),
        })

    result = train(policy, r, step_fn, checkpoint=out / "checkpoints" / "rl.pt", dist=dist,
                   reporter=reporter, label="rl", resume=resume)
    return policy, result
