"""assist: a small GPT assistant, trained in four stages and served behind an OpenAI API.

The core package holds the chat format, the prompt conventions and the sampler; the
engines and clients (``assist.load`` / ``assist.connect``) build on them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from assist._chat_format import (
    CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    parse_tool_calls,
    render,
    render_segments,
)
from assist._prompts import Passage, render_passages
from assist._protocol import ChatModel, Messages
from assist.types import ChatCompletion, Choice, Message, ToolCall, Usage

__version__ = "0.1.0"

__all__ = [
    "CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "ChatCompletion",
    "ChatModel",
    "Choice",
    "Message",
    "Messages",
    "Passage",
    "ToolCall",
    "Usage",
    "__version__",
    "load",
    "parse_tool_calls",
    "render",
    "render_passages",
    "render_segments",
]


def load(path: str | Path, engine: str = "torch", **options: Any) -> ChatModel:
    """An in-process ChatModel over a Hugging Face checkpoint folder.

    ``engine="torch"``: the built-in engine (continuous batching, KV cache); options go to
    :class:`assist.engine.TorchEngine` (``device``, ``max_batch``, ``max_len``, ``threads``).
    """
    if engine == "torch":
        from assist.engine import TorchEngine

        return TorchEngine(path, **options)
    raise ValueError(f"unknown engine {engine!r}; this version has: torch")
