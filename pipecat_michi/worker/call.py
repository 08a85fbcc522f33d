"""One call on one WebSocket, from the upgrade to the close: ``CallHandler``, the worker's
per-call state machine, speaking the protocol of ``docs/protocol.md`` (codec in ``protocol.py``).

Per call, tasks owned by its ``CallHandler``:

- the reader decodes client messages: audio goes straight into the engine session, settings
  apply from the next tick, a reset waits for earlier injections then empties the slot, and
  ``inject_text`` goes, in order, to
- the injection task, which prefills one text at a time and answers each (STEPs go on);
- the writer turns each ``StepResult`` into a STEP message;
- a watcher for the worker's shutdown.

Whichever task finishes first decides how the call ends (``_Ending``); the others are
cancelled and the engine session is closed on every path, so a slot is free again within one
tick of a disconnect. A bad message ends its call, never the process.

Over 400 lines on purpose: one state machine (admission, handshake, the four tasks, the
ending), whose states and transitions read best top to bottom in one place.
"""

from __future__ import annotations

import asyncio
import collections
import time
import uuid
from dataclasses import dataclass
from typing import Final

from fastapi import WebSocket
from loguru import logger
from starlette.websockets import WebSocketDisconnect

from pipecat_michi.engine.batch import ContextTooLongError
from pipecat_michi.engine.engine import (
    EngineFullError,
    EngineSession,
    FrameOrderError,
    SessionClosedError,
    StepResult,
)
from pipecat_michi.worker.protocol import (
    MAX_FRAME_INDEX,
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
from pipecat_michi.worker.state import Worker

# Injections queued behind a slow one before the reader stops reading (the client's socket
# then fills: back-pressure instead of unbounded memory).
MAX_PENDING_INJECTIONS: Final = 16
# Bound on the last messages of a call (ended/error, close): a client that stopped reading
# must not hold its handler forever.
FINAL_SEND_TIMEOUT_S: Final = 2.0
_MAX_TRACKED_ARRIVALS: Final = 256


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


class CallHandler:
    """One call on one WebSocket, from the upgrade to the close."""

    def __init__(self, websocket: WebSocket, worker: Worker) -> None:
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
        self.token_id = worker.auth.token_id(websocket.headers.get("authorization"))
        client = websocket.client
        self._log = logger.bind(call=uuid.uuid4().hex[:8], peer=f"{client.host}:{client.port}" if client else "?")

    def shut_down(self) -> None:
        """Ask the call to end with ``ended(shutdown)`` and close 1001."""
        self._shutdown.set()

    async def handle(self) -> None:
        if self.token_id is None:
            # Before accept: the ASGI server answers the upgrade with HTTP 403.
            self._worker.refusals.warning("Refused a call: missing or wrong bearer token")
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
        if not self._worker.auth.may_open(self.token_id):
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
            if result.frame_index > MAX_FRAME_INDEX:
                # Only a client that started near 2**32 gets here (a real call needs 10 years).
                return _Ending(
                    CloseCode.UNEXPECTED_MESSAGE,
                    f"frame indexes ran past {MAX_FRAME_INDEX}: start at 0 (docs/protocol.md)",
                )
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
        # The token's count drops first: once the slot is free, the token may call again (its
        # count used to drop only after the session's close, so an immediate redial was refused).
        self.admitted = False
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
