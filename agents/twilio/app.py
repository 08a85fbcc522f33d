"""The Twilio phone bot: ``POST /twiml`` answers a call, ``WS /ws`` carries its audio.

Twilio calls the TwiML webhook when someone dials your number; the answer connects the call to
our media-stream WebSocket, where a Pipecat pipeline (Twilio serializer, 8 kHz mu-law) runs
MichiAI in place of STT -> LLM -> TTS.

Both endpoints face the internet (docs/security.md): the webhook checks Twilio's signature
(after a size check, before parsing), and a media stream is only run for a call that webhook
answered, carrying the short-lived token its answer handed out -- checked before a model slot
is taken. The bot hangs up only calls the webhook answered, through Twilio's typed client.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qsl

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import PlainTextResponse, Response
from loguru import logger
from pipecat.frames.frames import Frame, InputDTMFFrame
from pipecat.observers.base_observer import BaseObserver
from pipecat.pipeline.worker import PipelineParams
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.serializers.twilio import TwilioFrameSerializer
from pipecat.transports.websocket.fastapi import FastAPIWebsocketParams, FastAPIWebsocketTransport
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.websockets import WebSocketDisconnect, WebSocketState
from twilio.http.http_client import TwilioHttpClient
from twilio.request_validator import RequestValidator
from twilio.rest import Client
from twilio.twiml.voice_response import Connect, Stream, VoiceResponse

from agents.common import (
    CallerSilenceWatchdog,
    ObserverFactory,
    michi_pipeline,
    run_call_pipeline,
)
from agents.twilio.config import TwilioAgentConfig
from agents.twilio.security import (
    ACCOUNT_SID_PATTERN,
    STREAM_TOKEN_PARAMETER,
    BodyTooLargeError,
    CallRegistry,
    StreamTokens,
    clipped,
    masked,
    read_capped_body,
    valid_call_sid,
)
from pipecat_michi.engine.call import DuplexBackend, LocalEngine
from pipecat_michi.serving import RateLimitedLog

TWILIO_SAMPLE_RATE_HZ = 8000
# Call details Twilio posts to the webhook that we forward to the stream as custom parameters.
FORWARDED_CALL_FIELDS = ("From", "To")
# Twilio sends ``connected`` then ``start`` at once; a stream that has not started by then is dropped.
START_TIMEOUT_S = 10.0
HANG_UP_TIMEOUT_S = 10.0

# WebSocket close codes of refused streams (4000-4999: application codes).
CLOSE_NOT_A_STREAM = 4400  # no valid Twilio ``start`` message
CLOSE_UNAUTHORIZED = 4401  # token missing, invalid or expired; unknown or foreign call


class _StartDetails(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    stream_sid: str = Field(alias="streamSid", min_length=1, max_length=64)
    call_sid: str = Field(alias="callSid", max_length=64)
    account_sid: str = Field(alias="accountSid", max_length=64)
    custom_parameters: dict[str, str] = Field(default_factory=dict, alias="customParameters")


class _StartMessage(BaseModel):
    """Twilio's ``start`` message, the fields the bot relies on."""

    model_config = ConfigDict(extra="ignore")

    event: str
    start: _StartDetails


class _StreamRefused(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


class DTMFLogger(FrameProcessor):
    """Logs keypad presses; subclass or replace it to act on them (menus, transfers)."""

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, InputDTMFFrame):
            # Digits can be PINs or card numbers: which key, only at DEBUG.
            logger.info("caller pressed a key")
            logger.debug(f"caller pressed {frame.button.value}")
        await self.push_frame(frame, direction)


def twiml_for(stream_url: str, parameters: dict[str, str]) -> str:
    """``<Response><Connect><Stream url=...>`` with custom parameters, via twilio's builder."""
    response = VoiceResponse()
    connect = Connect()
    stream = Stream(url=stream_url)
    for name, value in parameters.items():
        stream.parameter(name=name, value=value)
    connect.append(stream)
    response.append(connect)
    return str(response)


class TwilioHangUp:
    """Ends calls through Twilio's typed REST client: ``calls(sid).update(status="completed")``.

    Only for sids that passed ``valid_call_sid`` and that the webhook answered; the client
    builds the URL, never a string from input.
    """

    def __init__(self, config: TwilioAgentConfig) -> None:
        assert config.twilio_account_sid and config.twilio_auth_token
        self._client = Client(
            config.twilio_account_sid,
            config.twilio_auth_token.get_secret_value(),
            http_client=TwilioHttpClient(timeout=HANG_UP_TIMEOUT_S),
        )
        if config.twilio_api_base_url:
            self._client.api.base_url = config.twilio_api_base_url

    async def hang_up(self, call_sid: str) -> None:
        if not valid_call_sid(call_sid):
            raise ValueError(f"refusing to hang up a malformed call sid {clipped(call_sid, 40)!r}")
        # twilio's client is synchronous (requests): off the event loop.
        await asyncio.to_thread(self._client.calls(call_sid).update, status="completed")


def create_app(
    config: TwilioAgentConfig, backend: DuplexBackend | None = None, observers: ObserverFactory | None = None
) -> FastAPI:
    """The phone bot's ASGI app. ``backend`` defaults to what ``config.backend`` names;
    ``observers`` makes each call's pipeline observers."""
    validator = RequestValidator(config.twilio_auth_token.get_secret_value()) if config.checks_signatures else None
    if validator is None:
        logger.warning("Twilio signature validation is OFF: anyone who reaches /twiml can start calls")
    secret = config.stream_token_secret.get_secret_value().encode() if config.stream_token_secret else None
    tokens = StreamTokens(secret, config.stream_token_ttl_s)
    registry = CallRegistry(config.max_pending_calls, config.stream_token_ttl_s)
    hang_up = TwilioHangUp(config) if config.can_hang_up else None
    refusals = RateLimitedLog()
    calls: set[asyncio.Task] = set()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.backend = backend or config.backend.make_backend()
        if isinstance(app.state.backend, LocalEngine):
            await app.state.backend.start()  # load the model before the first caller, not during the call
        yield
        for task in list(calls):
            task.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
        await app.state.backend.close()

    # No /docs, /redoc or /openapi.json: nothing to browse on a phone bot.
    app = FastAPI(title="MichiAI Twilio agent", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.calls = registry

    @app.post("/twiml")
    async def twiml(request: Request) -> Response:
        try:
            body = await read_capped_body(request, config.max_webhook_body_bytes)
        except BodyTooLargeError as exc:
            refusals.warning(f"rejected /twiml: {exc}")
            return PlainTextResponse("request body too large", status_code=413)
        try:
            form = dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=100))
        except (UnicodeDecodeError, ValueError):
            return PlainTextResponse("body must be a URL-encoded form", status_code=400)
        if validator is not None:
            url = f"https://{config.public_host}{request.url.path}"
            if request.url.query:
                url += f"?{request.url.query}"
            if not validator.validate(url, form, request.headers.get("X-Twilio-Signature", "")):
                refusals.warning("rejected /twiml: missing or forged X-Twilio-Signature")
                return PlainTextResponse("invalid Twilio signature", status_code=403)
        call_sid = form.get("CallSid", "")
        if not valid_call_sid(call_sid):
            refusals.warning("rejected /twiml: CallSid is missing or not a Twilio call sid")
            return PlainTextResponse("CallSid must match ^CA[0-9a-f]{32}$", status_code=400)
        if config.twilio_account_sid and form.get("AccountSid") != config.twilio_account_sid:
            refusals.warning("rejected /twiml: a call of another Twilio account")
            return PlainTextResponse("AccountSid is not this agent's account", status_code=403)
        registry.saw(call_sid)
        host = config.public_host or request.url.netloc
        parameters = {name: form[name][:64] for name in FORWARDED_CALL_FIELDS if name in form}
        parameters[STREAM_TOKEN_PARAMETER] = tokens.issue(call_sid)
        logger.bind(call=call_sid).info(f"answered a call from {masked(form.get('From', ''))}")
        return Response(twiml_for(f"wss://{host}/ws", parameters), media_type="application/xml")

    async def receive_start(websocket: WebSocket) -> _StartDetails:
        """Twilio's ``connected`` then ``start``; anything else within START_TIMEOUT_S is refused."""
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                for _ in range(2):
                    message = json.loads(await websocket.receive_text())
                    if isinstance(message, dict) and message.get("event") == "start":
                        return _StartMessage.model_validate(message).start
        except TimeoutError:
            raise _StreamRefused(CLOSE_NOT_A_STREAM, "no start message in time") from None
        except (ValueError, ValidationError, KeyError, TypeError):
            raise _StreamRefused(CLOSE_NOT_A_STREAM, "not a Twilio media stream start message") from None
        raise _StreamRefused(CLOSE_NOT_A_STREAM, "expected Twilio's connected and start messages")

    def authorize(start: _StartDetails) -> None:
        """Everything checked before a model slot is taken."""
        if not valid_call_sid(start.call_sid):
            raise _StreamRefused(CLOSE_UNAUTHORIZED, "callSid is not a Twilio call sid")
        if config.twilio_account_sid and start.account_sid != config.twilio_account_sid:
            raise _StreamRefused(CLOSE_UNAUTHORIZED, "accountSid is not this agent's account")
        if not config.twilio_account_sid and not ACCOUNT_SID_PATTERN.fullmatch(start.account_sid):
            raise _StreamRefused(CLOSE_UNAUTHORIZED, "accountSid is not a Twilio account sid")
        why = tokens.check(start.call_sid, start.custom_parameters.get(STREAM_TOKEN_PARAMETER))
        if why is None:
            why = registry.claim(start.call_sid)
        if why is not None:
            raise _StreamRefused(CLOSE_UNAUTHORIZED, why)

    @app.websocket("/ws")
    async def media_stream(websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            start = await receive_start(websocket)
            authorize(start)
        except _StreamRefused as refused:
            refusals.warning(f"refused a media stream ({refused.code}): {refused.reason}")
            await _close(websocket, refused.code, refused.reason)
            return
        except (WebSocketDisconnect, RuntimeError):  # the client left before its start message
            return
        task = asyncio.current_task()
        assert task is not None
        calls.add(task)
        try:
            caller_left = await run_call(websocket, start, config, app.state.backend, observers() if observers else None)
            if not caller_left and hang_up is not None:
                log = logger.bind(call=start.call_sid)
                try:
                    await hang_up.hang_up(start.call_sid)
                    log.info("hung up through Twilio's API")
                except Exception as exc:  # noqa: BLE001 - Twilio's API down must not kill the server
                    log.warning(f"could not hang up through Twilio's API: {exc!r}")
            await _close(websocket, 1000, "call ended")
        finally:
            registry.forget(start.call_sid)
            calls.discard(task)

    return app


async def _close(websocket: WebSocket, code: int, reason: str) -> None:
    if websocket.client_state == WebSocketState.CONNECTED and websocket.application_state == WebSocketState.CONNECTED:
        try:
            await websocket.close(code=code, reason=reason)
        except (RuntimeError, OSError, WebSocketDisconnect):
            pass


async def run_call(
    websocket: WebSocket,
    start: _StartDetails,
    config: TwilioAgentConfig,
    backend: DuplexBackend,
    observers: list[BaseObserver] | None = None,
) -> bool:
    """One authorized phone call: the pipeline until hang-up. ``True`` when the caller left."""
    log = logger.bind(call=start.call_sid)
    shown: dict[str, Any] = {
        name: masked(value) if name in FORWARDED_CALL_FIELDS else clipped(value)
        for name, value in list(start.custom_parameters.items())[:8]
        if name != STREAM_TOKEN_PARAMETER
    }
    log.info(f"call connected, stream {start.stream_sid}, parameters {shown}")
    serializer = TwilioFrameSerializer(
        stream_sid=start.stream_sid,
        call_sid=start.call_sid,
        # The bot hangs up itself (TwilioHangUp), only calls the webhook answered.
        params=TwilioFrameSerializer.InputParams(auto_hang_up=False),
    )
    transport = FastAPIWebsocketTransport(
        websocket=websocket,
        params=FastAPIWebsocketParams(
            audio_in_enabled=True, audio_out_enabled=True, add_wav_header=False, serializer=serializer
        ),
    )
    watchdog = CallerSilenceWatchdog(config.caller_silence_timeout_s)
    pipeline, _, _ = michi_pipeline(transport, config.backend, backend, watchdog, DTMFLogger())
    params = PipelineParams(
        audio_in_sample_rate=TWILIO_SAMPLE_RATE_HZ, audio_out_sample_rate=TWILIO_SAMPLE_RATE_HZ, enable_metrics=True
    )
    return await run_call_pipeline(transport, pipeline, params, config.backend.max_call_s, log, observers)
