"""The WebRTC agent: Pipecat's prebuilt browser client at ``/client``, one pipeline per peer.

Signalling follows Pipecat's runner, so the prebuilt client works unchanged: ``POST /start``
opens a session, then ``POST``/``PATCH /sessions/{id}/api/offer`` (or plain ``/api/offer``)
exchange SDP and ICE candidates. Media flows peer to peer through aiortc.

Admission (docs/security.md): every signalling request must be JSON, from an allowed ``Origin``
(same origin by default: no cross-site form posts), within its client's rate, with the bearer
token when one is set. A new offer reserves one of ``max_peers`` places before anything is
awaited; the place is held by the pending offer and then by the connected peer, and freed when
its call ends. An offer naming a ``pc_id`` must name a live peer (renegotiation).
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import time
import uuid
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

from aiortc.exceptions import InvalidStateError
from fastapi import Depends, FastAPI, HTTPException, Request
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
from pydantic import Field, SecretStr, TypeAdapter, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from agents.common import BackendSettings, michi_pipeline, run_call_pipeline
from pipecat_michi.engine.call import DuplexBackend, LocalEngine
from pipecat_michi.serving import BodyLimitMiddleware, RateLimitedLog, ServerLimits

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
    connect_timeout_s: float = Field(default=10.0, gt=0)
    # Browser origins allowed to signal besides the agent's own (``https://app.example.com``).
    allowed_origins: list[str] = Field(default_factory=list)
    # Bearer token every signalling request must carry (``Authorization: Bearer ...``); None: none.
    token: SecretStr | None = Field(default=None, min_length=16)
    # Signalling requests one client address may make per minute (a sliding window).
    requests_per_minute: int = Field(default=60, ge=1)
    # Largest signalling request body (413 beyond).
    max_body_bytes: int = Field(default=64 * 1024, ge=4096)
    server: ServerLimits = ServerLimits(max_ws_message_bytes=64 * 1024)


class _Admission:
    """Places for peers: a pending offer or a connected peer holds one. Reserved synchronously,
    so concurrent offers cannot all pass a check made before their awaits."""

    def __init__(self, max_peers: int) -> None:
        self.max_peers = max_peers
        self.held = 0

    def reserve(self) -> None:
        if self.held >= self.max_peers:
            raise HTTPException(status_code=503, detail=f"all {self.max_peers} peers are busy; try again later")
        self.held += 1

    def release(self) -> None:
        self.held -= 1


class _ClientRate:
    """Sliding one-minute window of requests per client address (bounded: oldest forgotten)."""

    def __init__(self, per_minute: int, max_clients: int = 4096) -> None:
        self._per_minute = per_minute
        self._max_clients = max_clients
        self._seen: collections.OrderedDict[str, collections.deque[float]] = collections.OrderedDict()

    def allow(self, client: str) -> bool:
        now = time.monotonic()
        times = self._seen.pop(client, None) or collections.deque(maxlen=self._per_minute)
        self._seen[client] = times
        while len(self._seen) > self._max_clients:
            self._seen.popitem(last=False)
        while times and now - times[0] > 60.0:
            times.popleft()
        if len(times) >= self._per_minute:
            return False
        times.append(now)
        return True


def create_app(config: WebRTCAgentConfig, backend: DuplexBackend | None = None) -> FastAPI:
    """The agent's ASGI app. ``backend`` defaults to what ``config.backend`` names."""
    handler = SmallWebRTCRequestHandler()
    pending_sessions: dict[str, dict] = {}
    calls: dict[str, asyncio.Task] = {}
    admission = _Admission(config.max_peers)
    rate = _ClientRate(config.requests_per_minute)
    refusals = RateLimitedLog()
    token = config.token.get_secret_value().encode() if config.token else None

    def refuse(status: int, detail: str, request: Request) -> HTTPException:
        client = request.client.host if request.client else "?"
        refusals.warning(f"refused {request.method} {request.url.path} from {client}: {detail}")
        return HTTPException(status_code=status, detail=detail)

    async def guard(request: Request) -> None:
        """What every signalling request must pass before it is handled (its body, bounded by
        BodyLimitMiddleware, is read by then)."""
        client = request.client.host if request.client else "?"
        if not rate.allow(client):
            raise refuse(429, "too many signalling requests; slow down", request)
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise refuse(415, "signalling requests must be application/json", request)
        origin = request.headers.get("origin")
        if origin is not None and not _origin_allowed(origin, request, config.allowed_origins):
            raise refuse(403, f"origin {origin[:80]!r} may not signal to this agent", request)
        if token is not None:
            scheme, _, presented = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(presented.strip().encode(), token):
                raise refuse(401, "missing or wrong bearer token", request)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.backend = backend or config.backend.make_backend()
        if isinstance(app.state.backend, LocalEngine):
            await app.state.backend.start()  # load the model before the first caller, not during the call
        app.state.calls = calls
        yield
        for task in list(calls.values()):
            task.cancel()
        await asyncio.gather(*calls.values(), return_exceptions=True)
        await handler.close()
        await app.state.backend.close()

    app = FastAPI(title="MichiAI WebRTC agent", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.admission = admission
    # An SDP offer with its candidates is a few KiB; bodies are bounded before FastAPI reads them.
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes)
    app.mount("/client", PipecatPrebuiltUI)

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse(url="/client/")

    @app.post("/start", dependencies=[Depends(guard)])
    async def start(request: Request) -> dict:
        body = await _json_object(request)
        if len(pending_sessions) >= MAX_PENDING_SESSIONS:
            pending_sessions.pop(next(iter(pending_sessions)))
        session_id = str(uuid.uuid4())
        pending_sessions[session_id] = body.get("body", {}) if isinstance(body.get("body"), dict) else {}
        return {"sessionId": session_id}

    async def answer_offer(offer: SmallWebRTCRequest) -> dict:
        if offer.pc_id is not None and offer.pc_id not in calls:
            # A made-up pc_id would make the handler open a new peer outside our count.
            raise HTTPException(status_code=404, detail="unknown pc_id: offer without one to start a call")
        if offer.type != "offer":
            # A browser only ever offers; aiortc fails on anything else with an internal error.
            raise HTTPException(status_code=400, detail=f"invalid SDP offer: type must be 'offer', not {offer.type!r}")
        if "\nm=audio " not in offer.sdp.replace("\r\n", "\n"):
            # aiortc answers an offer without media too; that peer would hold a model slot until
            # the connect watchdog, so a bogus offer is refused here instead.
            raise HTTPException(status_code=400, detail="invalid SDP offer: no audio media section (m=audio)")

        renegotiation = offer.pc_id is not None
        reserved = False
        if not renegotiation:
            admission.reserve()  # before the first await: concurrent offers each see the count
            reserved = True

        async def on_connection(connection: SmallWebRTCConnection) -> None:
            nonlocal reserved
            if connection.pc_id in calls:
                return  # already has its pipeline
            task = asyncio.create_task(run_peer(connection, config, app.state.backend), name=f"peer-{connection.pc_id}")
            calls[connection.pc_id] = task
            reserved = False  # the place now belongs to the call; freed when it ends

            def ended(_: asyncio.Task) -> None:
                calls.pop(connection.pc_id, None)
                admission.release()

            task.add_done_callback(ended)

        try:
            answer = await handler.handle_web_request(request=offer, webrtc_connection_callback=on_connection)
        except HTTPException:
            raise
        # aiortc's word on an SDP it cannot take; its assertions and attribute errors on odd
        # SDPs are the client's fault too, not a 500.
        except (ValueError, InvalidStateError, AssertionError, AttributeError, KeyError, TypeError) as exc:
            raise HTTPException(status_code=400, detail=f"invalid SDP offer: {type(exc).__name__}: {exc}"[:300]) from None
        finally:
            if reserved:
                admission.release()
        if answer is None:
            raise HTTPException(status_code=400, detail="no SDP answer for this offer")
        return answer

    @app.post("/api/offer", dependencies=[Depends(guard)])
    async def offer(offer: SmallWebRTCRequest) -> dict:
        return await answer_offer(offer)

    @app.patch("/api/offer", dependencies=[Depends(guard)])
    async def ice_candidates(patch: SmallWebRTCPatchRequest) -> dict:
        if patch.pc_id not in calls:
            raise HTTPException(status_code=404, detail="unknown pc_id")
        try:
            await handler.handle_patch_request(patch)
        except (ValueError, AssertionError, AttributeError, KeyError, TypeError) as exc:
            raise HTTPException(status_code=400, detail=f"invalid ICE candidates: {type(exc).__name__}") from None
        return {"status": "success"}

    @app.api_route("/sessions/{session_id}/api/offer", methods=["POST", "PATCH"], dependencies=[Depends(guard)])
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


def _origin_allowed(origin: str, request: Request, allowed: list[str]) -> bool:
    """Same origin as the request's ``Host`` (any scheme: TLS may end at a proxy), or listed."""
    if origin.rstrip("/") in (a.rstrip("/") for a in allowed):
        return True
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and bool(parts.netloc) and parts.netloc == request.headers.get("host")


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
    caller_left = True
    try:
        caller_left = await run_call_pipeline(
            transport, pipeline, PipelineParams(enable_metrics=True), config.backend.max_call_s, log
        )
    finally:
        watchdog.cancel()
        await asyncio.gather(watchdog, return_exceptions=True)
        if not caller_left:
            # The bot ended the call (time limit, backend gone): hang up the peer too, rather
            # than leave a browser connected to a pipeline that no longer runs.
            log.info("the bot ended the call; closing the peer connection")
            await connection.disconnect()


async def _drop_if_never_connected(connection: SmallWebRTCConnection, timeout_s: float, log) -> None:  # noqa: ANN001
    """Close a peer still not connected after ``timeout_s``; closing it ends its call.

    Pipecat only times out peers stuck in ICE "connecting"; one that never answers stays "new"
    and its call would hold a model slot until the server stops.
    """
    await asyncio.sleep(timeout_s)  # a timer, not a synchronisation
    if connection.pc.connectionState in ("new", "connecting"):
        log.warning(f"peer did not connect within {timeout_s:.0f} s; dropping it")
        await connection.disconnect()
