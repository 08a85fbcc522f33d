"""The worker's ASGI app: one WebSocket per call at ``CALL_PATH`` (``CallHandler``), ``/healthz``,
``/readyz``, Prometheus ``/metrics`` and ``GET /v1/stats`` (bearer token); the lifespan starts
and stops the engine."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final

from fastapi import FastAPI, Request, Response, WebSocket
from fastapi.responses import JSONResponse
from loguru import logger
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from pipecat_michi.engine.engine import DuplexEngine
from pipecat_michi.worker.call import CallHandler
from pipecat_michi.worker.config import WorkerConfig, WorkerConfigError, check_config
from pipecat_michi.worker.metrics import WorkerStats
from pipecat_michi.worker.protocol import CALL_PATH, PROTOCOL_VERSION, SAMPLE_RATE_HZ
from pipecat_michi.worker.state import Worker

STATS_PATH: Final = "/v1/stats"


def create_app(config: WorkerConfig, engine: DuplexEngine | None = None) -> FastAPI:
    """The worker's ASGI app. Its lifespan starts ``engine`` (default: one built from
    ``config.engine``) and stops it. Serve it with ``create_server`` (WebSocket limits, and
    calls told ``ended(shutdown)`` before the server goes away).

    Raises:
        WorkerConfigError: See ``check_config``.
    """
    check_config(config)
    if config.token is None and not config.tenant_tokens:
        logger.warning(
            "!!! michi-worker runs WITHOUT AUTHENTICATION: anyone who reaches "
            f"{config.host}:{config.port} can open calls. Use a token anywhere but local development. !!!"
        )
    worker = Worker(config, engine or DuplexEngine(config.engine))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await worker.engine.start()
        if worker.engine.sample_rate_hz != SAMPLE_RATE_HZ:
            await worker.engine.stop()
            raise WorkerConfigError(
                f"the model's codec runs at {worker.engine.sample_rate_hz} Hz; protocol version {PROTOCOL_VERSION} "
                f"carries {SAMPLE_RATE_HZ} Hz audio"
            )
        worker.engine.tick_observers.append(worker.metrics.observe_tick)
        worker.started, worker.stopping = True, False
        try:
            yield
        finally:
            worker.started = False
            await worker.end_calls()  # no-op when WorkerServer already did it
            worker.engine.tick_observers.remove(worker.metrics.observe_tick)
            await worker.engine.stop()

    app = FastAPI(title="michi-worker", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = worker

    @app.websocket(CALL_PATH)
    async def call(websocket: WebSocket) -> None:
        await CallHandler(websocket, worker).handle()

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """Readiness: 200 while the engine runs and the worker is not shutting down."""
        ready = worker.started and not worker.stopping
        body: dict[str, Any] = {
            "ready": ready,
            "slots_in_use": worker.engine.sessions_in_use,
            "slot_capacity": worker.engine.capacity,
        }
        calibration = worker.engine.calibration
        if calibration is not None:
            # Informational, never a reason to refuse: a slow worker still serves, its operator
            # reads why its calls lag here and in the start-up log.
            body["step_ms_p50"] = round(calibration.step_ms_p50, 2)
            body["real_time"] = calibration.real_time
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(worker.metrics.render(), media_type=CONTENT_TYPE_PLAIN_0_0_4)

    @app.get(STATS_PATH, response_model=WorkerStats)
    async def stats(request: Request) -> WorkerStats | JSONResponse:
        """Counters and step-time percentiles (bearer token required)."""
        if not worker.auth.authorized(request.headers.get("authorization")):
            return JSONResponse(
                {"detail": "missing or wrong bearer token"}, status_code=401, headers={"WWW-Authenticate": "Bearer"}
            )
        return worker.metrics.stats()

    return app
