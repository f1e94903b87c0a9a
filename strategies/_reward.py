"""Our trained reward model as a scorer: a scalar per (conversation, candidate reply).

The reward model was trained on ``prompt ids + completion ids (ending in <|im_end|>) +
<|reward|>`` and reads its scalar at that last token, so scoring renders candidates the
same way. Training imports :func:`reward_scores` from here, so both sides read the reward
at the same place by construction.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from assist._chat_format import IM_END, REWARD, chat_encoder

if TYPE_CHECKING:  # torch loads with the first reward model, not with `import strategies`
    import torch

__all__ = ["RewardModel", "Scorer", "reward_scores"]


class Scorer(Protocol):
    """Scores candidate replies to one conversation; higher is better."""

    def __call__(self, messages: Sequence[Mapping[str, Any]], candidates: Sequence[str]) -> Any: ...


def reward_scores(rm: torch.nn.Module, tok: Any, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
    """The reward of each prompt+completion id list (``<|reward|>`` appended when missing)."""
    import torch

    readout = tok.convert_tokens_to_ids(REWARD)
    rows = [list(s) if s and s[-1] == readout else [*s, readout] for s in sequences]
    device = next(rm.parameters()).device
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    # Right padding: the classifier reads the last non-pad token, our readout token.
    return rm(input_ids=ids, attention_mask=mask).logits[:, 0].float()


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
