"""What a worker's endpoints share: its config, engine, metrics, auth and live calls."""

from __future__ import annotations

import asyncio
from typing import Final, Protocol

from loguru import logger

from pipecat_michi.engine.engine import DuplexEngine
from pipecat_michi.serving import RateLimitedLog
from pipecat_michi.worker.auth import TokenAuth
from pipecat_michi.worker.config import WorkerConfig
from pipecat_michi.worker.metrics import WorkerMetrics

# How long a shutting-down worker waits for its calls to say goodbye.
SHUTDOWN_GRACE_S: Final = 3.0


class LiveCall(Protocol):
    """What the worker needs of a live call (``CallHandler`` registers itself in ``calls``)."""

    finished: asyncio.Event
    admitted: bool
    token_id: int | None

    def shut_down(self) -> None:
        """Ask the call to end with ``ended(shutdown)`` and close 1001."""
        ...


class Worker:
    """What the app's endpoints share: config, engine, metrics, and the live calls."""

    def __init__(self, config: WorkerConfig, engine: DuplexEngine) -> None:
        self.config = config
        self.engine = engine
        self.metrics = WorkerMetrics(engine)
        self.started = False
        self.stopping = False
        self.calls: set[LiveCall] = set()
        tokens = [secret for secret in (config.token, *config.tenant_tokens) if secret is not None]
        self.auth = TokenAuth(tokens, config.max_call_opens_per_minute)
        # Refusals of strangers are logged at a bounded rate: a token-guessing run is no log flood.
        self.refusals = RateLimitedLog()

    def admitted_calls(self, token_id: int) -> int:
        """Calls past admission that presented token ``token_id``."""
        return sum(1 for call in self.calls if call.admitted and call.token_id == token_id)

    async def end_calls(self, timeout_s: float = SHUTDOWN_GRACE_S) -> None:
        """Tell every live call the worker is going away (``ended(shutdown)``, 1001); wait
        for them to finish, at most ``timeout_s``."""
        self.stopping = True
        calls = list(self.calls)
        if not calls:
            return
        logger.info(f"Ending {len(calls)} call(s): the worker is shutting down")
        for call in calls:
            call.shut_down()
        waiters = [asyncio.create_task(call.finished.wait()) for call in calls]
        _, late = await asyncio.wait(waiters, timeout=timeout_s)
        for waiter in late:
            waiter.cancel()
        if late:
            logger.warning(f"{len(late)} call(s) did not end within {timeout_s:g} s")
