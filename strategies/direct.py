"""``direct``: ask for the final line only — the baseline every other strategy must beat."""

from __future__ import annotations

from dataclasses import dataclass

from assist.prompts import DIRECT_SUFFIX
from strategies._prompted import Prompted
from strategies._spec import register

__all__ = ["Direct"]


@register("direct")
@dataclass(repr=False)
class Direct(Prompted):
    suffix: str = DIRECT_SUFFIX
