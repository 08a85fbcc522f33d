"""Serving ASGI apps with uvicorn: limits every server of the package starts, and serving on
a loopback port the OS picks (tests, demos, embedding)."""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final

import h11
import uvicorn
from loguru import logger
from pydantic import BaseModel, ConfigDict, Field
from uvicorn.protocols.http.h11_impl import H11Protocol

# What a client gets to send its request line and headers, from the TCP connect on. uvicorn has
# no such limit: a client trickling one header byte at a time kept a socket (an fd) forever.
HEADER_TIMEOUT_S: Final = 10.0
# Largest request head (line + headers) accepted; h11's default is 16 KiB as well, made explicit.
MAX_HEADER_BYTES: Final = 16 * 1024


class ServerLimits(BaseModel):
    """Connection limits for a uvicorn server exposed to untrusted clients.

    Parameters:
        header_timeout_s: Connect to complete request head; the socket is closed after it.
        keep_alive_s: Idle time between two requests on a kept-alive connection.
        max_header_bytes: Largest request head; larger ones get 400.
        max_connections: Open connections plus running requests before new ones get 503
            (uvicorn's ``limit_concurrency``); keeps fds for ``/healthz`` and new calls.
        max_ws_message_bytes: Largest WebSocket message (uvicorn's ``ws_max_size``, 1009
            beyond); ``None`` leaves it to the caller.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    header_timeout_s: float = Field(default=HEADER_TIMEOUT_S, gt=0)
    keep_alive_s: int = Field(default=5, ge=1)
    max_header_bytes: int = Field(default=MAX_HEADER_BYTES, ge=1024)
    max_connections: int = Field(default=256, ge=8)
    max_ws_message_bytes: int | None = Field(default=None, ge=1024)

    def uvicorn_options(self) -> dict[str, Any]:
        """Keyword arguments for ``uvicorn.Config`` that apply these limits."""
        timeout_s = self.header_timeout_s

        class _Protocol(HeaderTimeoutH11Protocol):
            header_timeout_s = timeout_s

        options: dict[str, Any] = {
            "http": _Protocol,
            "timeout_keep_alive": self.keep_alive_s,
            "h11_max_incomplete_event_size": self.max_header_bytes,
            "limit_concurrency": self.max_connections,
        }
        if self.max_ws_message_bytes is not None:
            options["ws_max_size"] = self.max_ws_message_bytes
        return options


class HeaderTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose first request head is not complete
    within ``header_timeout_s`` of the connect (slowloris; half-open sockets)."""

    header_timeout_s: float = HEADER_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_deadline: asyncio.TimerHandle | None = self.loop.call_later(
            self.header_timeout_s, self._header_timeout
        )

    def handle_events(self) -> None:
        super().handle_events()
        if self.headers is not None:  # a whole request head arrived
            self._cancel_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_deadline()
        super().connection_lost(exc)

    def _cancel_header_deadline(self) -> None:
        if getattr(self, "_header_deadline", None) is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _header_timeout(self) -> None:
        self._header_deadline = None
        if self.headers is None and not self.transport.is_closing():
            self.logger.info(f"closing a connection from {self.client}: no request head within {self.header_timeout_s:g} s")
            if self.conn.our_state not in (h11.ERROR, h11.CLOSED):
                try:
                    self.conn.send(h11.ConnectionClosed())
                except h11.LocalProtocolError:
                    pass
            self.transport.close()


@asynccontextmanager
async def served(server: uvicorn.Server, sock: socket.socket, startup_timeout_s: float) -> AsyncIterator[None]:
    """Run ``server`` on the bound ``sock`` in this event loop until the block exits, then shut
    it down and close the socket. Raises what stopped it when it fails to start in time."""
    serving = asyncio.create_task(server.serve(sockets=[sock]), name="uvicorn-server")
    try:
        async with asyncio.timeout(startup_timeout_s):
            while not server.started:  # uvicorn offers no startup event to await
                if serving.done():
                    serving.result()  # raises what stopped it
                    raise RuntimeError("the server stopped before it started")
                await asyncio.sleep(0.01)
        yield
    finally:
        server.should_exit = True
        try:
            await asyncio.wait_for(serving, 30)
        finally:
            sock.close()


@asynccontextmanager
async def serve_on_loopback(
    app,  # noqa: ANN001 - any ASGI app
    host: str = "127.0.0.1",
    startup_timeout_s: float = 30.0,
    limits: ServerLimits | None = None,
) -> AsyncIterator[str]:
    """Run ``app`` with uvicorn in this event loop; yield ``"host:port"``; shut down on exit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    options = (limits or ServerLimits()).uvicorn_options()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", **options))
    async with served(server, sock, startup_timeout_s):
        yield f"{host}:{sock.getsockname()[1]}"


def configure_production_logging(level: str = "INFO") -> None:
    """loguru to stderr without ``diagnose``: its default handler prints local variables in
    tracebacks, which puts tokens, prompts and callers' audio into the log of a failed call."""
    logger.remove()
    logger.add(sys.stderr, level=level.upper(), diagnose=False, backtrace=False)


class RateLimitedLog:
    """At most ``burst`` lines per ``period_s``; the rest are counted and summed up in the next
    line that gets through. Refusals of hostile requests must not become a log flood."""

    def __init__(self, burst: int = 10, period_s: float = 60.0) -> None:
        self._burst, self._period_s = burst, period_s
        self._window_start = 0.0
        self._in_window = 0
        self._suppressed = 0

    def warning(self, message: str) -> None:
        now = time.monotonic()
        if now - self._window_start > self._period_s:
            self._window_start, self._in_window = now, 0
        if self._in_window >= self._burst:
            self._suppressed += 1
            return
        self._in_window += 1
        if self._suppressed:
            message += f" ({self._suppressed} similar line(s) suppressed)"
            self._suppressed = 0
        logger.warning(message)


class BodyLimitMiddleware:
    """ASGI middleware: HTTP request bodies over ``max_bytes`` get 413 -- by ``Content-Length``
    before the app runs, and while streaming for a body without one (the app then sees the
    client disconnect). Frameworks read a whole body before validating it; this bounds that."""

    def __init__(self, app, max_bytes: int) -> None:  # noqa: ANN001 - any ASGI app
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001 - ASGI
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._too_large(send)
            return
        received = 0
        response_started = False

        async def counting_receive():  # noqa: ANN202 - ASGI
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    if not response_started:
                        await self._too_large(send)
                    return {"type": "http.disconnect"}
            return message

        async def tracking_send(message) -> None:  # noqa: ANN001 - ASGI
            nonlocal response_started
            if message["type"] == "http.response.start":
                if received > self.max_bytes:
                    return  # the 413 went out already
                response_started = True
            elif received > self.max_bytes and not response_started:
                return
            await send(message)

        await self.app(scope, counting_receive, tracking_send)

    async def _too_large(self, send) -> None:  # noqa: ANN001 - ASGI
        body = f"request body over {self.max_bytes} bytes".encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
