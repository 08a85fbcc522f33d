"""Serving the worker app with uvicorn: ``WorkerServer`` (ends calls with ``ended(shutdown)``
before it stops), the listening socket, and ``running_worker`` for tests and embedding."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI

from pipecat_michi.engine.engine import DuplexEngine
from pipecat_michi.serving import served
from pipecat_michi.worker.app import create_app
from pipecat_michi.worker.config import WorkerConfig
from pipecat_michi.worker.protocol import CALL_PATH
from pipecat_michi.worker.state import Worker


class WorkerServer(uvicorn.Server):
    """uvicorn's server, which first ends the app's calls with ``ended(shutdown)`` and 1001
    (uvicorn alone would drop them with 1012) before it stops."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self._worker: Worker = app.state.worker

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await self._worker.end_calls()
        await super().shutdown(sockets=sockets)


def create_server(app: FastAPI, config: WorkerConfig, **uvicorn_options: Any) -> WorkerServer:
    """A ``WorkerServer`` for ``app``: binds ``config.host``/``config.port`` (unless it is
    given sockets), WebSocket messages limited to ``config.max_message_bytes`` (larger ones
    close with 1009)."""
    options: dict[str, Any] = {
        "host": config.host,
        "port": config.port,
        # The sans-I/O websockets implementation: 1009 on oversized messages, 403 on a close
        # before accept, and write back-pressure on sends.
        "ws": "websockets-sansio",
        "ws_max_size": config.max_message_bytes,
        # PCM does not compress; deflate would only cost CPU on both ends.
        "ws_per_message_deflate": False,
        "lifespan": "on",
        "log_level": "info",
        **config.server.uvicorn_options(),
    }
    options.update(uvicorn_options)
    return WorkerServer(uvicorn.Config(app, **options), app)


def bind_listener(host: str, port: int, send_buffer_bytes: int | None) -> socket.socket:
    """The worker's listening socket. Accepted sockets inherit its send buffer size."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if send_buffer_bytes is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer_bytes)
    sock.bind((host, port))
    return sock


@dataclass(frozen=True)
class RunningWorker:
    """A worker served by ``running_worker``: where to reach it, and its parts."""

    url: str  # the call URL, ws://host:port/v1/call
    http_url: str  # http://host:port, for /healthz, /readyz, /metrics, /v1/stats
    app: FastAPI
    server: WorkerServer

    @property
    def engine(self) -> DuplexEngine:
        return self.app.state.worker.engine


@asynccontextmanager
async def running_worker(
    config: WorkerConfig, engine: DuplexEngine | None = None, startup_timeout_s: float = 60.0, port: int = 0
) -> AsyncIterator[RunningWorker]:
    """Serve a worker in this event loop on ``config.host`` and ``port`` (0: one the OS picks;
    tests, embedding); shut it down (calls told ``ended(shutdown)``) on exit."""
    sock = bind_listener(config.host, port, config.send_buffer_bytes)
    host, port = sock.getsockname()[:2]
    app = create_app(config, engine)
    server = create_server(app, config, log_config=None, log_level="warning")
    async with served(server, sock, startup_timeout_s):
        yield RunningWorker(f"ws://{host}:{port}{CALL_PATH}", f"http://{host}:{port}", app, server)
