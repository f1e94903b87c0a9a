"""Our trained reward model as a scorer: a scalar per (conversation, candidate reply).

The reward model was trained on ``prompt ids + completion ids (ending in <|im_end|>) +
<|reward|>`` and reads its scalar at that last token, so scoring renders candidates the
same way. Both this scorer and training read the reward with
:func:`assist.chat_format.reward_scores`, so both sides read it at the same place by
construction.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from assist.chat_format import IM_END, chat_encoder, reward_scores

__all__ = ["RewardModel", "Scorer"]


class Scorer(Protocol):
    """Scores candidate replies to one conversation; higher is better."""

    def __call__(self, messages: Sequence[Mapping[str, Any]], candidates: Sequence[str]) -> Any: ...


class RewardModel:
    """A reward-model checkpoint folder (``runs/<name>/rm``) loaded in-process.

    Calls are serialised on a lock and run in a worker thread, so an async strategy can
    await scores without blocking its event loop.
    """

    def __init__(self, path: str | Path, device: str | None = None, batch_size: int = 32) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = Path(path)
        if not (path / "config.json").is_file():
            raise ValueError(f"no reward model checkpoint (config.json) in {path}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = AutoModelForSequenceClassification.from_pretrained(path).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size = batch_size
        self.path = path
        self._lock = threading.Lock()
        self._end = self.tokenizer.convert_tokens_to_ids(IM_END)

    def sequences(self, messages: Sequence[Mapping[str, Any]], candidates: Sequence[str]) -> list[list[int]]:
        # Contents and candidates are text: a "<|im_end|>" or "<|reward|>" typed in them must
        # not become the control token (it would fake a turn or the readout position).
        encoder = chat_encoder(self.tokenizer)
        ids = encoder.encode([dict(m) for m in messages], add_generation_prompt=True)
        return [ids + encoder.text_ids(c) + [self._end] for c in candidates]

    def score_sync(self, messages: Sequence[Mapping[str, Any]], candidates: Sequence[str]) -> list[float]:
        seqs = self.sequences(messages, candidates)
        import torch

        out: list[float] = []
        with self._lock, torch.no_grad():
            for i in range(0, len(seqs), self.batch_size):
                out += reward_scores(self.model, self.tokenizer, seqs[i: i + self.batch_size]).tolist()
        return out

    async def __call__(self, messages: Sequence[Mapping[str, Any]], candidates: Sequence[str]) -> list[float]:
        return await asyncio.to_thread(self.score_sync, messages, candidates)
