"""``cot``: chain of thought — "spread the reasoning over more tokens" before answering."""

from __future__ import annotations

from dataclasses import dataclass

from assist.prompts import COT_SUFFIX
from strategies._prompted import Prompted
from strategies._spec import register

__all__ = ["ChainOfThought"]


@register("cot")
@dataclass(repr=False)
class ChainOfThought(Prompted):
    suffix: str = COT_SUFFIX
