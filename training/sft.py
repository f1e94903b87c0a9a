"""Stage 2: supervised fine-tuning on ideal conversations.

The loss falls only on what the assistant wrote, *including* its closing ``<|im_end|>``:
leave that token out (a known TRL pitfall) and the model never learns to stop. Each
process reads its own slice of the conversation list, one pass, in a seeded order.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from evals.tasks import ArithTask, FactsTask
from training import conversations
from training._loop import Dist, LoopResult, StepOutput, train
from training._model import IGNORE, encode_chat, new_model, pad_right
from training.config import RunConfig
from training.progress import Reporter
from training.tokenizer import load_tokenizer

__all__ = ["run"]


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
    random.Random(f"sft-order:{cfg.seed}").shuffle(encoded)
    if from_scratch:
        model = new_model(cfg.model, tok, cfg.seed).to(dist.device)
    else:
        model = AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32).to(dist.device)
    label = "scratch" if from_scratch else "sft"

    def step_fn(m: torch.nn.Module, step: int) -> StepOutput:
        first = (step * dist.world_size + dist.rank) * s.batch_size
        rows = encoded[first: first + s.batch_size]
        ids = pad_right([r[0] for r in rows], tok.pad_token_id).to(dist.device)
        labels = pad_right([r[1] for r in rows], IGNORE).to(dist.device)
        mask = pad_right([[1] * len(r[0]) for r in rows], 0).to(dist.device)
        loss = m(input_ids=ids, attention_mask=mask, labels=labels).loss
        return StepOutput(loss, int(mask.sum()), {"assistant_tokens": float((labels != IGNORE).sum())})

    result = train(model, s, step_fn, checkpoint=out / "checkpoints" / f"{label}.pt", dist=dist,
                   reporter=reporter, label=label, resume=resume)
    return model, result
