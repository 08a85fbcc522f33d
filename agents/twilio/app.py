"""The Twilio phone bot: ``POST /twiml`` answers a call, ``WS /ws`` carries its audio.

Twilio calls the TwiML webhook when someone dials your number; the answer connects the call to
our media-stream WebSocket, where a Pipecat pipeline (Twilio serializer, 8 kHz mu-law) runs
MichiAI in place of STT -> LLM -> TTS.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import PlainTextResponse, Response
from loguru import logger
from pipecat.frames.frames import Frame, InputDTMFFrame
from pipecat.observers.base_observer import BaseObserver
from pipecat.pipeline.worker import PipelineParams
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.runner.utils import parse_telephony_websocket
from pipecat.serializers.twilio import TwilioFrameSerializer
from pipecat.transports.websocket.fastapi import FastAPIWebsocketParams, FastAPIWebsocketTransport
from twilio.request_validator import RequestValidator
from twilio.twiml.voice_response import Connect, Stream, VoiceResponse

from agents.common import ObserverFactory, michi_pipeline, run_call_pipeline
from agents.twilio.config import TwilioAgentConfig
from pipecat_michi.engine.call import DuplexBackend

TWILIO_SAMPLE_RATE_HZ = 8000
# Call details Twilio posts to the webhook that we forward to the stream as custom parameters.
FORWARDED_CALL_FIELDS = ("CallSid", "From", "To")


class DTMFLogger(FrameProcessor):
    """Logs keypad presses; subclass or replace it to act on them (menus, transfers)."""

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, InputDTMFFrame):
            logger.info(f"caller pressed {frame.button.value}")
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


def create_app(
    config: TwilioAgentConfig, backend: DuplexBackend | None = None, observers: ObserverFactory | None = None
) -> FastAPI:
    """The phone bot's ASGI app. ``backend`` defaults to what ``config.backend`` names;
    ``observers`` makes each call's pipeline observers."""
    validator = (
        RequestValidator(config.twilio_auth_token.get_secret_value())
        if config.twilio_auth_token is not None and config.validate_signatures
        else None
    )
    if validator is None:
        logger.warning("Twilio signature validation is OFF: anyone can post to /twiml")
    calls: set[asyncio.Task] = set()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.backend = backend or config.backend.make_backend()
        yield
        for task in list(calls):
            task.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
        await app.state.backend.close()

    app = FastAPI(title="MichiAI Twilio agent", lifespan=lifespan)

    @app.post("/twiml")
    async def twiml(request: Request) -> Response:
        form = {k: str(v) for k, v in (await request.form()).items()}
        if validator is not None:
            url = f"https://{config.public_host}{request.url.path}"
            if request.url.query:
                url += f"?{request.url.query}"
            signature = request.headers.get("X-Twilio-Signature", "")
            if not validator.validate(url, form, signature):
                logger.warning("rejected /twiml: missing or forged X-Twilio-Signature")
                return PlainTextResponse("invalid Twilio signature", status_code=403)
        host = config.public_host or request.url.netloc
        parameters = {name: form[name] for name in FORWARDED_CALL_FIELDS if name in form}
        return Response(twiml_for(f"wss://{host}/ws", parameters), media_type="application/xml")

    @app.websocket("/ws")
    async def media_stream(websocket: WebSocket) -> None:
        await websocket.accept()
        task = asyncio.current_task()
        assert task is not None
        calls.add(task)
        try:
            await run_call(websocket, config, app.state.backend, observers() if observers else None)
        finally:
            calls.discard(task)

    return app


async def run_call(
    websocket: WebSocket,
    config: TwilioAgentConfig,
    backend: DuplexBackend,
    observers: list[BaseObserver] | None = None,
) -> None:
    """One phone call: parse Twilio's ``start`` message, then run the pipeline until hang-up."""
    try:
        transport_type, call_data = await asyncio.wait_for(parse_telephony_websocket(websocket), 10)
    except (TimeoutError, ValueError) as exc:
        logger.warning(f"media stream closed before a valid start message: {exc!r}")
        await websocket.close(code=1008)
        return
    if transport_type != "twilio" or not call_data.get("stream_id"):
        logger.warning(f"not a Twilio media stream (detected {transport_type!r}); closing")
        await websocket.close(code=1008)
        return
    log = logger.bind(call=call_data["call_id"])
    log.info(f"call connected, stream {call_data['stream_id']}, parameters {call_data.get('body', {})}")
    serializer = TwilioFrameSerializer(
        stream_sid=call_data["stream_id"],
        call_sid=call_data["call_id"],
        account_sid=config.twilio_account_sid,
        auth_token=config.twilio_auth_token.get_secret_value() if config.twilio_auth_token else None,
        base_url=config.twilio_api_base_url,
        params=TwilioFrameSerializer.InputParams(auto_hang_up=config.can_hang_up),
    )
    transport = FastAPIWebsocketTransport(
        websocket=websocket,
        params=FastAPIWebsocketParams(
            audio_in_enabled=True, audio_out_enabled=True, add_wav_header=False, serializer=serializer
        ),
    )
    pipeline, _, _ = michi_pipeline(transport, config.backend, backend, DTMFLogger())
    params = PipelineParams(
        audio_in_sample_rate=TWILIO_SAMPLE_RATE_HZ, audio_out_sample_rate=TWILIO_SAMPLE_RATE_HZ, enable_metrics=True
    )
    await run_call_pipeline(transport, pipeline, params, config.backend.max_call_s, log, observers)
