"""Serving an ASGI app on a loopback port the OS picks: for tests, demos and embedding."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn


@asynccontextmanager
async def serve_on_loopback(app, host: str = "127.0.0.1", startup_timeout_s: float = 30.0) -> AsyncIterator[str]:  # noqa: ANN001 - any ASGI app
    """Run ``app`` with uvicorn in this event loop; yield ``"host:port"``; shut down on exit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    serving = asyncio.create_task(server.serve(sockets=[sock]), name="loopback-server")
    try:
        async with asyncio.timeout(startup_timeout_s):
            while not server.started:  # uvicorn offers no startup event to await
                if serving.done():
                    serving.result()
                    raise RuntimeError("the server stopped before it started")
                await asyncio.sleep(0.01)
        yield f"{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        try:
            await asyncio.wait_for(serving, 30)
        finally:
            sock.close()
