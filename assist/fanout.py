"""Fan-out that leaves nothing behind: the one way this project runs awaitables side by side."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

__all__ = ["gather"]


async def gather(*aws: Awaitable[Any]) -> list[Any]:
    """``asyncio.gather``, except that when one fails (or the caller is cancelled) every
    sibling is cancelled and waited for before the first error propagates, so no call of
    a failed request keeps running unseen. Unlike ``asyncio.TaskGroup`` the error comes out
    as itself, not wrapped in an ExceptionGroup, so the HTTP layer maps it as usual."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
