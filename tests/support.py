"""Test support: real uvicorn servers on loopback ports the OS picks, and bounded waits."""

import asyncio
from collections.abc import Callable

from pipecat_michi.serving import serve_on_loopback


# Real uvicorn servers on loopback ports the OS picks.
serve = serve_on_loopback


async def eventually(condition: Callable[[], bool], timeout_s: float = 10.0, what: str = "condition") -> None:
    """Wait until ``condition()`` holds, checking every 10 ms; fail after ``timeout_s``."""
    try:
        async with asyncio.timeout(timeout_s):
            while not condition():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"{what} did not hold within {timeout_s} s") from None
