"""Stage 1: pretraining, next-token prediction over the tokenized mixture.

Each step reads ``batch_size`` windows of ``seq_len`` tokens from the stream, each starting
at a random document's first token; the offsets are drawn from a generator seeded by (seed,
step, rank), so a resumed or distributed run is reproducible without saving any data-loader
state. Windows start at documents because a document cut at an arbitrary offset loses its
beginning: a solution whose question fell outside the window teaches the model to write
numbers *without* looking back, the opposite of the copying every strategy relies on.
With ``data.copy_warmup_steps`` the first steps read only ``copy`` documents (their own
stream, ``data/warmup.npy``): a curriculum that forms the copying circuit first.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from assist.chat_format import END_OF_TEXT
from training._loop import Dist, LoopResult, StepOutput, train
from training._model import new_model
from training.config import RunConfig
from training.progress import Reporter
from training.tokenizer import load_tokenizer

__all__ = ["run"]


def doc_starts(stream: np.ndarray, eot_id: int, seq_len: int) -> np.ndarray:
    """Offsets of every document start that leaves room for a whole window."""
    starts = np.concatenate([[0], np.flatnonzero(np.asarray(stream) == eot_id) + 1])
    return starts[starts <= len(stream) - seq_len]


def batch(stream: np.ndarray, seed: int, step: int, rank: int, size: int, seq_len: int,
          starts: np.ndarray | None = None) -> torch.Tensor:
    """``size`` windows; with ``starts``, each window begins at one of those offsets."""
    rng = np.random.default_rng([seed, step, rank])
    offsets = (starts[rng.integers(0, len(starts), size=size)] if starts is not None and len(starts)
               else rng.integers(0, len(stream) - seq_len, size=size))
    return torch.from_numpy(np.stack([stream[s: s + seq_len] for s in offsets]).astype(np.int64))


def run(cfg: RunConfig, out: Path, dist: Dist, reporter: Reporter, resume: bool) -> tuple[torch.nn.Module, LoopResult]:
    tok = load_tokenizer(out / "tokenizer")
    stream = np.load(out / "data" / "pretrain.npy", mmap_mode="r")
    if len(stream) <= cfg.pretrain.seq_len:
        raise ValueError("the pretraining stream is shorter than one sequence")
    model = new_model(cfg.model, tok, cfg.seed).to(dist.device)
    p = cfg.pretrain
    eot = tok.convert_tokens_to_ids(END_OF_TEXT)
    starts = doc_starts(stream, eot, p.seq_len)
    warm = cfg.data.copy_warmup_steps
    warmup = np.load(out / "data" / "warmup.npy", mmap_mode="r") if warm > 0 else None
    if warmup is not None and len(warmup) <= p.seq_len:
        raise ValueError("the copy warm-up stream is shorter than one sequence")
    warm_starts = doc_starts(warmup, eot, p.seq_len) if warmup is not None else None

    def step_fn(m: torch.nn.Module, step: int) -> StepOutput:
        if warmup is not None and step < warm:  # the copy curriculum comes first
            x = batch(warmup, cfg.seed, step, dist.rank, p.batch_size, p.seq_len, warm_starts).to(dist.device)
        else:
            x = batch(stream, cfg.seed, step, dist.rank, p.batch_size, p.seq_len, starts).to(dist.device)
        loss = m(input_ids=x, labels=x).loss
        return StepOutput(loss, x.numel())

    result = train(model, p, step_fn, checkpoint=out / "checkpoints" / "pretrain.pt", dist=dist,
                   reporter=reporter, label="pretrain", resume=resume)
    return model, result
