"""Stage 3: a reward model trained on ranked completions.

For each prompt the SFT model writes ``k`` completions; the task scorer ranks them (it
stands in for the human labellers of the talk: a cheap, exact labeller). Because labels
cost nothing here, each group also gets ``synthetic`` written completions: an ideal
solution and ones with a single slip, so every group holds pairs that differ in exactly
the arithmetic the verifier must check. A
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

from assist.chat_format import IM_END, reward_scores
from evals.tasks import ArithTask, Sample
from evals.tasks.arith import orders, solution_in_order
from training._loop import Dist, LoopResult, StepOutput, stage_seed, train
from training._model import token_logprobs
from training.config import RunConfig
from training.conversations import slipped_attempt
from training.progress import Reporter
from training.rollouts import rollouts
from training.tokenizer import load_tokenizer

__all__ = ["run"]

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


@torch.no_grad()
def likelihood_pair_accuracy(policy: torch.nn.Module, groups: Sequence[Group], k: int,
                             pad_id: int = 0) -> tuple[float | None, int]:
    """How well the policy's own log-likelihood of each of the first ``k`` (sampled) completions
    ranks the pairs the labeller ranks apart: a yardstick for the reward model, read at no
    extra training. A group's sequences share their prompt, so the whole sequence's
    log-likelihood ranks its completions as the completion's own does."""
    right = total = 0
    for seqs, values in groups:
        ps = pairs(values[:k])
        if ps:  # a pair counts as right when the winner scores higher, as in pair_loss
            scores = sequence_logprobs(policy, seqs[:k], pad_id)
            right += sum(scores[w] > scores[lo] for w, lo in ps)
            total += len(ps)
    return (round(right / total, 4) if total else None), total


def sequence_logprobs(policy: torch.nn.Module, rows: Sequence[Sequence[int]], pad_id: int) -> list[float]:
    """Each row's sum of log p(token | tokens before it), in one padded forward (the padding
    is left out of the sums)."""
    lp = token_logprobs(policy, [list(r) for r in rows], pad_id)
    return [float(lp[i, : len(r)].sum()) for i, r in enumerate(rows)]


def written_completions(sample: Sample, n: int, rng: random.Random) -> list[str]:
    """``n`` written completions: the first an ideal solution, the rest with one slip each,
    every one in a random order of the changes."""
    texts = []
    for i in range(n):
        order = rng.choice(orders(sample))
        texts.append(solution_in_order(sample, order) if i == 0 else slipped_attempt(sample, order, rng))
    return texts


def label_groups(cfg: RunConfig, out: Path, dist: Dist, reporter: Reporter) -> list[Group]:
    tok = load_tokenizer(out / "tokenizer")
    policy = AutoModelForCausalLM.from_pretrained(out / "sft", dtype=torch.float32).to(dist.device)
    task = ArithTask(cfg.arith)
    samples = task.train_stream("rm", cfg.rm.prompts)
    reporter.log(f"rm: sampling {cfg.rm.k} completions for {len(samples)} prompts"
                 f" (+{cfg.rm.synthetic} written)")
    end = tok.convert_tokens_to_ids(IM_END)
    rng = random.Random(f"rm-written:{cfg.seed}")
    groups = []
    for group in rollouts(policy, tok, samples, k=cfg.rm.k, temperature=cfg.rm.temperature,
                          max_new_tokens=cfg.rm.max_new_tokens, seed=cfg.seed):
        values = [task.score(r.sample, r.text).value for r in group]
        seqs = [r.prompt + r.tokens for r in group]
        for text in written_completions(group[0].sample, cfg.rm.synthetic, rng):
            seqs.append(group[0].prompt + tok.encode(text, add_special_tokens=False) + [end])
            values.append(task.score(group[0].sample, text).value)
        groups.append((seqs, values))
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
    # The head is new: initialise it from its own generator, so it is the same whatever the
    # process did before (transformers would draw it from the global RNG).
    head = torch.Generator().manual_seed(stage_seed(cfg.seed, "rm-head"))
    with torch.no_grad():
        weight = rm.score.weight
        weight.copy_(torch.randn(weight.shape, generator=head) * rm.config.initializer_range)
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
    # Held-out accuracy is measured on pairs of *sampled* completions, what best-of-N and RL
    # will ask the reward model to rank; pairs with written completions are reported apart.
    tally = {"sampled": [0.0, 0], "all": [0.0, 0]}
    with torch.no_grad():
        for seqs, values in held:
            scores = reward_scores(rm, tok, seqs)
            for key, n in (("sampled", r.k), ("all", len(values))):
                ps = pairs(values[:n])
                if ps:
                    _, acc = pair_loss(scores[:n], ps)
                    tally[key][0] += acc * len(ps)
                    tally[key][1] += len(ps)
    # The yardstick: the SFT policy's own likelihood on the same held-out pairs. Where it
    # ranks them well and the reward model does not, the signal is there and the readout
    # has not learned it (README: Reward model).
    policy = AutoModelForCausalLM.from_pretrained(out / "sft", dtype=torch.float32).to(dist.device).eval()
    likelihood, _ = likelihood_pair_accuracy(policy, held, r.k, tok.pad_token_id)
    del policy
    n_pairs = sum(len(pairs(v)) for _, v in train_groups)
    ratio = {k: round(c / n, 4) if n else None for k, (c, n) in tally.items()}
    stats = {
        "prompts": len(groups), "completions_per_prompt": r.k, "written_per_prompt": r.synthetic,
        "train_pairs": n_pairs, "heldout_pairs": tally["sampled"][1],
        "heldout_pair_accuracy": ratio["sampled"],
        "policy_likelihood_pair_accuracy": likelihood,
        "heldout_pairs_with_written": tally["all"][1], "heldout_pair_accuracy_with_written": ratio["all"],
        "sampled_accuracy": round(sum(v for _, vs in groups for v in vs[:r.k]) / (len(groups) * r.k), 4),
        "labeller": "the arith task scorer (stands in for human rankers)",
    }
    return rm, result, stats
