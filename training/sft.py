"""Stage 2: supervised fine-tuning on ideal conversations.

The loss falls only on what the assistant wrote, *including* its closing ``<|im_end|>``:
leave that token out (a known TRL pitfall) and the model never learns to stop. Each
process reads its own slice of the conversation list, one pass, in a seeded order. A share
of the rows (``sft.replay``) replays pretraining passages of the seen world, so SFT does
not wear away the facts that closed-book questions need.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from assist.chat_format import END_OF_TEXT, TOOL_CALL_END, TOOL_CALL_START
from evals.tasks import ArithTask, FactsTask
from training import conversations, data
from training._loop import Dist, LoopResult, StepOutput, train
from training._model import IGNORE, encode_chat, new_model, pad_right, token_logprobs
from training.config import RunConfig
from training.progress import Reporter
from training.tokenizer import load_tokenizer

__all__ = ["batch_loss", "call_weights", "run"]


def _replay_rows(tok: PreTrainedTokenizerFast, cfg: RunConfig, seq_len: int) -> Iterator[tuple[list[int], list[int]]]:
    """Rows of pretraining ``facts`` passages (the seen world, worded afresh), packed up to
    ``seq_len``, with the loss on every token, as pretraining puts it."""
    eot = tok.convert_tokens_to_ids(END_OF_TEXT)
    passages = data.sources(ArithTask(cfg.arith), FactsTask(cfg.facts), cfg.sft.mixture,
                            cfg.seed + 3)["facts"]
    row: list[int] = []
    for text in passages:
        ids = tok.encode(text, add_special_tokens=False) + [eot]
        if row and len(row) + len(ids) > seq_len:
            yield row, list(row)
            row = []
        row += ids[:seq_len]


def _with_replay(encoded: list[tuple[list[int], list[int]]], share: float,
                 rows: Iterator[tuple[list[int], list[int]]], seed: int) -> list[tuple[list[int], list[int]]]:
    """``share`` of the rows replaced by pretraining rows, at seeded places.

    SFT at a learning rate that teaches the formats in a few hundred steps also wears away
    what pretraining stored: measured on ``tiny``, recall of seen facts (teacher-forced,
    :func:`training.probes.facts_probe`) fell from 0.87 to 0.29 over SFT. Replaying the
    passages (InstructGPT mixes pretraining data into its RL stage for the same reason)
    keeps the knowledge that closed-book questions about held-out facts need.
    """
    if share <= 0:
        return encoded
    rng = random.Random(f"sft-replay:{seed}")
    out = list(encoded)
    for i in sorted(rng.sample(range(len(out)), round(len(out) * share))):
        out[i] = next(rows)
    return out


def call_weights(ids: list[int], start: int, end: int, weight: float) -> list[float]:
    """Each token's loss weight: ``weight`` from a ``<tool_call>`` token through its
    ``</tool_call>``, 1 elsewhere.

    Why: ``tools`` hinges on the call copying the expression the text just wrote, and the
    copy is learnt from a few tokens per conversation. On a (base, SFT draw) pair where it
    failed, the SFT model gave the copy's second digit p = 0.28 teacher-forced on held-out
    conversations (its other digits 0.999), so SFT had stopped on that digit with its loss
    high; a heavier weight there is a steeper slope out of that corner (README: Tools).
    """
    out, inside = [], False
    for t in ids:
        inside = inside or t == start
        out.append(weight if inside else 1.0)
        inside = inside and t != end
    return out


def batch_loss(model: torch.nn.Module, rows: list[tuple[list[int], list[int]]], pad_id: int,
               micro_batches: int, call: tuple[int, int, float] | None = None,
               ) -> tuple[torch.Tensor, int, int]:
    """Mean next-token loss over every labelled token of ``rows``, run in at most
    ``micro_batches`` forward passes: (loss, tokens read, labelled tokens). With ``call``
    (``<tool_call>`` id, ``</tool_call>`` id, weight), tokens inside a call weigh ``weight``
    and the mean is over the weights (:func:`call_weights`).

    The rows are sorted by length and split in order, so each pass pads only to its own
    longest row (a 448-token replay row no longer pads fifteen 160-token conversations);
    each pass's summed loss is divided by the whole batch's count, so the sum of the passes
    is the one-pass loss and its gradient, whatever the split.
    """
    rows = sorted(rows, key=lambda r: len(r[0]))
    labelled = sum(sum(t != IGNORE for t in r[1][1:]) for r in rows)  # targets after the shift
    size = -(-len(rows) // micro_batches)
    summed, weight_sum = [], 0.0
    for first in range(0, len(rows), size):
        chunk = rows[first: first + size]
        logp = token_logprobs(model, [r[0] for r in chunk], pad_id)  # column 0 is zero
        target = (pad_right([r[1] for r in chunk], IGNORE) != IGNORE).float()
        if call is not None:  # padding weighs 1 and is no target, so it counts for nothing
            start, end, w = call
            weights = [call_weights(r[0], start, end, w) for r in chunk]
            width = target.shape[1]
            target = target * torch.tensor([x + [1.0] * (width - len(x)) for x in weights])
        target[:, 0] = 0.0  # the first token is nobody's target
        weight_sum += float(target.sum())
        summed.append(-(logp * target.to(logp.device)).sum())
    return torch.stack(summed).sum() / max(weight_sum, 1.0), sum(len(r[0]) for r in rows), labelled


def run(cfg: RunConfig, out: Path, dist: Dist, reporter: Reporter, resume: bool,
        from_scratch: bool = False) -> tuple[torch.nn.Module, LoopResult]:
    """SFT from the pretrained base, or (``from_scratch``, the ``scratch`` stage) the very
    same conversations and steps from a random initialisation: the control that shows what
    pretraining contributed."""
    tok = load_tokenizer(out / "tokenizer")
    s = cfg.sft
    n = s.steps * s.batch_size * dist.world_size
    convs = list(conversations.stream(s.mixture, ArithTask(cfg.arith), FactsTask(cfg.facts), n,
                                      seed=f"sft:{cfg.seed}"))
    encoded = [encode_chat(tok, c["messages"], c["tools"], s.seq_len) for c in convs]
    encoded = _with_replay(encoded, s.replay, _replay_rows(tok, cfg, s.seq_len), cfg.seed)
    random.Random(f"sft-order:{cfg.seed}").shuffle(encoded)
    if from_scratch:
        model = new_model(cfg.model, tok, cfg.seed).to(dist.device)
    else:
        model = AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32).to(dist.device)
    label = "scratch" if from_scratch else "sft"
    call = None if s.call_weight == 1.0 else (
        tok.convert_tokens_to_ids(TOOL_CALL_START), tok.convert_tokens_to_ids(TOOL_CALL_END), s.call_weight)

    def step_fn(m: torch.nn.Module, step: int) -> StepOutput:
        first = (step * dist.world_size + dist.rank) * s.batch_size
        loss, tokens, labelled = batch_loss(m, encoded[first: first + s.batch_size], tok.pad_token_id,
                                            s.micro_batches, call)
        return StepOutput(loss, tokens, {"assistant_tokens": float(labelled)})

    result = train(model, s, step_fn, checkpoint=out / "checkpoints" / f"{label}.pt", dist=dist,
                   reporter=reporter, label=label, resume=resume)
    return model, result
