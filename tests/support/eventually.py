"""Waiting, in async tests, for something a background task does."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def eventually(predicate: Callable[[], bool], seconds: float = 2.0, step: float = 0.01) -> bool:
    """Poll `predicate` until it holds or `seconds` pass; return its last value (assert on it)."""
    for _ in range(int(seconds / step)):
        if predicate():
            return True
        await asyncio.sleep(step)
    return bool(predicate())
