"""The WebRTC agent: Pipecat's prebuilt browser client at ``/client``, one pipeline per peer.

Signalling follows Pipecat's runner, so the prebuilt client works unchanged: ``POST /start``
opens a session, then ``POST``/``PATCH /sessions/{id}/api/offer`` (or plain ``/api/offer``)
exchange SDP and ICE candidates. Media flows peer to peer through aiortc.
"""

from __future__ import annotations

import asyncio
import uuid
from contextlib import asynccontextmanager

from aiortc.exceptions import InvalidStateError
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import RedirectResponse
from loguru import logger
from pipecat.pipeline.worker import PipelineParams
from pipecat.transports.base_transport import TransportParams
from pipecat.transports.smallwebrtc.connection import SmallWebRTCConnection
from pipecat.transports.smallwebrtc.request_handler import (
    SmallWebRTCPatchRequest,
    SmallWebRTCRequest,
    SmallWebRTCRequestHandler,
)
from pipecat.transports.smallwebrtc.transport import SmallWebRTCTransport
from pipecat_ai_prebuilt.frontend import PipecatPrebuiltUI
from pydantic import Field, TypeAdapter, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from agents.common import BackendSettings, michi_pipeline, run_call_pipeline
from pipecat_michi.engine.call import DuplexBackend

# Sessions opened by /start that never made an offer are forgotten after this many.
MAX_PENDING_SESSIONS = 256
# Builds the nested ``IceCandidate``s too: ``SmallWebRTCPatchRequest(**body)`` would leave them dicts.
_PATCH_REQUEST = TypeAdapter(SmallWebRTCPatchRequest)


class WebRTCAgentConfig(BaseSettings):
    """The WebRTC agent's settings (``MICHI_`` env prefix; backend under ``MICHI_BACKEND__``)."""

    model_config = SettingsConfigDict(env_prefix="MICHI_", env_nested_delimiter="__", extra="forbid")

    backend: BackendSettings = BackendSettings()
    host: str = "127.0.0.1"
    port: int = Field(default=7860, ge=1, le=65535)
    max_peers: int = Field(default=16, ge=1)
    # A peer that made an offer but is not connected by then is dropped: its call holds a model slot.
    connect_timeout_s: float = Field(default=20.0, gt=0)


def create_app(config: WebRTCAgentConfig, backend: DuplexBackend | None = None) -> FastAPI:
    """The agent's ASGI app. ``backend`` defaults to what ``config.backend`` names."""
    handler = SmallWebRTCRequestHandler()
    pending_sessions: dict[str, dict] = {}
    calls: dict[str, asyncio.Task] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.backend = backend or config.backend.make_backend()
        app.state.calls = calls
        yield
        for task in list(calls.values()):
            task.cancel()
        await asyncio.gather(*calls.values(), return_exceptions=True)
        await handler.close()
        await app.state.backend.close()

    app = FastAPI(title="MichiAI WebRTC agent", lifespan=lifespan)
    app.mount("/client", PipecatPrebuiltUI)

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse(url="/client/")

    @app.post("/start")
    async def start(request: Request) -> dict:
        body = await _json_object(request)
        if len(pending_sessions) >= MAX_PENDING_SESSIONS:
            pending_sessions.pop(next(iter(pending_sessions)))
        session_id = str(uuid.uuid4())
        pending_sessions[session_id] = body.get("body", {}) if isinstance(body.get("body"), dict) else {}
        return {"sessionId": session_id}

    async def answer_offer(offer: SmallWebRTCRequest) -> dict:
        if offer.pc_id is None and len(calls) >= config.max_peers:
            raise HTTPException(status_code=503, detail=f"all {config.max_peers} peers are busy")
        if offer.type != "offer":
            # A browser only ever offers; aiortc fails on anything else with an internal error.
            raise HTTPException(status_code=400, detail=f"invalid SDP offer: type must be 'offer', not {offer.type!r}")
        if "\nm=audio " not in offer.sdp.replace("\r\n", "\n"):
            # aiortc answers an offer without media too; that peer would hold a model slot until
            # the connect watchdog, so a bogus offer is refused here instead.
            raise HTTPException(status_code=400, detail="invalid SDP offer: no audio media section (m=audio)")

        async def on_connection(connection: SmallWebRTCConnection) -> None:
            task = asyncio.create_task(run_peer(connection, config, app.state.backend), name=f"peer-{connection.pc_id}")
            calls[connection.pc_id] = task
            task.add_done_callback(lambda _: calls.pop(connection.pc_id, None))

        try:
            answer = await handler.handle_web_request(request=offer, webrtc_connection_callback=on_connection)
        except (ValueError, InvalidStateError) as exc:  # aiortc's word on an SDP it cannot take
            raise HTTPException(status_code=400, detail=f"invalid SDP offer: {exc}") from None
        if answer is None:
            raise HTTPException(status_code=500, detail="no SDP answer")
        return answer

    @app.post("/api/offer")
    async def offer(offer: SmallWebRTCRequest) -> dict:
        return await answer_offer(offer)

    @app.patch("/api/offer")
    async def ice_candidates(patch: SmallWebRTCPatchRequest) -> dict:
        await handler.handle_patch_request(patch)
        return {"status": "success"}

    @app.api_route("/sessions/{session_id}/api/offer", methods=["POST", "PATCH"])
    async def session_offer(session_id: str, request: Request) -> dict:
        """The prebuilt client's route after ``/start``."""
        if session_id not in pending_sessions:
            raise HTTPException(status_code=404, detail="unknown session; POST /start first")
        body = await _json_object(request)
        try:
            if request.method == "PATCH":
                return await ice_candidates(_PATCH_REQUEST.validate_python(body))
            return await answer_offer(
                SmallWebRTCRequest(
                    sdp=body["sdp"],
                    type=body["type"],
                    pc_id=body.get("pc_id"),
                    restart_pc=body.get("restart_pc"),
                    request_data=body.get("request_data") or body.get("requestData") or pending_sessions[session_id],
                )
            )
        except (KeyError, TypeError, ValidationError) as exc:
            raise HTTPException(status_code=400, detail=f"invalid WebRTC request: {exc!r}") from None

    return app


async def _json_object(request: Request) -> dict:
    try:
        body = await request.json()
    except ValueError:
        raise HTTPException(status_code=400, detail="body must be JSON") from None
    if not isinstance(body, dict):
        raise HTTPException(status_code=400, detail="body must be a JSON object")
    return body


async def run_peer(connection: SmallWebRTCConnection, config: WebRTCAgentConfig, backend: DuplexBackend) -> None:
    """One browser session: the pipeline runs until the peer leaves."""
    log = logger.bind(peer=connection.pc_id)
    transport = SmallWebRTCTransport(
        webrtc_connection=connection,
        params=TransportParams(audio_in_enabled=True, audio_out_enabled=True),
    )
    pipeline, _, _ = michi_pipeline(transport, config.backend, backend)
    watchdog = asyncio.create_task(_drop_if_never_connected(connection, config.connect_timeout_s, log))
    try:
        await run_call_pipeline(transport, pipeline, PipelineParams(enable_metrics=True), config.backend.max_call_s, log)
    finally:
        watchdog.cancel()
        await asyncio.gather(watchdog, return_exceptions=True)


async def _drop_if_never_connected(connection: SmallWebRTCConnection, timeout_s: float, log) -> None:  # noqa: ANN001
    """Close a peer still not connected after ``timeout_s``; closing it ends its call.

    Pipecat only times out peers stuck in ICE "connecting"; one that never answers stays "new"
    and its call would hold a model slot until the server stops.
    """
    await asyncio.sleep(timeout_s)  # a timer, not a synchronisation
    if connection.pc.connectionState in ("new", "connecting"):
        log.warning(f"peer did not connect within {timeout_s:.0f} s; dropping it")
        await connection.disconnect()
