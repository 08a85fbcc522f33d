"""Test support: real uvicorn servers on loopback ports the OS picks, and bounded waits."""

import asyncio
import inspect
from collections.abc import Awaitable, Callable

from pipecat_michi.serving import serve_on_loopback


# Real uvicorn servers on loopback ports the OS picks.
serve = serve_on_loopback


async def eventually(
    condition: Callable[[], bool | Awaitable[bool]],
    timeout_s: float = 10.0,
    what: str = "condition",
    poll_s: float = 0.01,
) -> None:
    """Wait until ``condition()`` holds (awaited when it returns an awaitable, e.g. a question
    to Ray), checking every ``poll_s``; fail after ``timeout_s``."""

    async def holds() -> bool:
        result = condition()
        return await result if inspect.isawaitable(result) else result

    try:
        async with asyncio.timeout(timeout_s):
            while not await holds():
                await asyncio.sleep(poll_s)
    except TimeoutError:
        raise AssertionError(f"{what} did not hold within {timeout_s} s") from None
