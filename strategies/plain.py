"""``plain``: the conversation as given, one greedy call (what a bare model name does)."""

from __future__ import annotations

from dataclasses import dataclass

from strategies._prompted import Prompted
from strategies._spec import register

__all__ = ["Plain"]


@register("plain")
@dataclass(repr=False)
class Plain(Prompted):
    suffix: str = ""
