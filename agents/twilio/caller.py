"""A stand-in for Twilio's side of a media stream: what a phone caller looks like to the bot.

Twilio's cloud cannot run here, so tests and ``michi-call`` use this peer. Like Twilio, it first
posts the call to the agent's ``/twiml`` webhook (signed when it knows the auth token) and follows
the answer: the ``<Stream>`` URL's path and its ``<Parameter>``s (the stream token among them)
become the stream's ``customParameters``. It speaks the Media Streams WebSocket protocol exactly
as Twilio does (``connected``, ``start``, ``media`` with 8 kHz mu-law in 20 ms chunks, ``dtmf``,
``mark``, ``stop``) and collects what the bot sends back (``media``, ``mark``, ``clear``).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx

import numpy as np
from loguru import logger
from pipecat.audio.utils import create_stream_resampler, pcm_to_ulaw, ulaw_to_pcm
from twilio.request_validator import RequestValidator
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

TWILIO_SAMPLE_RATE_HZ = 8000
CHUNK_SAMPLES = 160  # Twilio sends 20 ms of mu-law per media message


@dataclass
class CallerLog:
    """What the caller received from the bot."""

    bot_audio: bytearray = field(default_factory=bytearray)  # PCM16 8 kHz
    first_audio_at: float | None = None
    audio_arrivals: list[float] = field(default_factory=list)  # monotonic time of each media message
    clears: int = 0
    marks: list[str] = field(default_factory=list)
    other_events: list[dict] = field(default_factory=list)

    def first_audio_after(self, moment: float) -> float | None:
        """Seconds from ``moment`` to the first bot audio that arrived after it, if any."""
        later = [t for t in self.audio_arrivals if t >= moment]
        return later[0] - moment if later else None


class TwilioCaller:
    """One simulated phone call against a media-stream WebSocket URL."""

    def __init__(
        self,
        url: str,
        custom_parameters: dict[str, str] | None = None,
        call_sid: str | None = None,
        account_sid: str | None = None,
    ) -> None:
        self.url = url
        self.stream_sid = "MZ" + uuid.uuid4().hex
        self.call_sid = call_sid or "CA" + uuid.uuid4().hex
        self.account_sid = account_sid or "AC" + uuid.uuid4().hex
        self.custom_parameters = custom_parameters or {}
        self.log = CallerLog()
        self._sequence = 0
        self._chunk = 0
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task | None = None
        self._resampler = create_stream_resampler()
        self.closed = asyncio.Event()
        self.connected_at: float | None = None

    @classmethod
    async def dial(
        cls,
        agent_host: str,
        auth_token: str | None = None,
        public_host: str | None = None,
        account_sid: str | None = None,
        caller_number: str = "+15550100000",
        bot_number: str = "+15550100001",
    ) -> TwilioCaller:
        """Place a call as Twilio does: post the (signed) webhook at ``http://{agent_host}/twiml``,
        then return the caller for the stream its answer names (on ``agent_host``: the
        ``public_host`` of the TwiML is where Twilio would connect). Not connected yet."""
        call_sid = "CA" + uuid.uuid4().hex
        account_sid = account_sid or "AC" + uuid.uuid4().hex
        form = {
            "CallSid": call_sid,
            "AccountSid": account_sid,
            "From": caller_number,
            "To": bot_number,
            "CallStatus": "ringing",
            "Direction": "inbound",
        }
        headers = {}
        if auth_token is not None:
            signed_url = f"https://{public_host or agent_host}/twiml"
            headers["X-Twilio-Signature"] = RequestValidator(auth_token).compute_signature(signed_url, form)
        async with httpx.AsyncClient(timeout=10) as client:
            answer = await client.post(f"http://{agent_host}/twiml", data=form, headers=headers)
        answer.raise_for_status()
        stream = ElementTree.fromstring(answer.content).find("./Connect/Stream")
        if stream is None:
            raise ValueError(f"the webhook answered without <Connect><Stream>: {answer.text[:200]!r}")
        parameters = {p.attrib["name"]: p.attrib["value"] for p in stream.findall("Parameter")}
        path = urlsplit(stream.attrib["url"]).path or "/"
        return cls(f"ws://{agent_host}{path}", parameters, call_sid=call_sid, account_sid=account_sid)

    async def __aenter__(self) -> TwilioCaller:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.hang_up()

    def _next_sequence(self) -> str:
        self._sequence += 1
        return str(self._sequence)

    async def _send(self, message: dict) -> None:
        assert self._ws is not None, "connect() first"
        await self._ws.send(json.dumps(message))

    async def connect(self) -> None:
        self._ws = await connect(self.url, open_timeout=10)
        self.connected_at = time.monotonic()
        self._reader = asyncio.create_task(self._read(), name="twilio-caller-reader")
        await self._send({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        await self._send(
            {
                "event": "start",
                "sequenceNumber": self._next_sequence(),
                "start": {
                    "accountSid": self.account_sid,
                    "streamSid": self.stream_sid,
                    "callSid": self.call_sid,
                    "tracks": ["inbound"],
                    "customParameters": self.custom_parameters,
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                },
                "streamSid": self.stream_sid,
            }
        )

    async def send_audio(self, pcm16_8k: np.ndarray, realtime: bool = True) -> None:
        """Send caller audio (int16, 8 kHz) as 20 ms media messages, paced like a phone line."""
        started = time.monotonic()
        for i in range(0, len(pcm16_8k) - CHUNK_SAMPLES + 1, CHUNK_SAMPLES):
            chunk = pcm16_8k[i : i + CHUNK_SAMPLES].astype(np.int16).tobytes()
            payload = await pcm_to_ulaw(chunk, TWILIO_SAMPLE_RATE_HZ, TWILIO_SAMPLE_RATE_HZ, self._resampler)
            self._chunk += 1
            await self._send(
                {
                    "event": "media",
                    "sequenceNumber": self._next_sequence(),
                    "media": {
                        "track": "inbound",
                        "chunk": str(self._chunk),
                        "timestamp": str(self._chunk * 20),
                        "payload": base64.b64encode(payload).decode(),
                    },
                    "streamSid": self.stream_sid,
                }
            )
            if realtime:
                # Pace on the wall clock, not per sleep, so pacing errors never accumulate.
                delay = started + self._chunk_time(i) - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)

    @staticmethod
    def _chunk_time(sample_index: int) -> float:
        return (sample_index + CHUNK_SAMPLES) / TWILIO_SAMPLE_RATE_HZ

    async def press(self, digit: str) -> None:
        await self._send(
            {
                "event": "dtmf",
                "streamSid": self.stream_sid,
                "sequenceNumber": self._next_sequence(),
                "dtmf": {"track": "inbound_track", "digit": digit},
            }
        )

    async def hang_up(self) -> None:
        """Send ``stop`` as Twilio does when the caller hangs up, then close the socket."""
        if self._ws is None:
            return
        try:
            await self._send(
                {
                    "event": "stop",
                    "sequenceNumber": self._next_sequence(),
                    "streamSid": self.stream_sid,
                    "stop": {"accountSid": self.account_sid, "callSid": self.call_sid},
                }
            )
            await self._ws.close()
        except ConnectionClosed:
            pass
        if self._reader is not None:
            await asyncio.wait_for(asyncio.gather(self._reader, return_exceptions=True), 10)
        self._ws = None

    async def _read(self) -> None:
        assert self._ws is not None
        try:
            async for raw in self._ws:
                message = json.loads(raw)
                event = message.get("event")
                if event == "media":
                    ulaw = base64.b64decode(message["media"]["payload"])
                    pcm = await ulaw_to_pcm(ulaw, TWILIO_SAMPLE_RATE_HZ, TWILIO_SAMPLE_RATE_HZ, self._resampler)
                    now = time.monotonic()
                    self.log.audio_arrivals.append(now)
                    if self.log.first_audio_at is None:
                        self.log.first_audio_at = now
                    self.log.bot_audio.extend(pcm)
                elif event == "clear":
                    self.log.clears += 1
                elif event == "mark":
                    self.log.marks.append(message.get("mark", {}).get("name", ""))
                else:
                    self.log.other_events.append(message)
        except ConnectionClosed:
            pass
        except Exception:
            logger.exception("twilio caller: bad message from the bot")
        finally:
            self.closed.set()
