"""michi-worker: the GPU worker, a FastAPI app serving one ``DuplexEngine`` over WebSockets.

One WebSocket per call at ``CALL_PATH``, speaking the protocol of ``docs/protocol.md``
(codec in ``protocol.py``). Per call, tasks owned by its ``_CallHandler``:

- the reader decodes client messages: audio goes straight into the engine session, settings
  apply from the next tick, a reset waits for earlier injections then empties the slot, and
  ``inject_text`` goes, in order, to
- the injection task, which prefills one text at a time and answers each (STEPs go on);
- the writer turns each ``StepResult`` into a STEP message;
- a watcher for the worker's shutdown.

Whichever task finishes first decides how the call ends (``_Ending``); the others are
cancelled and the engine session is closed on every path, so a slot is free again within one
tick of a disconnect. A bad message ends its call, never the process.

Also ``/healthz``, ``/readyz``, Prometheus ``/metrics`` and ``GET /v1/stats`` (bearer token).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hmac
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import uvicorn
from fastapi import FastAPI, Request, Response, WebSocket
from fastapi.responses import JSONResponse
from loguru import logger
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.websockets import WebSocketDisconnect

from pipecat_michi.engine.batch import ContextTooLongError
from pipecat_michi.engine.config import QUANTIZE_MODES, EngineConfig
from pipecat_michi.engine.engine import (
    DuplexEngine,
    EngineFullError,
    EngineSession,
    FrameOrderError,
    SessionClosedError,
    StepResult,
)
from pipecat_michi.serving import ServerLimits, configure_production_logging
from pipecat_michi.worker.metrics import WorkerMetrics, WorkerStats
from pipecat_michi.worker.protocol import (
    CALL_PATH,
    HANDSHAKE_TIMEOUT_S,
    IDLE_TIMEOUT_S,
    MAX_MESSAGE_BYTES,
    MAX_TEXT_CHARS,
    PROTOCOL_VERSION,
    AudioFrame,
    ClientMessage,
    CloseCode,
    EndedMessage,
    EndMessage,
    ErrorMessage,
    HelloMessage,
    InjectedMessage,
    InjectTextMessage,
    ProtocolError,
    ReadyMessage,
    ResetMessage,
    StepMessage,
    UpdateSettingsMessage,
    decode_client_message,
    encode_message,
    close_reason,
)

STATS_PATH: Final = "/v1/stats"
# Injections queued behind a slow one before the reader stops reading (the client's socket
# then fills: back-pressure instead of unbounded memory).
MAX_PENDING_INJECTIONS: Final = 16
# Bound on the last messages of a call (ended/error, close): a client that stopped reading
# must not hold its handler forever.
FINAL_SEND_TIMEOUT_S: Final = 2.0
# How long a shutting-down worker waits for its calls to say goodbye.
SHUTDOWN_GRACE_S: Final = 3.0
# Per-call socket send buffer: ~16 STEPs with audio, about 1.3 s of speech (see WorkerConfig).
SEND_BUFFER_BYTES: Final = 64 * 1024
# Default bound on one call's length: a client streaming forever would hold its slot forever.
MAX_CALL_S: Final = 3600.0
_MAX_TRACKED_ARRIVALS: Final = 256
_OPEN_RATE_WINDOW_S: Final = 60.0


class WorkerConfigError(ValueError):
    """The worker's configuration cannot be served as given."""


class WorkerConfig(BaseSettings):
    """How a worker serves: address, auth, limits and its engine.

    Read from the environment with the prefix ``MICHI_WORKER_`` (``MICHI_WORKER_TOKEN``,
    ``MICHI_WORKER_PORT``, ...); nested engine settings use ``__``, for instance
    ``MICHI_WORKER_ENGINE__SLOT_CAPACITY=32``. Keyword arguments win over the environment.

    Parameters:
        host: Interface to bind; loopback unless told otherwise.
        port: TCP port.
        token: Bearer token every call and ``/v1/stats`` must present. ``None`` refuses to
            start unless ``allow_unauthenticated`` (or ``tenant_tokens`` are set).
        tenant_tokens: More accepted tokens, e.g. one per customer, each counted on its own by
            ``max_calls_per_token`` (``MICHI_WORKER_TENANT_TOKENS='["...", "..."]'``).
        allow_unauthenticated: Serve without a token (development on loopback only).
        engine: The engine's configuration (model, device, slots, clocks).
        handshake_timeout_s: Upgrade to ``hello``; then close 4002.
        idle_timeout_s: Silence from a client after ``ready``; then close 4003.
        max_message_bytes: Largest WebSocket message accepted; larger ones close with 1009.
        send_buffer_bytes: Kernel send buffer of each call's socket (Linux doubles it). Small on
            purpose: a call needs ~50 kB/s, and a client that stops reading should make the
            worker drop its oldest STEPs (it gets recent audio when it recovers) after about a
            second, not after the OS's autotuned megabytes of stale audio. ``None``: the OS's.
        max_call_s: Longest a call may last from ``ready``; then ``ended(max_duration)`` and
            close 1000. ``None``: no limit.
        max_calls_per_token: Calls one bearer token (``token`` or one of ``tenant_tokens``) may
            hold on this worker at once; one more gets a fatal ``error`` 1013 (the client tries
            another worker). ``None``: no limit beyond the slots.
        max_call_opens_per_minute: Calls one token may open per minute (a sliding window); more
            get 1013. Opening a call prefills prompts, which delays every other call's ticks.
        max_flow_steps: Most ``flow_steps`` a call may ask for: every call in the batch waits
            for the slowest one's flow head. More is refused with 4000.
        server: HTTP limits (header timeout, keep-alive, max connections) against slow clients.
    """

    model_config = SettingsConfigDict(
        env_prefix="MICHI_WORKER_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    host: str = "127.0.0.1"
    port: int = Field(default=8765, ge=0, le=65535)
    token: SecretStr | None = None
    tenant_tokens: list[SecretStr] = Field(default_factory=list)
    allow_unauthenticated: bool = False
    engine: EngineConfig = EngineConfig()
    handshake_timeout_s: float = Field(default=HANDSHAKE_TIMEOUT_S, gt=0)
    idle_timeout_s: float = Field(default=IDLE_TIMEOUT_S, gt=0)
    max_message_bytes: int = Field(default=MAX_MESSAGE_BYTES, ge=1024, le=MAX_MESSAGE_BYTES)
    send_buffer_bytes: int | None = Field(default=SEND_BUFFER_BYTES, ge=4096)
    max_call_s: float | None = Field(default=MAX_CALL_S, gt=0)
    max_calls_per_token: int | None = Field(default=None, ge=1)
    max_call_opens_per_minute: int | None = Field(default=120, ge=1)
    max_flow_steps: int = Field(default=4, ge=1)
    server: ServerLimits = ServerLimits()


@dataclass(frozen=True)
class _Ending:
    """How a call ends: what the client is told (if it can still hear) and the close code.

    ``ended_reason`` set: an ``ended`` message (normal ends); otherwise a fatal ``error``.
    """

    code: int
    message: str
    ended_reason: str | None = None
    client_gone: bool = False

    @classmethod
    def from_protocol_error(cls, error: ProtocolError) -> _Ending:
        return cls(int(error.code), error.message)

    @classmethod
    def disconnected(cls, code: int) -> _Ending:
        return cls(code, f"the client went away (close code {code})", client_gone=True)


class _CallEnded(Exception):
    """Unwinds a call's task with the way the call ends."""

    def __init__(self, ending: _Ending) -> None:
        super().__init__(ending.message)
        self.ending = ending


class _Worker:
    """What the app's endpoints share: config, engine, metrics, and the live calls."""

    def __init__(self, config: WorkerConfig, engine: DuplexEngine) -> None:
        self.config = config
        self.engine = engine
        self.metrics = WorkerMetrics(engine)
        self.started = False
        self.stopping = False
        self.calls: set[_CallHandler] = set()
        self._tokens = [
            secret.get_secret_value().encode("utf-8")
            for secret in (config.token, *config.tenant_tokens)
            if secret is not None
        ]
        # Per token id: monotonic times of its recent call opens (max_call_opens_per_minute).
        self._opens: dict[int, collections.deque[float]] = {}

    def token_id(self, authorization: str | None) -> int | None:
        """Which accepted token an ``Authorization`` header carries (0: ``token``, then the
        ``tenant_tokens`` in order), ``None`` for none. Tokens are known by this index only:
        the secret itself is never kept with a call, logged or counted under."""
        if not self._tokens:
            return 0  # allow_unauthenticated, checked at creation
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer":
            return None
        guess = presented.strip().encode("utf-8")
        match = None
        # Constant time, and every token compared: the timing tells neither how much of a guess
        # matched nor which token it was closest to.
        for index, token in enumerate(self._tokens):
            if hmac.compare_digest(guess, token) and match is None:
                match = index
        return match

    def authorized(self, authorization: str | None) -> bool:
        """Whether an ``Authorization`` header carries one of the worker's bearer tokens."""
        return self.token_id(authorization) is not None

    def may_open(self, token_id: int) -> bool:
        """Count one call open for ``token_id``; ``False`` when it is over its per-minute rate."""
        limit = self.config.max_call_opens_per_minute
        if limit is None:
            return True
        now = time.monotonic()
        opens = self._opens.setdefault(token_id, collections.deque(maxlen=limit))
        while opens and now - opens[0] > _OPEN_RATE_WINDOW_S:
            opens.popleft()
        if len(opens) >= limit:
            return False
        opens.append(now)
        return True

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


class _CallHandler:
    """One call on one WebSocket, from the upgrade to the close."""

    def __init__(self, websocket: WebSocket, worker: _Worker) -> None:
        self._ws = websocket
        self._worker = worker
        self._engine = worker.engine
        self._config = worker.config
        self._session: EngineSession | None = None
        self._frame_samples = 0  # set once the engine is known to run (_admit)
        self._last_frame_index = -1
        # (frame_index, arrival time) of frames pushed and not yet answered, for the residence
        # metric; bounded, as frames dropped by the engine never get their own STEP.
        self._arrivals: collections.deque[tuple[int, float]] = collections.deque(maxlen=_MAX_TRACKED_ARRIVALS)
        self._frames_sent = 0
        self._injections: asyncio.Queue[InjectTextMessage] = asyncio.Queue(maxsize=MAX_PENDING_INJECTIONS)
        self._shutdown = asyncio.Event()
        self._tasks: list[asyncio.Task[_Ending]] = []
        self.finished = asyncio.Event()
        self.admitted = False
        self.token_id = worker.token_id(websocket.headers.get("authorization"))
        client = websocket.client
        self._log = logger.bind(call=uuid.uuid4().hex[:8], peer=f"{client.host}:{client.port}" if client else "?")

    def shut_down(self) -> None:
        """Ask the call to end with ``ended(shutdown)`` and close 1001."""
        self._shutdown.set()

    async def handle(self) -> None:
        if self.token_id is None:
            # Before accept: the ASGI server answers the upgrade with HTTP 403.
            self._log.warning("Refused a call: missing or wrong bearer token")
            await self._ws.close(code=CloseCode.POLICY_VIOLATION)
            return
        await self._ws.accept()
        self._worker.calls.add(self)
        try:
            ending = await self._run()
            await self._say_goodbye(ending)
        finally:
            await self._release()

    async def _run(self) -> _Ending:
        try:
            self._admit()
            hello = await self._receive_hello()
            await self._open_session(hello)
            return await self._stream()
        except _CallEnded as ended:
            return ended.ending
        except ProtocolError as error:
            return _Ending.from_protocol_error(error)
        except Exception:
            self._log.exception("Call failed inside the worker")
            return _Ending(CloseCode.INTERNAL_ERROR, "the worker failed; the call is lost, start a new one")

    # --- handshake ---------------------------------------------------------------------------

    def _admit(self) -> None:
        if self._worker.stopping:
            raise _CallEnded(_Ending(CloseCode.GOING_AWAY, "the worker is shutting down; try another worker"))
        if not self._worker.started:
            raise _CallEnded(_Ending(CloseCode.TRY_AGAIN_LATER, "the worker's engine is not running; try later"))
        if self._engine.sessions_in_use >= self._engine.capacity:
            raise _CallEnded(self._full())
        limit = self._config.max_calls_per_token
        if limit is not None and self._worker.admitted_calls(self.token_id) >= limit:
            self._worker.metrics.count_rejected_call()
            self._log.info(f"Refused a call: token #{self.token_id} already holds {limit} call(s) here")
            raise _CallEnded(
                _Ending(
                    CloseCode.TRY_AGAIN_LATER,
                    f"this token already holds {limit} call(s) on this worker (max_calls_per_token); "
                    "end one or try another worker",
                )
            )
        if not self._worker.may_open(self.token_id):
            self._worker.metrics.count_rejected_call()
            self._log.info(f"Refused a call: token #{self.token_id} opened too many calls in the last minute")
            raise _CallEnded(
                _Ending(
                    CloseCode.TRY_AGAIN_LATER,
                    f"this token opened {self._config.max_call_opens_per_minute} calls in the last minute "
                    "(max_call_opens_per_minute); wait or try another worker",
                )
            )
        self.admitted = True
        self._frame_samples = self._engine.frame_samples

    def _full(self) -> _Ending:
        self._worker.metrics.count_rejected_call()
        self._log.info(f"Refused a call: all {self._engine.capacity} slots are in use")
        return _Ending(
            CloseCode.TRY_AGAIN_LATER, f"all {self._engine.capacity} slots are in use; try another worker"
        )

    async def _receive_hello(self) -> HelloMessage:
        timeout = _Ending(
            CloseCode.HANDSHAKE_TIMEOUT,
            f"no hello within {self._config.handshake_timeout_s:g} s of the upgrade; reconnect and send hello first",
        )
        message = await self._receive(self._config.handshake_timeout_s, timeout)
        if not isinstance(message, HelloMessage):
            raise ProtocolError(
                CloseCode.UNEXPECTED_MESSAGE, f"the first message must be hello, got {_describe(message)}"
            )
        return message

    def _check_flow_steps(self, flow_steps: int | None) -> None:
        if flow_steps is not None and flow_steps > self._config.max_flow_steps:
            raise ProtocolError(
                CloseCode.BAD_MESSAGE,
                f"flow_steps {flow_steps} is over this worker's max_flow_steps {self._config.max_flow_steps}",
            )

    async def _open_session(self, hello: HelloMessage) -> None:
        self._check_flow_steps(hello.session.flow_steps)
        voice_prompt = hello.voice_prompt_pcm()
        if voice_prompt is not None and len(voice_prompt) < self._frame_samples:
            # Checked here, not only in the model: a bad prompt is the client's error (4000).
            raise ProtocolError(
                CloseCode.BAD_MESSAGE,
                f"voice prompt of {len(voice_prompt)} samples is shorter than one frame ({self._frame_samples})",
            )
        try:
            self._session = await self._engine.open_session(hello.session, hello.system_prompt, voice_prompt)
        except EngineFullError:
            raise _CallEnded(self._full()) from None
        except ValueError as exc:  # ContextTooLongError and the model's other refusals of a prompt
            raise ProtocolError(CloseCode.BAD_MESSAGE, f"the prompts cannot open a call: {exc}") from None
        session = self._session
        self._log = self._log.bind(session=session.session_id[:8], slot=session.slot)
        await self._send(
            ReadyMessage(
                protocol_version=PROTOCOL_VERSION,
                session_id=session.session_id,
                frame_samples=self._frame_samples,
                sample_rate_hz=self._engine.sample_rate_hz,
                slot=session.slot,
                capacity=self._engine.capacity,
            )
        )
        self._worker.metrics.count_call()

    # --- the call ----------------------------------------------------------------------------

    async def _stream(self) -> _Ending:
        self._tasks = [
            asyncio.create_task(self._guard(self._read_loop()), name="michi-call-reader"),
            asyncio.create_task(self._guard(self._write_loop()), name="michi-call-writer"),
            asyncio.create_task(self._guard(self._inject_loop()), name="michi-call-injections"),
            asyncio.create_task(self._guard(self._wait_for_shutdown()), name="michi-call-shutdown"),
        ]
        if self._config.max_call_s is not None:
            self._tasks.append(asyncio.create_task(self._time_limit(self._config.max_call_s), name="michi-call-limit"))
        done, _ = await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
        await self._cancel_tasks()
        # Several may finish at once (a disconnect fails the writer's send too): a client that
        # is gone wins, as nothing more can be sent to it.
        endings = [task.result() for task in done]
        return next((e for e in endings if e.client_gone), endings[0])

    async def _guard(self, loop: Awaitable[_Ending]) -> _Ending:
        try:
            return await loop
        except _CallEnded as ended:
            return ended.ending
        except ProtocolError as error:
            return _Ending.from_protocol_error(error)

    async def _read_loop(self) -> _Ending:
        session = self._require_session()
        idle = _Ending(
            CloseCode.IDLE_TIMEOUT,
            f"nothing received for {self._config.idle_timeout_s:g} s",
            ended_reason="idle_timeout",
        )
        while True:
            message = await self._receive(self._config.idle_timeout_s, idle)
            if isinstance(message, AudioFrame):
                self._push_audio(session, message)
            elif isinstance(message, EndMessage):
                # Every inject_text sent before ``end`` still gets its one answer (docs/protocol.md).
                await self._injections.join()
                return _Ending(CloseCode.NORMAL, "the client ended the call", ended_reason="client_end")
            elif isinstance(message, HelloMessage):
                raise ProtocolError(CloseCode.UNEXPECTED_MESSAGE, "a second hello on a call that is ready")
            elif isinstance(message, InjectTextMessage):
                await self._injections.put(message)  # prefilled in order by _inject_loop
            elif isinstance(message, UpdateSettingsMessage):
                self._check_flow_steps(message.session.flow_steps)
                session.update_settings(message.session)  # from the next tick on
            elif isinstance(message, ResetMessage):
                await self._reset(session)

    async def _reset(self, session: EngineSession) -> None:
        # In order both ways: injections sent before the reset land first (and are forgotten),
        # audio sent after it is read only once the slot is fresh.
        await self._injections.join()
        try:
            await session.reset()
        except SessionClosedError:
            raise _CallEnded(self._session_lost()) from None
        self._log.info("Call reset")

    def _push_audio(self, session: EngineSession, frame: AudioFrame) -> None:
        # Checked here as well as in the engine: the engine's own counter restarts on reset,
        # the protocol's frame indexes never do.
        if frame.frame_index <= self._last_frame_index:
            raise ProtocolError(
                CloseCode.UNEXPECTED_MESSAGE,
                f"frame_index {frame.frame_index} after {self._last_frame_index}: indexes must increase",
            )
        self._last_frame_index = frame.frame_index
        try:
            session.push_audio(frame.pcm, frame.frame_index)
        except FrameOrderError as exc:
            raise ProtocolError(CloseCode.UNEXPECTED_MESSAGE, str(exc)) from None
        except SessionClosedError:
            raise _CallEnded(self._session_lost()) from None
        self._arrivals.append((frame.frame_index, time.perf_counter()))

    async def _write_loop(self) -> _Ending:
        session = self._require_session()
        while True:
            try:
                result = await session.receive()
            except SessionClosedError:
                return self._session_lost()
            await self._send_bytes(encode_message(_step_message(result)))
            self._frames_sent += 1
            self._observe_residence(result)

    def _observe_residence(self, result: StepResult) -> None:
        arrivals = self._arrivals
        while arrivals and arrivals[0][0] < result.frame_index:
            arrivals.popleft()  # stepped as silence before it came: no residence to measure
        if arrivals and arrivals[0][0] == result.frame_index:
            arrived = arrivals.popleft()[1]
            if not result.filled:  # a filled step did not wait for its (late) frame
                self._worker.metrics.residence_ms.observe((time.perf_counter() - arrived) * 1000.0)

    async def _inject_loop(self) -> _Ending:
        session = self._require_session()
        while True:
            message = await self._injections.get()
            try:
                await self._inject(session, message)
            except SessionClosedError:
                return self._session_lost()
            finally:
                self._injections.task_done()

    async def _inject(self, session: EngineSession, message: InjectTextMessage) -> None:
        try:
            result = await session.inject_text(message.text, message.role, message.pinned)
        except ValueError as exc:  # ContextTooLongError and other refusals of this text
            self._log.info(f"Refused an injection: {exc}")
            await self._send(
                ErrorMessage(
                    code=CloseCode.BAD_MESSAGE,
                    message=_clip(f"inject_text refused: {exc}", MAX_TEXT_CHARS),
                    fatal=False,
                    request_id=message.request_id,
                )
            )
            return
        await self._send(
            InjectedMessage(
                request_id=message.request_id, token_count=result.token_count, kv_length=result.kv_length
            )
        )

    async def _wait_for_shutdown(self) -> _Ending:
        await self._shutdown.wait()
        return _Ending(CloseCode.GOING_AWAY, "the worker is shutting down", ended_reason="shutdown")

    async def _time_limit(self, max_call_s: float) -> _Ending:
        await asyncio.sleep(max_call_s)
        return _Ending(
            CloseCode.NORMAL, f"the call reached the worker's limit of {max_call_s:g} s", ended_reason="max_duration"
        )

    def _session_lost(self) -> _Ending:
        if self._worker.stopping:
            return _Ending(CloseCode.GOING_AWAY, "the worker is shutting down", ended_reason="shutdown")
        return _Ending(CloseCode.INTERNAL_ERROR, "the engine closed the call (a model step failed); start a new call")

    def _require_session(self) -> EngineSession:
        assert self._session is not None, "the call has no session yet"
        return self._session

    # --- I/O ---------------------------------------------------------------------------------

    async def _receive(self, timeout_s: float, on_timeout: _Ending) -> ClientMessage:
        try:
            async with asyncio.timeout(timeout_s):
                event = await self._ws.receive()
        except TimeoutError:
            raise _CallEnded(on_timeout) from None
        if event["type"] == "websocket.disconnect":
            raise _CallEnded(_Ending.disconnected(int(event.get("code") or CloseCode.NORMAL)))
        data = event.get("bytes")
        if data is None:
            raise ProtocolError(CloseCode.BAD_MESSAGE, "text WebSocket messages are not part of the protocol")
        # The ASGI server enforces the limit already (ws_max_size); this holds behind any server.
        if len(data) > self._config.max_message_bytes:
            raise ProtocolError(
                CloseCode.MESSAGE_TOO_BIG, f"message of {len(data)} bytes is over {self._config.max_message_bytes}"
            )
        return decode_client_message(data, self._frame_samples)

    async def _send(self, message: ReadyMessage | InjectedMessage | ErrorMessage | EndedMessage) -> None:
        await self._send_bytes(encode_message(message))

    async def _send_bytes(self, data: bytes) -> None:
        try:
            await self._ws.send_bytes(data)
        except (WebSocketDisconnect, OSError):
            raise _CallEnded(_Ending.disconnected(1006)) from None

    async def _say_goodbye(self, ending: _Ending) -> None:
        # Ends the protocol foresees are news; errors (bad messages, failures) are warnings.
        level = "INFO" if ending.ended_reason is not None or ending.client_gone else "WARNING"
        self._log.log(level, f"Call over ({ending.code}): {ending.message}; {self._frames_sent} steps sent")
        if ending.client_gone:
            return
        if ending.ended_reason is not None:
            last: EndedMessage | ErrorMessage = EndedMessage(reason=ending.ended_reason, frames=self._frames_sent)
        else:
            last = ErrorMessage(code=ending.code, message=_clip(ending.message, MAX_TEXT_CHARS), fatal=True)
        try:
            async with asyncio.timeout(FINAL_SEND_TIMEOUT_S):
                await self._ws.send_bytes(encode_message(last))
                await self._ws.close(code=ending.code, reason=close_reason(ending.message))
        except (TimeoutError, WebSocketDisconnect, OSError, RuntimeError) as exc:
            # RuntimeError: the ASGI server already closed the socket (a race with the client).
            self._log.debug(f"Could not say goodbye: {exc!r}")

    async def _cancel_tasks(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _release(self) -> None:
        """Every exit path: tasks cancelled, slot freed, call forgotten."""
        try:
            await self._cancel_tasks()
            if self._session is not None:
                await self._session.close()
        finally:
            self._worker.calls.discard(self)
            self.finished.set()


def _step_message(result: StepResult) -> StepMessage:
    return StepMessage(
        frame_index=result.frame_index,
        speaking=result.speaking,
        filled_silence=result.filled,
        late=result.late,
        speak_prob=min(1.0, max(0.0, float(result.speak_prob))),
        bot_text=result.bot_text,
        transcript=result.transcript,
        pcm=result.audio if result.speaking else None,
    )


def _describe(message: ClientMessage) -> str:
    return "audio" if isinstance(message, AudioFrame) else message.type


def _clip(text: str, max_chars: int) -> str:
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"



def check_config(config: WorkerConfig) -> None:
    """Refuse a configuration no worker may serve.

    Raises:
        WorkerConfigError: No token and ``allow_unauthenticated`` is not set, or an empty token.
    """
    if config.token is None and not config.tenant_tokens and not config.allow_unauthenticated:
        raise WorkerConfigError(
            "no token: set MICHI_WORKER_TOKEN (or --token), or allow unauthenticated calls for local "
            "development (--allow-unauthenticated, MICHI_WORKER_ALLOW_UNAUTHENTICATED=1)"
        )
    if config.token is not None and not config.token.get_secret_value().strip():
        raise WorkerConfigError("the token is empty: set a long random MICHI_WORKER_TOKEN")
    if any(not secret.get_secret_value().strip() for secret in config.tenant_tokens):
        raise WorkerConfigError("a tenant token is empty: every one of MICHI_WORKER_TENANT_TOKENS must be long and random")


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
    worker = _Worker(config, engine or DuplexEngine(config.engine))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await worker.engine.start()
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
        await _CallHandler(websocket, worker).handle()

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
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(worker.metrics.render(), media_type=CONTENT_TYPE_PLAIN_0_0_4)

    @app.get(STATS_PATH, response_model=WorkerStats)
    async def stats(request: Request) -> WorkerStats | JSONResponse:
        """Counters and step-time percentiles (bearer token required)."""
        if not worker.authorized(request.headers.get("authorization")):
            return JSONResponse(
                {"detail": "missing or wrong bearer token"}, status_code=401, headers={"WWW-Authenticate": "Bearer"}
            )
        return worker.metrics.stats()

    return app


class WorkerServer(uvicorn.Server):
    """uvicorn's server, which first ends the app's calls with ``ended(shutdown)`` and 1001
    (uvicorn alone would drop them with 1012) before it stops."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self._worker: _Worker = app.state.worker

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
    serving = asyncio.create_task(server.serve(sockets=[sock]), name="michi-worker-server")
    try:
        async with asyncio.timeout(startup_timeout_s):
            while not server.started:
                if serving.done():
                    serving.result()  # raises what stopped it
                    raise RuntimeError("the worker stopped before it started")
                await asyncio.sleep(0.01)
        yield RunningWorker(f"ws://{host}:{port}{CALL_PATH}", f"http://{host}:{port}", app, server)
    finally:
        server.should_exit = True
        try:
            await serving
        finally:
            sock.close()


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="michi-worker",
        description="Serve MichiAI calls over WebSockets (docs/protocol.md). Settings also come "
        "from MICHI_WORKER_* environment variables; flags win.",
    )
    parser.add_argument("--host", help="interface to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="TCP port (default 8765)")
    parser.add_argument("--token", help="bearer token; prefer MICHI_WORKER_TOKEN, flags show up in ps")
    parser.add_argument("--allow-unauthenticated", action="store_true", help="serve without a token (local only)")
    parser.add_argument("--preset", help="model preset with random weights (tiny, michi-530m)")
    parser.add_argument("--checkpoint", type=Path, help="MichiAI checkpoint directory (wins over --preset)")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", help="auto, float32, bfloat16, float16")
    parser.add_argument("--quantize", choices=QUANTIZE_MODES, help="weight quantization: none, int8")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the step (CUDA graphs on CUDA); compiles before /readyz is ready")
    parser.add_argument("--slots", type=int, help="slot capacity: concurrent calls")
    parser.add_argument("--log-level", default="info", help="uvicorn log level")
    return parser.parse_args(argv)


def given_flags(**flags: Any) -> dict[str, Any]:
    """The command-line flags that were given (not ``None``): settings overrides, so that what
    is left out still comes from the environment."""
    return {name: value for name, value in flags.items() if value is not None}


def main(argv: list[str] | None = None) -> None:
    """``michi-worker``: build the config from the environment and flags, serve until stopped."""
    args = _parse_args(argv)
    configure_production_logging(args.log_level)
    overrides = given_flags(
        host=args.host, port=args.port, token=args.token, allow_unauthenticated=args.allow_unauthenticated or None
    )
    engine_overrides = given_flags(
        preset=args.preset, checkpoint=args.checkpoint, device=args.device, dtype=args.dtype,
        quantize=args.quantize, compile=args.compile or None, slot_capacity=args.slots,
    )
    if engine_overrides:
        overrides["engine"] = engine_overrides  # merged with MICHI_WORKER_ENGINE__* by pydantic-settings
    try:
        config = WorkerConfig(**overrides)
        app = create_app(config)
    except (ValidationError, WorkerConfigError) as exc:
        raise SystemExit(f"michi-worker: {exc}") from None
    try:
        sock = bind_listener(config.host, config.port, config.send_buffer_bytes)
    except OSError as exc:
        raise SystemExit(f"michi-worker: cannot listen on {config.host}:{config.port}: {exc}") from None
    create_server(app, config, log_level=args.log_level).run(sockets=[sock])


if __name__ == "__main__":
    main()
