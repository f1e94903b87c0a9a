"""assist: a small GPT assistant, trained in four stages and served behind an OpenAI API.

The core package holds the chat format, the prompt conventions and the sampler; the
engines and clients (``assist.load`` / ``assist.connect``) build on them.
"""

from __future__ import annotations

from assist._chat_format import CHAT_TEMPLATE, SPECIAL_TOKENS, render, render_segments
from assist._prompts import Passage, render_passages

__version__ = "0.1.0"

__all__ = [
    "CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "Passage",
    "__version__",
    "render",
    "render_passages",
    "render_segments",
]
